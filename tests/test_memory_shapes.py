"""Every shape a memory file comes in (the MCP memory server and its forks), each read with nothing lost.

One invented graph is written in each shape; every read must give the same nodes, tags and edges: every
observation's text findable in its node's text, every relation an edge, every tag line parsed wherever it
stands, and no reject.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from carl_assets.memory.graph import (
    MemorySourceError,
    extract_training_pairs,
    graph_from_tables,
    is_tag_line,
    load_graph,
    node_text,
    parse_tags,
)

# (name, entityType, observations, the tags those observations carry: later tag lines win)
ENTITIES = [
    (
        "Ada Lovelace",
        "person",
        [
            "Wrote the first published program for the Analytical Engine.",
            "warmth:7 curiosity:9",
            "Reference: https://example.org/ada",
            "status:done",
        ],
        {"warmth": 7, "curiosity": 9},
    ),
    (
        "Analytical Engine",
        "machine",
        [
            "joy: 8",
            "Designed by Babbage; never finished in his lifetime.",
            "Year: 1837",
            "10:30 is when the museum opens",
        ],
        {"joy": 8},
    ),
    (
        "Notes on the Engine",
        "paper",
        [
            "Published in 1843 with notes A to G.",
            "clarity:10",
            "Note G holds the Bernoulli program.",
            "clarity:6 awe:9",
        ],
        {"clarity": 6, "awe": 9},
    ),
]
RELATIONS = [
    ("Ada Lovelace", "Notes on the Engine", "wrote"),
    ("Notes on the Engine", "Analytical Engine", "describes"),
    ("Ada Lovelace", "Analytical Engine", "programmed"),
]
STAMP = "2025-05-11T15:54:05.242Z"


def _typed(type_key: str = "type") -> list[dict]:
    entities = [
        {type_key: "entity", "name": n, "entityType": t, "observations": list(o)} for n, t, o, _ in ENTITIES
    ]
    relations = [{type_key: "relation", "from": a, "to": b, "relationType": r} for a, b, r in RELATIONS]
    return entities + relations


def _observation_objects() -> list[dict]:
    """mcp-think-tank: `_type`, observations as {"text", "timestamp", "version"}, a `_savedAt`."""
    records = _typed("_type")
    for record in records[:3]:
        record["observations"] = [
            {"text": o, "timestamp": STAMP, "version": "1.0"} for o in record["observations"]
        ]
        record["_savedAt"] = "2025-05-13T16:26:31.968Z"
    return records


def _untyped() -> list[dict]:
    """A port that writes no type key at all."""
    return [
        {k: v for k, v in r.items() if k != "type"} | ({"createdAt": 1768061136} if "from" in r else {})
        for r in _typed()
    ]


def _aliases() -> list[dict]:
    """Relation ends and types under the names Python ports and other forks use."""
    schemes = [
        ("from_entity", "to_entity", "relationType"),
        ("source", "target", "relation_type"),
        ("fromEntity", "toEntity", "relation"),
    ]
    records = _typed()[:3]
    for (a, b, r), (kf, kt, kr) in zip(RELATIONS, schemes, strict=True):
        records.append({"type": "relation", kf: a, kt: b, kr: r, "weight": 6})
    return records


def _jsonl(records: list[dict]) -> bytes:
    return ("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n").encode()


def _document() -> dict:
    return {
        "entities": [{"name": n, "entityType": t, "observations": o} for n, t, o, _ in ENTITIES],
        "relations": [{"from": a, "to": b, "relationType": r} for a, b, r in RELATIONS],
    }


SHAPES = {
    "official": lambda: _jsonl(_typed()),
    "underscore_type_observation_objects": lambda: _jsonl(_observation_objects()),
    "no_type_key": lambda: _jsonl(_untyped()),
    "relation_key_aliases": lambda: _jsonl(_aliases()),
    "aim_marker_line": lambda: _jsonl([{"type": "_aim", "source": "mcp-knowledge-graph"}, *_typed()]),
    "document_pretty": lambda: json.dumps(_document(), indent=2).encode(),
    "document_one_line": lambda: json.dumps(_document()).encode() + b"\n",
    "array_one_line": lambda: json.dumps(_typed()).encode(),
    "array_pretty": lambda: json.dumps(_typed(), indent=1).encode(),
    "concatenated_on_one_line": lambda: "".join(json.dumps(r) for r in _typed()).encode() + b"\n",
    "two_per_line_with_spaces": lambda: b"\n".join(
        json.dumps(a).encode() + b"  " + json.dumps(b).encode()
        for a, b in zip(_typed()[::2], _typed()[1::2], strict=True)
    ),  # and no final newline
    "utf8_bom_crlf": lambda: b"\xef\xbb\xbf" + _jsonl(_typed()).replace(b"\n", b"\r\n"),
    "lone_cr": lambda: _jsonl(_typed()).replace(b"\n", b"\r"),
    "utf16_le_bom_crlf": lambda: (
        b"\xff\xfe" + _jsonl(_typed()).decode().replace("\n", "\r\n").encode("utf-16-le")
    ),
    "utf16_be_bom": lambda: b"\xfe\xff" + _jsonl(_typed()).decode().encode("utf-16-be"),
    "utf16_le_no_bom": lambda: _jsonl(_typed()).decode().encode("utf-16-le"),
    "no_final_newline_blank_lines": lambda: b"\n\n" + _jsonl(_typed()).replace(b"\n", b"\n  \n").rstrip(),
}


def _check_nothing_lost(graph) -> None:
    assert graph.rejects.empty, graph.rejects["reason"].tolist()
    nodes = graph.nodes.set_index("node_id")
    assert sorted(nodes.index) == sorted(n for n, *_ in ENTITIES) and not nodes["is_stub"].any()
    for name, kind, observations, tags in ENTITIES:
        text = nodes.at[name, "text"]
        assert text.split("\n")[0] == f"{name} ({kind})"
        for observation in observations:
            if is_tag_line(observation):
                assert observation not in text.split("\n")  # parsed and removed
            else:
                assert observation in text.split("\n")  # prose kept, untouched
        assert json.loads(nodes.at[name, "tags_json"]) == tags and nodes.at[name, "n_tags"] == len(tags)
        assert parse_tags(text) == {}  # no tag line left in the training text
        assert nodes.at[name, "kind"] == kind and nodes.at[name, "n_observations"] == len(observations)
    assert sorted(map(tuple, graph.edges[["src", "dst", "relation"]].values.tolist())) == sorted(RELATIONS)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_reads_with_nothing_lost(tmp_path, shape):
    path = tmp_path / "memory.jsonl"
    path.write_bytes(SHAPES[shape]())
    graph = load_graph(f"jsonl:{path}")
    _check_nothing_lost(graph)
    # the same graph whatever the shape: the official file's texts and tags
    official = tmp_path / "official.jsonl"
    official.write_bytes(SHAPES["official"]())
    reference = load_graph(f"jsonl:{official}")
    key = ["node_id", "kind", "text", "tags_json"]
    assert (
        graph.nodes[key].sort_values("node_id").values.tolist()
        == reference.nodes[key].sort_values("node_id").values.tolist()
    )


def test_the_reader_records_what_it_found(tmp_path):
    def meta(shape: str) -> dict:
        path = tmp_path / f"{shape}.jsonl"
        path.write_bytes(SHAPES[shape]())
        return load_graph(f"jsonl:{path}").metadata

    assert {k: meta("official")[k] for k in ("format", "encoding", "line_endings")} == {
        "format": "jsonl",
        "encoding": "utf-8",
        "line_endings": "lf",
    }
    assert (meta("utf8_bom_crlf")["encoding"], meta("utf8_bom_crlf")["line_endings"]) == ("utf-8-sig", "crlf")
    assert (meta("utf16_le_bom_crlf")["encoding"], meta("utf16_le_bom_crlf")["line_endings"]) == (
        "utf-16-le",
        "crlf",
    )
    assert meta("utf16_be_bom")["encoding"] == "utf-16-be" and meta("lone_cr")["line_endings"] == "cr"
    assert (
        meta("document_pretty")["format"] == "json_document"
        and meta("array_pretty")["format"] == "json_array"
    )
    assert meta("aim_marker_line")["markers"] == [
        {"line": 1, "record": {"type": "_aim", "source": "mcp-knowledge-graph"}}
    ]


def test_line_numbers_of_each_shape(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(SHAPES["concatenated_on_one_line"]())
    graph = load_graph(f"jsonl:{path}")
    assert set(graph.nodes["source_line"]) == {1} and set(graph.edges["source_line"]) == {1}
    path.write_bytes(SHAPES["lone_cr"]())
    assert load_graph(f"jsonl:{path}").edges["source_line"].tolist() == [4, 5, 6]
    path.write_bytes(SHAPES["document_pretty"]())  # one document: numbered in record order, entities first
    graph = load_graph(f"jsonl:{path}")
    assert graph.nodes["source_line"].tolist() == [1, 2, 3] and graph.edges["source_line"].tolist() == [
        4,
        5,
        6,
    ]


# --------------------------------------------------------------------------------------------
# Fields, timestamps, markers
# --------------------------------------------------------------------------------------------


def test_timestamps_latest_observation_else_the_record_own(tmp_path):
    records = [
        {
            "_type": "entity",
            "name": "a",
            "entityType": "note",
            "_savedAt": "2030-01-01T00:00:00Z",
            "observations": [
                {"text": "one", "timestamp": "2025-05-11T15:54:05.242Z"},
                {"text": "two", "timestamp": "2025-06-01T08:00:00+02:00"},
                "three",
            ],
        },
        {
            "name": "b",
            "entityType": "note",
            "observations": ["x"],
            "createdAt": 1768061136,
            "updatedAt": 1768061141,
        },
        {
            "name": "c",
            "entityType": "note",
            "observations": ["y"],
            "updated_at": 1768061141500,
        },  # milliseconds
        {"name": "d", "entityType": "note", "observations": [{"text": "z", "timestamp": "not a time"}]},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    nodes = load_graph(f"jsonl:{path}").nodes.set_index("node_id")
    assert nodes.at["a", "updated_at"] == "2025-06-01T06:00:00.000Z"  # the later observation, in UTC
    assert nodes.at["b", "updated_at"] == "2026-01-10T16:05:41.000Z"  # updatedAt 1768061141 s
    assert nodes.at["c", "updated_at"] == "2026-01-10T16:05:41.500Z"
    assert pd.isna(nodes.at["d", "updated_at"])
    extra = json.loads(nodes.at["d", "extra_json"])
    assert extra == {"observations": [{"index": 1, "timestamp": "not a time"}]}  # kept, though not a time


def test_extra_fields_are_kept_on_nodes_and_edges(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(
        SHAPES["relation_key_aliases"]()
        + _jsonl([{**_typed()[0], "name": "Extra", "weight": 4, "tags": ["a", "b"], "meta": {"k": None}}])
    )
    graph = load_graph(f"jsonl:{path}")
    extra = json.loads(graph.nodes.set_index("node_id").at["Extra", "extra_json"])
    assert extra == {"record": {"weight": 4, "tags": ["a", "b"], "meta": {"k": None}}}
    assert [json.loads(e) for e in graph.edges["extra_json"]] == [{"record": {"weight": 6}}] * 3
    path.write_bytes(SHAPES["underscore_type_observation_objects"]())
    nodes = load_graph(f"jsonl:{path}").nodes.set_index("node_id")
    extra = json.loads(nodes.at["Ada Lovelace", "extra_json"])
    assert extra["record"] == {"_savedAt": "2025-05-13T16:26:31.968Z"}
    assert extra["observations"][0] == {"index": 1, "timestamp": STAMP, "version": "1.0"}
    assert len(extra["observations"]) == 4 and nodes.at["Ada Lovelace", "updated_at"] == STAMP


@pytest.mark.parametrize(
    "marker",
    [
        {"type": "_aim", "source": "mcp-knowledge-graph"},
        {"type": "metadata", "v": 2},
        {"_type": "_header", "written_by": "x"},
    ],
)
def test_marker_records_are_metadata_not_rejects(tmp_path, marker):
    path = tmp_path / "m.jsonl"
    path.write_bytes(_jsonl([*_typed()[:2], marker, *_typed()[2:]]))
    graph = load_graph(f"jsonl:{path}")
    assert graph.rejects.empty and graph.metadata["markers"] == [{"line": 3, "record": marker}]
    assert graph.summary()["markers"] == 1 and len(graph.nodes) == 3


def test_a_reject_names_what_it_found_and_what_was_expected(tmp_path):
    lines = [
        json.dumps({"foo": 1, "bar": 2}),
        json.dumps({"type": "person", "name": "x"}),
        json.dumps({"type": "relation", "from": "a", "relationType": "r"}),
        json.dumps({"name": "n", "entityType": "t", "observations": ["ok", 5]}),
        json.dumps({"type": "relation", "source": "a", "target": 7}),
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join([json.dumps(_typed()[0]), *lines]))
    reasons = load_graph(f"jsonl:{path}").rejects.set_index("line")["reason"].to_dict()
    assert reasons[2] == (
        "record has keys ['foo', 'bar']: expected an entity (name, entityType, observations) or "
        "a relation (from, to, relationType)"
    )
    assert reasons[3].startswith("unknown record type 'person' (record has keys ['type', 'name'])")
    assert "to=None" in reasons[4] and "['type', 'from', 'relationType']" in reasons[4]
    assert "observation 2 is 5, expected a string or an object with a 'text' string" in reasons[5]
    assert "to=7" in reasons[6]


def test_a_truncated_tail_record_is_a_reject_naming_it(tmp_path):
    path = tmp_path / "m.jsonl"
    good = json.dumps(_typed()[3])
    path.write_text(json.dumps(_typed()[0]) + "\n" + good + '{"type":"entity","n')
    graph = load_graph(f"jsonl:{path}")
    assert len(graph.edges) == 1 and graph.edges["source_line"].tolist() == [2]
    reject = graph.rejects.iloc[0]
    assert reject["line"] == 2 and reject["raw"] == '{"type":"entity","n'
    assert reject["reason"].startswith(
        "1 record(s) on this line, then text that is not a complete JSON record"
    )


# --------------------------------------------------------------------------------------------
# Nothing lost: merged entities, stub nodes
# --------------------------------------------------------------------------------------------


def test_same_name_entities_merge_first_type_wins_repeats_counted(tmp_path):
    records = [
        {
            "type": "entity",
            "name": "Compost",
            "entityType": "topic",
            "observations": ["Scraps go in the bin", "calm:4"],
        },
        {"type": "relation", "from": "Compost", "to": "Compost", "relationType": "feeds"},
        {
            "type": "entity",
            "name": "Compost",
            "entityType": "practice",
            "observations": ["Turn the pile every two weeks", "Scraps go in the bin", "calm:4"],
            "weight": 2,
        },
        {
            "type": "entity",
            "name": "Compost",
            "entityType": "topic",
            "observations": ["joy:9", "calm:7", "Scraps go in the bin"],
        },
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    graph = load_graph(f"jsonl:{path}")
    assert graph.rejects.empty and len(graph.nodes) == 1
    node = graph.nodes.iloc[0]
    assert node["kind"] == "topic" and node["source_line"] == 1
    assert node["text"] == "Compost (topic)\nScraps go in the bin\nTurn the pile every two weeks"
    assert json.loads(node["tags_json"]) == {"calm": 7, "joy": 9}  # later tag lines win
    assert (
        graph.summary()["duplicate_observations"] == 3
    )  # the repeated note twice, the repeated tag line once
    assert node["n_observations"] == 5
    assert json.loads(node["extra_json"])["merged"] == [
        {"line": 3, "entityType": "practice", "record": {"weight": 2}},
        {"line": 4},
    ]


def test_relations_to_missing_entities_get_stub_nodes_that_are_never_pairs(tmp_path):
    long = "A long enough observation about the garden and the raised beds in spring."
    records = [
        {"type": "entity", "name": f"n{i}", "entityType": "note", "observations": [long + f" ({i})", tag]}
        for i, tag in enumerate(["warmth:9", "joy:9", "warmth:9", "joy:9"])
    ]
    records += [
        {"type": "relation", "from": "n0", "to": "Task", "relationType": "contains"},
        {"type": "relation", "from": "Agent", "to": "n1", "relationType": "helps"},
        {"type": "relation", "from": "Agent", "to": "Task", "relationType": "does"},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    graph = load_graph(f"jsonl:{path}")
    stubs = graph.nodes[graph.nodes["is_stub"]]
    assert stubs[["node_id", "kind", "text", "tags_json", "n_tags", "source_line"]].values.tolist() == [
        ["Task", "stub", "Task", "{}", 0, 5],
        ["Agent", "stub", "Agent", "{}", 0, 6],
    ]
    assert len(graph.edges) == 3 and graph.rejects.empty and graph.summary()["stub_nodes"] == 2
    pairs = extract_training_pairs(graph, min_content_chars=1)
    assert len(pairs) and not set(pairs["node_id"]) & {"Task", "Agent"}
    # a stub is never an example, even if a table gave it tags
    tampered = graph.nodes.copy()
    tampered.loc[tampered["is_stub"], "tags_json"] = '{"warmth": 10, "joy": 10}'
    again = extract_training_pairs(graph_from_tables(tampered, graph.edges), min_content_chars=1)
    assert not set(again["node_id"]) & {"Task", "Agent"}


def test_node_text_format():
    assert (
        node_text("Attention Is All You Need", "paper", ["Year: 2017", "Has note: true"])
        == "Attention Is All You Need (paper)\nYear: 2017\nHas note: true"
    )
    assert node_text("x", "unknown", []) == "x" and node_text("x", "note", ["", "  "]) == "x (note)"


# --------------------------------------------------------------------------------------------
# Sources that hold nothing, or cannot be read
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "is empty (0 bytes)"),
        (b"  \n\n\t\r\n", "holds only whitespace"),
        (b"{}", "record has keys []"),
        (b"[]", "an empty JSON array"),
        (b'{\n  "entities": [],\n  "relations": []\n}\n', "no entity and no relation"),
        (b'{"entities": [], "relations": []}', "an empty graph document"),
        (b'{"type":"_aim","source":"mcp-knowledge-graph"}\n', "only 1 marker record"),
        (b"not json\nstill not\n", "2 record(s) rejected"),
        (b'{\n  "entities": [\n', "starts like one JSON document but is not valid JSON"),
    ],
)
def test_empty_sources_raise_naming_the_file_and_what_to_do(tmp_path, content, says):
    path = tmp_path / "memory.jsonl"
    path.write_bytes(content)
    with pytest.raises(MemorySourceError) as info:
        load_graph(f"jsonl:{path}")
    message = str(info.value)
    assert str(path) in message and says in message, message
    assert "CARL_MEMORY_SOURCE" in message and "'sample'" in message


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root reads any file")
def test_an_unreadable_file_raises_naming_it(tmp_path):
    path = tmp_path / "memory.jsonl"
    path.write_bytes(SHAPES["official"]())
    path.chmod(0)
    with pytest.raises(MemorySourceError, match="Permission denied"):
        load_graph(f"jsonl:{path}")


def test_a_file_that_says_utf16_but_is_not_is_one_clear_error(tmp_path):
    path = tmp_path / "memory.jsonl"
    path.write_bytes(
        b"\xff\xfe" + '{"type": "entity"'.encode("utf-16-le") + b"\x00\xd8\x41"
    )  # a lone surrogate
    with pytest.raises(MemorySourceError, match="UTF-16-LE.*save it as UTF-8"):
        load_graph(f"jsonl:{path}")


def test_a_stray_byte_order_mark_line_is_not_taken_for_utf16(tmp_path):
    path = tmp_path / "memory.jsonl"
    path.write_bytes(b"\xff\xfe\n" + SHAPES["official"]())
    graph = load_graph(f"jsonl:{path}")
    assert graph.rejects["line"].tolist() == [1] and "not valid UTF-8" in graph.rejects["reason"].item()
    assert len(graph.nodes) == 3 and len(graph.edges) == 3


def test_large_pretty_document_is_read(tmp_path: Path):
    document = {
        "entities": [
            {"name": f"e{i}", "entityType": "note", "observations": [f"note {i}", "calm:5"]}
            for i in range(2000)
        ],
        "relations": [{"from": f"e{i}", "to": f"e{i + 1}", "relationType": "next"} for i in range(1999)],
    }
    path = tmp_path / "memory.json"
    path.write_text(json.dumps(document, indent=2))
    graph = load_graph(f"jsonl:{path}")
    assert (len(graph.nodes), len(graph.edges), len(graph.rejects)) == (2000, 1999, 0)
    assert graph.summary()["tagged_nodes"] == 2000
