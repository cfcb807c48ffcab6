"""Regression tests: the small memory files real users' problems were reduced to (tests/data/memory_cases/,
one folder per case with its README.txt), each read as its README's "Expected" says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carl_assets.memory.graph import MemorySourceError, extract_training_pairs, load_graph, parse_tags

CASES = Path(__file__).parent / "data" / "memory_cases"


def _load(case: str, name: str = "memory.jsonl"):
    return load_graph(f"jsonl:{CASES / case / name}")


def _nodes(graph) -> dict[str, dict]:
    return {row["node_id"]: row for row in graph.nodes.to_dict("records")}


def _edges(graph) -> list[tuple[str, str, str]]:
    return [tuple(e) for e in graph.edges[["src", "dst", "relation"]].values.tolist()]


def test_every_case_folder_is_tested():
    tested = {
        "hunt-01_concatenated_line",
        "hunt-02_single_json_document",
        "hunt-05_tagline_not_last",
        "hunt-07_empty_file",
        "real-01_underscore_type_fork",
        "real-02_no_type_field",
        "real-03_relation_key_variants",
        "real-04_url_last_observation_eaten",
        "real-05_entity_name_not_in_text",
        "real-06_no_emotion_tags_unclear_stop",
        "real-07_aim_marker_line",
        "real-08_dangling_relations",
        "real-09_duplicate_entity_observations",
        "real-10_dreams_default_kinds",
    }
    assert {p.name for p in CASES.iterdir() if p.is_dir()} == tested


def test_hunt01_two_records_on_one_line_both_survive():
    graph = _load("hunt-01_concatenated_line")
    nodes = _nodes(graph)
    assert graph.rejects.empty and set(nodes) == {"Ana", "Ben"}
    assert nodes["Ben"]["source_line"] == 2 and not nodes["Ben"]["is_stub"]
    assert json.loads(nodes["Ben"]["tags_json"]) == {"sadness": 8, "loneliness": 9}
    assert _edges(graph) == [("Ana", "Ben", "knows"), ("Ben", "Ana", "knows")]
    assert graph.edges["source_line"].tolist() == [2, 3]
    pairs = extract_training_pairs(graph, min_content_chars=10)
    assert len(pairs) > 0  # the case's "0 pairs" came from losing Ben


def test_hunt01_a_truncated_tail_is_a_reject_naming_it():
    graph = _load("hunt-01_concatenated_line", "truncated_tail.jsonl")
    assert _edges(graph) == [("Ana", "Ben", "knows")]
    assert _nodes(graph)["Ben"]["is_stub"]  # Ben's own record was cut off; the relation to him stays
    reject = graph.rejects.iloc[0]
    assert reject["line"] == 2 and reject["raw"] == '{"type":"entity","n'
    assert "1 record(s) on this line, then text that is not a complete JSON record" in reject["reason"]


@pytest.mark.parametrize("name", ["memory.json", "memory_array.json"])
def test_hunt02_one_json_document_or_array(name):
    graph = _load("hunt-02_single_json_document", name)
    nodes = _nodes(graph)
    assert graph.rejects.empty and set(nodes) == {"Ana", "Ben"}
    assert json.loads(nodes["Ana"]["tags_json"]) == {"warmth": 9, "joy": 8}
    assert json.loads(nodes["Ben"]["tags_json"]) == {"sadness": 8, "loneliness": 9}
    assert _edges(graph) == [("Ana", "Ben", "knows")]


def test_hunt05_tag_lines_anywhere_are_parsed_and_stripped():
    graph = _load("hunt-05_tagline_not_last")
    nodes = _nodes(graph)
    assert json.loads(nodes["journal-1"]["tags_json"]) == {"warmth": 9, "joy": 8}
    assert json.loads(nodes["journal-2"]["tags_json"]) == {"frustration": 9, "loneliness": 7}  # "name: N"
    assert json.loads(nodes["journal-3"]["tags_json"]) == {"calm": 8}
    assert nodes["journal-1"]["text"].endswith("Follow-up: we planned to go again next month.")
    for text in graph.texts():  # training text never contains its own labels
        assert parse_tags(text) == {} and "warmth:9" not in text and "frustration: 9" not in text
    assert graph.rejects.empty


def test_hunt07_an_empty_file_is_an_error_naming_it():
    path = CASES / "hunt-07_empty_file" / "memory.jsonl"
    with pytest.raises(MemorySourceError, match="is empty \\(0 bytes\\)") as info:
        load_graph(f"jsonl:{path}")
    assert str(path) in str(info.value)


def test_real01_underscore_type_and_observation_objects():
    graph = _load("real-01_underscore_type_fork")
    nodes = _nodes(graph)
    assert graph.rejects.empty and set(nodes) == {"Garden Project", "Alex"}
    assert nodes["Alex"]["text"] == "Alex (person)\nHelps with watering on weekends"
    assert nodes["Alex"]["updated_at"] == "2025-05-11T15:54:05.242Z"
    assert _edges(graph) == [("Alex", "Garden Project", "works on")]


def test_real02_no_type_key():
    graph = _load("real-02_no_type_field")
    nodes = _nodes(graph)
    assert graph.rejects.empty and [nodes[n]["kind"] for n in ("Garden Project", "Alex")] == [
        "project",
        "person",
    ]
    assert _edges(graph) == [("Alex", "Garden Project", "works_on")]
    assert json.loads(graph.edges["extra_json"].item()) == {
        "record": {"createdAt": 1768061136, "createdBy": "someone"}
    }


def test_real03_relation_key_aliases():
    graph = _load("real-03_relation_key_variants")
    assert graph.rejects.empty
    assert _edges(graph) == [("Alex", "Garden Project", "works_on"), ("Alex", "Garden Project", "plans")]
    assert json.loads(_nodes(graph)["Alex"]["extra_json"]) == {"record": {"weight": 4}}


def test_real04_urls_and_status_lines_stay_in_the_text_with_no_rejects():
    graph = _load("real-04_url_last_observation_eaten")
    nodes = _nodes(graph)
    assert graph.rejects.empty and graph.summary()["tagged_nodes"] == 0
    assert nodes["Sam Example"]["text"].endswith(
        "Username: samexample\nGitHub: https://github.com/samexample"
    )
    assert nodes["Sam Example Scholar page"]["text"].endswith(
        "URL: https://scholar.example.org/citations?user=abc123"
    )
    assert nodes["Parser notes"]["text"].endswith("https://example.org/parser/design")
    assert nodes["Release task"]["text"].endswith("Cut the 2.0 release\nstatus:done")


def test_real05_the_entity_name_and_type_lead_the_text():
    nodes = _nodes(_load("real-05_entity_name_not_in_text"))
    assert (
        nodes["Attention Is All You Need"]["text"]
        == "Attention Is All You Need (paper)\nYear: 2017\nHas note: true"
    )
    assert nodes["Dr. Jane Placeholder"]["text"].startswith("Dr. Jane Placeholder (person)\n")


def test_real06_an_untagged_graph_loads_and_gives_no_pairs():
    graph = _load("real-06_no_emotion_tags_unclear_stop")
    summary = graph.summary()
    assert (summary["nodes"], summary["edges"], summary["rejects"], summary["tagged_nodes"]) == (3, 2, 0, 0)
    assert extract_training_pairs(graph, min_content_chars=10).empty  # untagged nodes are never negatives


def test_real07_a_marker_line_is_metadata_not_a_reject():
    graph = _load("real-07_aim_marker_line")
    assert graph.rejects.empty and len(graph.nodes) == 1
    assert graph.metadata["markers"] == [
        {"line": 1, "record": {"type": "_aim", "source": "mcp-knowledge-graph"}}
    ]


def test_real08_relations_to_missing_entities_are_kept_with_stub_nodes():
    graph = _load("real-08_dangling_relations")
    assert graph.rejects.empty
    assert _edges(graph) == [
        ("Alex", "Garden Project", "works_on"),
        ("Garden Project", "Task", "contains"),
        ("Agent", "Garden Project", "helps"),
    ]
    stubs = graph.nodes[graph.nodes["is_stub"]]
    assert stubs[["node_id", "kind", "text", "n_tags"]].values.tolist() == [
        ["Task", "stub", "Task", 0],
        ["Agent", "stub", "Agent", 0],
    ]


def test_real09_same_name_entities_merge_their_observations():
    graph = _load("real-09_duplicate_entity_observations")
    assert graph.rejects.empty and len(graph.nodes) == 1
    node = graph.nodes.iloc[0]
    assert node["kind"] == "topic"  # the first entity type wins
    assert node["text"] == (
        "Compost (topic)\nKitchen scraps go into the bin\nTurn the pile every two weeks\n"
        "Finished compost goes on the raised beds"
    )
    assert json.loads(node["extra_json"])["merged"] == [{"line": 2, "entityType": "practice"}, {"line": 3}]


@pytest.mark.parametrize(
    ("name", "edges", "lessons"), [("memory_no_lesson.jsonl", 24, 0), ("memory_one_lesson.jsonl", 22, 1)]
)
def test_real10_graphs_without_reflection_kinds_load_whole(name, edges, lessons):
    graph = _load("real-10_dreams_default_kinds", name)
    summary = graph.summary()
    assert (summary["nodes"], summary["edges"], summary["rejects"]) == (24, edges, 0)
    assert summary["kinds"].get("lesson", 0) == lessons and "reflection" not in summary["kinds"]
    assert {"project", "person", "topic", "task"} <= set(summary["kinds"])
