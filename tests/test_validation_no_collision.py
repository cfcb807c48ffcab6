"""scorer_validation on a graph without relations (memory case hunt-05: three journal entries, no relation;
`carl materialize --select 'memory_graph*'`) fails saying what the graph lacks."""

import pandas as pd
import pytest

from carl_assets.dreams.validation import validation_prompts


def test_no_collision_names_the_counts_and_the_fix():
    nodes = pd.DataFrame({
        "node_id": ["journal-1", "journal-2", "journal-3"], "kind": ["journal"] * 3,
        "text": ["a long enough journal entry about a quiet morning and tea"] * 3, "is_stub": [False] * 3,
        "n_tags": [1, 1, 1], "tags_json": ['{"joy": 8}'] * 3, "source_line": [1, 2, 3],
    })
    edges = pd.DataFrame({"src": pd.Series(dtype=str), "dst": pd.Series(dtype=str),
                          "relation": pd.Series(dtype=str)})
    with pytest.raises(ValueError, match=r"3 nodes, 0 relations; .*add relations"):
        validation_prompts(nodes, edges, 4)
