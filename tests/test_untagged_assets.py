"""An untagged memory graph runs green with reasons, and a source that gives no graph writes nothing.

Invented content throughout. What must hold (issue 13):
- an untagged graph: `emotion_training_pairs` is empty with a stated reason (a WARN check, not a block),
  `steering_vectors` saves an explicit empty readout with `skipped_reason` and its checks pass saying so,
  the agent's readout and a steering dream scorer skip or fail naming the config;
- an empty or unreadable file fails `memory_graph` before anything is written, naming the file; the last
  good tables stay.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from carl_assets import storage
from carl_assets.defs.emotion_tags import emotion_tags
from carl_assets.defs.memory import (
    NO_TAG_LINE,
    NO_TAGS_REASON,
    emotion_training_pairs,
    memory_graph,
)
from carl_assets.defs.resources import build_resources
from carl_assets.defs.steering import steering_vectors
from carl_assets.steering import load_readout
from tests.upstreams import with_upstreams

GARDEN = [
    {
        "type": "entity",
        "name": "Herb Spiral",
        "entityType": "project",
        "observations": [
            "Stones stacked in a spiral hold thyme at the top and mint near the damp bottom.",
            "The spiral drained well after the storm last week.",
        ],
    },
    {
        "type": "entity",
        "name": "Rosa",
        "entityType": "person",
        "observations": ["Rosa trades seedlings for jam every spring at the allotment gate."],
    },
    {
        "type": "entity",
        "name": "Worm Bin",
        "entityType": "topic",
        "observations": ["Coffee grounds and cardboard go in; the worms turn it into dark crumbly soil."],
    },
    {"type": "relation", "from": "Rosa", "to": "Herb Spiral", "relationType": "helped_build"},
    {"type": "relation", "from": "Herb Spiral", "to": "Worm Bin", "relationType": "fed_by"},
]
TAGGED = [
    {
        "type": "entity",
        "name": f"day-{i}",
        "entityType": "journal",
        "observations": [
            f"Day {i}: a long walk by the canal with the dog, then soup and an early night.",
            "warmth:9" if i % 2 else "calm:7",
        ],
    }
    for i in range(6)
]
STEPS = [
    *with_upstreams(memory_graph, emotion_tags, emotion_training_pairs),
    steering_vectors,
    dg.AssetSpec("base_model"),
]
OFF_REASON = (
    f"{NO_TAG_LINE}, and emotion_tags.tagger is 'off'; add tag lines, or set emotion_tags.tagger to "
    "'lexicon' or 'model'"
)


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _run(
    home: Path,
    source: str,
    steps: list = STEPS,
    instance: dg.DagsterInstance | None = None,
    tagger: str = "off",
):
    config = {"ops": {"memory_graph": {"config": {"source": source}}}}
    if emotion_tags in steps:
        config["ops"]["emotion_tags"] = {"config": {"tagger": tagger}}
    return dg.materialize(
        steps, resources=build_resources(home), run_config=config, instance=instance, raise_on_error=False
    )


def _meta(result, asset: str) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node(asset)[0].metadata.items()}


def test_untagged_graph_gives_empty_pairs_and_a_skipped_readout_with_the_reason(tmp_path):
    memory = _write(tmp_path / "garden.jsonl", GARDEN)
    with dg.instance_for_test() as instance:
        result = _run(tmp_path / "home", f"jsonl:{memory}", instance=instance)
        warnings = [e.user_message for e in instance.all_logs(result.run_id) if e.level == logging.WARNING]
    assert result.success
    assert any(
        m.startswith("0 of 3 nodes carry emotion tags: no node carries an emotion tag line") for m in warnings
    )

    graph = _meta(result, "memory_graph")
    assert graph["tagged_nodes"] == 0 and graph["tags_note"].startswith(f"0 of {graph['nodes']} nodes")
    pairs = _meta(result, "emotion_training_pairs")
    assert pairs["rows"] == 0 and pairs["empty_reason"] == OFF_REASON and pairs["tagger"] == "off"
    # The reasons name config fields that exist.
    from carl_assets.defs.emotion_tags import EmotionTagsConfig

    assert "tagger" in EmotionTagsConfig.model_fields and "min_score" in EmotionTagsConfig.model_fields
    assert "emotion_tags.tagger" in NO_TAGS_REASON and "'warmth:9 clarity:10'" in NO_TAGS_REASON

    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["memory_graph_is_consistent"].passed
    warn = checks["pairs_nonempty_within_caps"]
    assert not warn.passed and warn.severity == dg.AssetCheckSeverity.WARN and warn.description == OFF_REASON
    for name in ("vectors_finite_unit_norm", "manifest_matches_tensors"):
        assert checks[name].passed and checks[name].description.startswith(
            "skipped: emotion_training_pairs is empty"
        )

    steering = _meta(result, "steering_vectors")
    assert steering["concepts"] == 0
    assert steering["skipped_reason"] == f"emotion_training_pairs is empty: {OFF_REASON}"
    readout = load_readout(build_resources(tmp_path / "home")["artifacts"].require("steering_vectors"))
    assert (
        readout.concepts == []
        and readout.layers == []
        and readout.skipped_reason == steering["skipped_reason"]
    )
    db = tmp_path / "home" / storage.DATABASE_NAME
    assert storage.read_table(db, "emotion_training_pairs").empty
    assert storage.read_table(db, "steering_vector_stats").empty


def test_too_few_pairs_skips_steering_naming_the_setting(tmp_path):
    memory = _write(tmp_path / "few.jsonl", TAGGED)  # 3 positives, 3 negatives of warmth: fewer than 10
    result = _run(tmp_path / "home", f"jsonl:{memory}")
    assert result.success
    assert _meta(result, "emotion_training_pairs")["rows"] == 6
    reason = _meta(result, "steering_vectors")["skipped_reason"]
    assert "steering_vectors.min_pairs_per_polarity = 10" in reason and "'warmth'" in reason
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["pairs_nonempty_within_caps"].passed


def test_tagged_nodes_without_a_negative_say_which_settings_to_change(tmp_path):
    only_high = [{**r, "observations": [r["observations"][0], "warmth:9"]} for r in TAGGED]
    memory = _write(tmp_path / "high.jsonl", only_high)
    result = _run(tmp_path / "home", f"jsonl:{memory}", STEPS[:4])
    assert result.success
    reason = _meta(result, "emotion_training_pairs")["empty_reason"]
    assert reason.startswith("6 of 6 nodes carry tags over 1 emotions")
    assert "emotion_training_pairs.min_positive_score = 8" in reason and "min_content_chars = 40" in reason


@pytest.mark.parametrize("content", [b"", b'not json at all\n{"half": \n'])
def test_a_source_without_a_graph_fails_before_writing_and_keeps_the_last_good_tables(tmp_path, content):
    home = tmp_path / "home"
    good = _write(tmp_path / "good.jsonl", GARDEN)
    with dg.instance_for_test() as instance:
        assert _run(home, f"jsonl:{good}", [memory_graph], instance).success
        db = home / storage.DATABASE_NAME
        before = storage.read_table(db, "memory_nodes")

        bad = tmp_path / "broken.jsonl"
        bad.write_bytes(content)
        result = _run(home, f"jsonl:{bad}", [memory_graph], instance)
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert str(bad) in failure.description and "Nothing was written" in failure.description
    assert (
        f"memory_nodes, {len(before)} nodes" in failure.description
        and "CARL_MEMORY_SOURCE" in failure.description
    )
    assert failure.metadata["previous_nodes"].value == len(before)
    after = storage.read_table(db, "memory_nodes")
    pd.testing.assert_frame_equal(after, before)


def test_a_missing_file_fails_naming_it_and_saying_nothing_was_there_before(tmp_path):
    result = _run(tmp_path / "home", f"jsonl:{tmp_path / 'nope.jsonl'}", [memory_graph])
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert "nope.jsonl" in failure.description and "there is no earlier graph" in failure.description


def test_agent_readout_and_steering_scorer_with_a_skipped_readout(tmp_path):
    from carl_assets.defs.agent import readout_table
    from carl_assets.steering import save_readout
    from carl_assets.steering.readout import EmptyReadoutError, empty_readout, require_concepts

    artifacts = build_resources(tmp_path)["artifacts"]
    with artifacts.write_dir("steering_vectors") as folder:
        save_readout(empty_readout("no tags here", reduction="mean"), folder)
    results = pd.DataFrame(
        {"checkpoint": ["sft_checkpoint"], "task_id": ["t0"], "instruction": ["i"], "raw_response": ["r"]}
    )
    readout, reason = readout_table(
        load_readout(artifacts.require("steering_vectors")),
        {},
        results,
        pd.DataFrame({"task_id": ["t0"], "observation": ["o"]}),
    )
    assert readout.empty and list(readout.columns) == [
        "checkpoint",
        "task_id",
        "emotion",
        "layer",
        "projection",
    ]
    assert reason == "steering_vectors was skipped: no tags here"

    vectors = load_readout(artifacts.require("steering_vectors"))
    with pytest.raises(
        EmptyReadoutError,
        match=r"dream_scenarios.scorer = 'steering:warmth' needs steering "
        r"vectors, but steering_vectors was skipped: no tags here",
    ):
        require_concepts(vectors, "dream_scenarios.scorer = 'steering:warmth'")
    with pytest.raises(ValueError, match="needs the reason"):
        empty_readout("", reduction="mean")


def test_file_metadata_markers_are_kept_in_a_table(tmp_path):
    from carl_assets.defs.memory import _file_metadata

    class WithMarkers:
        metadata = {
            "format": "jsonl",
            "markers": [
                {"line": 1, "record": {"type": "_aim", "name": "garden"}},
                {"line": 7, "record": {"type": "_aim", "name": "shed"}},
            ],
        }

    table = _file_metadata(WithMarkers())
    assert table["key"].tolist() == ["format", "markers", "markers"]
    assert table["line"].isna().tolist() == [True, False, False]
    assert table["line"].dropna().tolist() == [1, 7]
    assert json.loads(table["value_json"][1]) == {"record": {"type": "_aim", "name": "garden"}}
    assert json.loads(table["value_json"][0]) == "jsonl"
    assert _file_metadata(object()).empty


def test_pairs_take_a_taggers_tags_for_untagged_nodes_unless_restricted_to_user_tags(tmp_path):
    untagged = [
        {
            "type": "entity",
            "name": f"u-{i}",
            "entityType": "note",
            "observations": [
                f"Note {i}: the kettle, the radio and a pile of letters on a slow grey morning."
            ],
        }
        for i in range(4)
    ]
    memory = _write(tmp_path / "mixed.jsonl", TAGGED + untagged)
    home = tmp_path / "home"
    assert _run(home, f"jsonl:{memory}", [memory_graph]).success
    # A tagger's rows as the emotion_tags asset writes them; its row for a user-tagged node must lose.
    storage.write_tables(
        home / storage.DATABASE_NAME,
        {
            "emotion_tags": pd.DataFrame(
                {
                    "node_id": ["u-0", "u-1", "u-2", "day-1"],
                    "emotion": ["warmth", "warmth", "calm", "warmth"],
                    "score": [9, 9, 8, 0],
                    "source": ["model"] * 4,
                    "raw_score": [9.1, 8.8, 7.9, 0.2],
                }
            )
        },
    )

    def pairs(tag_sources: str) -> pd.DataFrame:
        config = {"ops": {"emotion_training_pairs": {"config": {"tag_sources": tag_sources}}}}
        result = dg.materialize(
            with_upstreams(emotion_training_pairs), resources=build_resources(home), run_config=config
        )
        assert result.success
        return storage.read_table(home / storage.DATABASE_NAME, "emotion_training_pairs")

    everything = pairs("all")
    warmth = everything[everything["emotion"] == "warmth"]
    assert sorted(warmth[warmth["polarity"] == "positive"]["node_id"]) == [
        "day-1",
        "day-3",
        "day-5",
        "u-0",
        "u-1",
    ]
    assert sorted(warmth[warmth["polarity"] == "negative"]["node_id"]) == ["day-0", "day-2", "day-4", "u-2"]
    users = pairs("user")
    assert sorted(users["node_id"]) == ["day-0", "day-1", "day-2", "day-3", "day-4", "day-5"]
    # 'auto' (the default): some nodes carry tag lines, so only those label the pairs.
    pd.testing.assert_frame_equal(pairs("auto"), users)
