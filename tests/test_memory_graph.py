"""The memory graph library: tag parsing, JSONL ingestion with rejects, the sample graph, training pairs,
and the two memory assets with their checks."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from carl_assets import storage
from carl_assets.memory.graph import (
    EDGE_COLUMNS,
    NODE_COLUMNS,
    PAIR_COLUMNS,
    REJECT_COLUMNS,
    MemorySourceError,
    count_mentions,
    extract_training_pairs,
    graph_from_tables,
    load_graph,
    pair_counts,
    parse_tag_line,
    parse_tags,
    split_tag_line,
    tag_line_problems,
)
from carl_assets.memory.sample import sample_records, write_sample_jsonl

# --------------------------------------------------------------------------------------------
# Tags
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("warmth:9 clarity:10 frustration:2", {"warmth": 9, "clarity": 10, "frustration": 2}),
        ("frustration: 9 loneliness: 7", {"frustration": 9, "loneliness": 7}),  # one space after the colon
        ("  joy:3\t calm:0 \r", {"joy": 3, "calm": 0}),  # spaces, tabs, a trailing CR; 0 is a valid score
        ("warmth:10 warmth:3", {"warmth": 3}),  # later wins
        ("warmth:9\nand then some prose", {"warmth": 9}),  # any line can be a tag line
        ("a\nwarmth:9 joy:2\nb\nwarmth:4", {"warmth": 4, "joy": 2}),  # later lines win, per emotion
        ("A long day.\nWarmth:9 LOVE:8", {}),  # names are lower-case ASCII words: this is prose
        ("warmth:high clarity:10", {}),  # a near miss is prose as a whole (reported, see below)
        ("warmth:9 :9", {}),
        ("warmth:99 calm:0", {}),
        ("self-doubt:3 joy2:4 drop;table:5 self_doubt:6", {}),
        ("joy:-1", {}),
        ("joy:+3", {}),
        ("joy:7.5", {}),
        ("joy:07", {}),
        ("joy:010", {}),
        ("joy:  8", {}),
        ("joy:\u00b2", {}),
        ("\u00b2:0", {}),
        ("joy:\u0663", {}),
        ("j\u00f6y:3", {}),  # ASCII only
        ("joy:8warmth:9", {}),  # tokens are separated by white space
        ("Note: meeting at 10:30", {}),
        ("Time: 10:30", {}),
        ("10:30", {}),
        ("Year: 2023", {}),
        ("status:done", {}),
        ("URL: https://example.org/a?b=1", {}),
        ("https://example.org:8080/x", {}),
        ("", {}),
    ],
)
def test_parse_tags(text, expected):
    assert parse_tags(text) == expected
    assert (split_tag_line(text)[1] is not None) == bool(expected)


def test_near_miss_lines_name_each_bad_token_and_plain_prose_names_none():
    problems = dict(tag_line_problems("warmth:high :9 warmth:99 Self-Doubt:3 love:8 calm:07 joy:7.5"))
    assert list(problems) == ["warmth:high", ":9", "warmth:99", "Self-Doubt:3", "calm:07", "joy:7.5"]
    assert "not an integer" in problems["warmth:high"] and "not an integer" in problems["joy:7.5"]
    assert "missing emotion name" in problems[":9"]
    assert "outside 0..10" in problems["warmth:99"]
    assert "not a lower-case ASCII word" in problems["Self-Doubt:3"]
    assert "must be written 7" in problems["calm:07"]
    assert tag_line_problems("warmth:11") == [("warmth:11", "score 11 is outside 0..10")]
    for prose in [
        "status:done",
        "Year: 2023",
        "URL: https://x.org",
        "Time: 10:30",
        "localhost:8080",
        "10:30",
        "Warmth:9",
        "just prose here",
        "warmth:9 joy:8",
    ]:  # the last one is a tag line
        assert tag_line_problems(prose) == [], prose
    assert parse_tag_line("just prose here") is None
    assert parse_tag_line("joy:5 warmth: 9").tags == {"joy": 5, "warmth": 9}


@pytest.mark.parametrize(
    ("text", "emotion", "expected"),
    [
        ("I loved it. Love is LOVE, lovely.", "love", 4),
        ("a glove and a clover", "love", 0),  # whole words only
        ("self doubt, self_doubt and Self-Doubt", "self_doubt", 3),
        ("no mention here", "warmth", 0),
    ],
)
def test_count_mentions(text, emotion, expected):
    assert count_mentions(text, emotion) == expected


# --------------------------------------------------------------------------------------------
# JSONL ingestion and rejects
# --------------------------------------------------------------------------------------------


def _entity(name, kind, *observations):
    return json.dumps(
        {"type": "entity", "name": name, "entityType": kind, "observations": list(observations)}
    )


def _relation(src, dst, rel):
    return json.dumps({"type": "relation", "from": src, "to": dst, "relationType": rel})


LONG = "A fairly long observation that is comfortably over forty characters."

BAD_FILE_LINES = [
    _entity("a", "journal", LONG, "warmth:9 love:8"),  # 1
    _entity("b", "Lesson", "short", "frustration:3"),  # 2 (kind lower-cased)
    '{"type": "entity", "name": "broken"',  # 3 malformed JSON
    "",  # 4 blank: skipped silently
    json.dumps({"type": "widget", "name": "w"}),  # 5 unknown record type
    json.dumps({"type": "entity", "entityType": "journal", "observations": []}),  # 6 no name
    _entity("a", "journal", "a second a"),  # 7 same name: merged into line 1's node
    _entity("c", "pattern", LONG, "warmth:high joy:7 :9 calm:99"),  # 8 kept; near-miss line stays prose
    json.dumps(["not", "an", "object"]),  # 9 an array of three non-records
    _relation("a", "b", "teaches"),  # 10 good
    _relation("a", "ghost", "relates_to"),  # 11 kept, with a stub node 'ghost'
    _relation("a", "b", "teaches"),  # 12 duplicate relation
    json.dumps({"type": "entity", "name": "d", "entityType": "journal", "observations": "not a list"}),  # 13
    _relation("c", "a", "derived_from"),  # 14 good
]


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    path = tmp_path / "memory.jsonl"
    path.write_text("\n".join(BAD_FILE_LINES) + "\n")
    return path


def test_jsonl_keeps_valid_data_and_rejects_the_rest_with_line_and_reason(bad_file):
    graph = load_graph(f"jsonl:{bad_file}")
    assert list(graph.nodes.columns) == NODE_COLUMNS
    assert list(graph.edges.columns) == EDGE_COLUMNS
    assert list(graph.rejects.columns) == REJECT_COLUMNS
    assert graph.nodes["node_id"].tolist() == ["a", "b", "c", "ghost"]
    assert graph.nodes["kind"].tolist() == ["journal", "lesson", "pattern", "stub"]
    assert graph.nodes["is_stub"].tolist() == [False, False, False, True]
    assert graph.nodes["source_line"].tolist() == [1, 2, 8, 11]
    assert [json.loads(t) for t in graph.nodes["tags_json"]] == [
        {"love": 8, "warmth": 9},
        {"frustration": 3},
        {},
        {},
    ]
    assert graph.nodes["n_tags"].tolist() == [2, 1, 0, 0]
    assert graph.nodes["n_observations"].tolist() == [3, 2, 2, 0]
    assert graph.nodes[
        "text"
    ].tolist() == [  # name (kind), observations; tag lines stripped, near misses kept
        f"a (journal)\n{LONG}\na second a",
        "b (lesson)\nshort",
        f"c (pattern)\n{LONG}\nwarmth:high joy:7 :9 calm:99",
        "ghost",
    ]
    assert json.loads(graph.nodes["extra_json"].iloc[0]) == {"merged": [{"line": 7}]}
    assert graph.edges[["src", "dst", "relation", "source_line"]].values.tolist() == [
        ["a", "b", "teaches", 10],
        ["a", "ghost", "relates_to", 11],
        ["c", "a", "derived_from", 14],
    ]

    rejects = graph.rejects
    assert (rejects["source"] == f"jsonl:{bad_file}").all()
    by_line = rejects.groupby("line")["reason"].apply(list).to_dict()
    assert sorted(by_line) == [3, 5, 6, 8, 9, 12, 13]
    assert len(rejects) == 11  # line 8 has three bad tag tokens, line 9 three non-records
    assert "malformed JSON" in by_line[3][0]
    assert "unknown record type 'widget'" in by_line[5][0] and "['type', 'name']" in by_line[5][0]
    assert "without a name" in by_line[6][0]
    assert [r.split("'")[1] for r in by_line[8]] == ["warmth:high", ":9", "calm:99"]
    assert all("stays in the text" in r for r in by_line[8])
    assert [r.split(" of the JSON array")[0] for r in by_line[9]] == ["element 1", "element 2", "element 3"]
    assert "duplicate relation" in by_line[12][0]
    assert "observations" in by_line[13][0]
    assert rejects.loc[rejects["line"] == 3, "raw"].item() == BAD_FILE_LINES[2]
    summary = graph.summary()
    assert (
        summary["stub_nodes"] == 1
        and summary["merged_records"] == 1
        and summary["duplicate_observations"] == 0
    )


def test_unreadable_sources_raise_one_error_naming_the_source(tmp_path):
    for source in [
        f"jsonl:{tmp_path / 'missing.jsonl'}",
        f"jsonl:{tmp_path}",
        "jsonl:",
        "neo4j://x",
        "sample2",
    ]:
        with pytest.raises(MemorySourceError, match="cannot read memory source") as info:
            load_graph(source)
        assert source in str(info.value)
        assert isinstance(info.value, ValueError)


def test_emotion_names_reaching_the_tables_are_plain_words(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [
        _entity("x", "journal", LONG, "Warmth:9 x'y:9 a.b:3 ../etc:4 JOY:5"),  # prose: no name is a word
        _entity("y", "journal", LONG, "joy:5 ../etc:4"),  # near miss: reported, kept as prose
        _entity("z", "journal", LONG, "joy:5 calm:4"),
    ]
    path.write_text("\n".join(lines) + "\n")
    graph = load_graph(f"jsonl:{path}")
    assert graph.tags() == [{}, {}, {"calm": 4, "joy": 5}]
    assert graph.nodes["text"].tolist()[:2] == [
        f"x (journal)\n{LONG}\nWarmth:9 x'y:9 a.b:3 ../etc:4 JOY:5",
        f"y (journal)\n{LONG}\njoy:5 ../etc:4",
    ]
    assert graph.rejects["line"].tolist() == [2] and "'../etc:4'" in graph.rejects["reason"].item()


# --------------------------------------------------------------------------------------------
# The sample graph
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample():
    return load_graph("sample")


def test_sample_graph_is_deterministic(sample):
    again = load_graph("sample")
    pd.testing.assert_frame_equal(sample.nodes, again.nodes)
    pd.testing.assert_frame_equal(sample.edges, again.edges)
    assert storage.content_hash(sample.nodes, sample.edges) == storage.content_hash(again.nodes, again.edges)
    assert sample_records(seed=1) != sample_records()  # the seed matters


def test_sample_exports_as_jsonl_that_reads_back_the_same(sample, tmp_path):
    path = write_sample_jsonl(tmp_path / "sample.jsonl")
    assert len(path.read_text().splitlines()) == len(sample.nodes) + len(sample.edges)
    again = load_graph(f"jsonl:{path}")
    pd.testing.assert_frame_equal(again.nodes, sample.nodes)
    pd.testing.assert_frame_equal(again.edges, sample.edges)


def test_sample_graph_shape(sample):
    summary = sample.summary()
    assert 300 <= summary["nodes"] <= 600
    assert set(summary["kinds"]) == {"journal", "digest", "pattern", "reflection", "lesson"}
    assert min(summary["kinds"].values()) >= 30
    assert len(summary["emotions"]) >= 12
    assert summary["rejects"] == 0
    untagged = summary["nodes"] - summary["tagged_nodes"]
    assert 0.05 * summary["nodes"] <= untagged <= 0.25 * summary["nodes"]
    assert summary["edges"] >= summary["nodes"]
    names = set(sample.nodes["node_id"])
    assert sample.edges["src"].isin(names).all() and sample.edges["dst"].isin(names).all()
    assert sample.nodes["node_id"].is_unique
    lengths = sample.nodes["text"].str.len()
    assert (lengths > 40).mean() >= 0.95
    assert len(set(sample.texts())) == len(sample.texts())  # no two nodes share a text
    assert all(not parse_tags(t) for t in sample.texts())  # tag lines stripped


def _tag_matrix(graph):
    tags = [t for t in graph.tags() if t]
    emotions = sorted({e for t in tags for e in t})
    return emotions, np.array([[t.get(e, 0) for e in emotions] for t in tags], dtype=float)


def test_sample_emotions_co_occur_realistically(sample):
    emotions, scores = _tag_matrix(sample)
    corr = np.corrcoef(scores.T)
    i = emotions.index
    assert corr[i("warmth"), i("love")] > 0.4
    assert corr[i("frustration"), i("tiredness")] > 0.4
    assert corr[i("warmth"), i("frustration")] < 0.0
    present = scores > 0
    p_love = present[:, i("love")].mean()
    p_love_given_warmth = present[present[:, i("warmth")], i("love")].mean()
    assert p_love_given_warmth > 2 * p_love


def test_sample_wording_carries_the_emotion(sample):
    # A warm node talks about warm things: a few warm words are far more frequent in warm nodes.
    pairs = extract_training_pairs(sample)
    warm = pairs[pairs["emotion"] == "warmth"]
    words = r"\b(?:hug|soft|kind|cosy|glow|held|close|blanket|tea|soup)\w*"
    rate = warm.groupby("polarity")["text"].apply(lambda s: s.str.count(words, flags=2).mean())
    assert rate["positive"] > 3 * rate["negative"]


# --------------------------------------------------------------------------------------------
# Training pairs
# --------------------------------------------------------------------------------------------


def test_pairs_follow_the_rules(sample):
    pairs = extract_training_pairs(sample)
    assert list(pairs.columns) == PAIR_COLUMNS
    tags = dict(zip(sample.nodes["node_id"], sample.tags(), strict=True))
    counts = pair_counts(pairs)
    assert len(counts) >= 12
    assert (counts["positive"] > 0).all() and (counts["negative"] > 0).all()
    for row in pairs.itertuples():
        node_tags = tags[row.node_id]
        if row.polarity == "positive":
            assert node_tags[row.emotion] >= 8
        else:
            assert node_tags and row.emotion not in node_tags
            assert count_mentions(row.text, row.emotion) == 0
        assert len(row.text) >= 40
    assert not any(parse_tags(t) for t in pairs["text"])
    # no cap reached on the sample: every qualifying node is used
    positives = sum(1 for t in sample.tags() for s in t.values() if s >= 8)
    long_enough = set(sample.nodes.loc[sample.nodes["text"].str.len() >= 40, "node_id"])
    assert (pairs["polarity"] == "positive").sum() == positives - sum(
        1 for n, t in tags.items() if n not in long_enough for s in t.values() if s >= 8
    )


def test_pairs_caps_and_deterministic_sampling(sample):
    capped = extract_training_pairs(sample, max_examples_per_emotion=7, seed=3)
    counts = pair_counts(capped)
    assert (counts["positive"] == 7).all() and (counts["negative"] == 7).all()
    pd.testing.assert_frame_equal(capped, extract_training_pairs(sample, max_examples_per_emotion=7, seed=3))
    other = extract_training_pairs(sample, max_examples_per_emotion=7, seed=4)
    assert set(capped["node_id"]) != set(other["node_id"])
    # the capped sample is a subset of the uncapped pairs
    full = extract_training_pairs(sample)
    keys = set(zip(full["emotion"], full["polarity"], full["node_id"], strict=True))
    assert set(zip(capped["emotion"], capped["polarity"], capped["node_id"], strict=True)) <= keys


def test_pairs_options(tmp_path):
    lines = [
        _entity(
            "w1", "journal", "A cosy evening with tea and blankets, close to everyone.", "warmth:9 love:7"
        ),
        _entity("w2", "journal", "Held a soft hand at the door, and it glowed all day long.", "warmth:8"),
        _entity("w3", "journal", "A gentle, kind conversation in the kitchen after dinner.", "warmth:7"),
        _entity("n1", "journal", "The build failed again and the tests kept timing out.", "frustration:9"),
        _entity(
            "n2", "journal", "I wrote about warmth but felt none of it, only the cold rain.", "sadness:8"
        ),
        _entity("n3", "journal", "Short.", "frustration:4"),
        _entity("u1", "journal", "An untagged entry says nothing about how it felt that day."),
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines))
    graph = load_graph(f"jsonl:{path}")

    def ids(pairs, emotion, polarity):
        sel = pairs[(pairs["emotion"] == emotion) & (pairs["polarity"] == polarity)]
        return sorted(sel["node_id"])

    pairs = extract_training_pairs(graph)
    assert ids(pairs, "warmth", "positive") == ["w1", "w2"]
    assert ids(pairs, "warmth", "negative") == ["n1"]  # n2 names warmth, n3 too short, u1 untagged
    assert set(pairs["emotion"]) == {"warmth", "frustration", "sadness"}  # love: no score >= 8
    assert ids(extract_training_pairs(graph, min_positive_score=7), "warmth", "positive") == [
        "w1",
        "w2",
        "w3",
    ]
    assert ids(extract_training_pairs(graph, max_negative_mentions=1), "warmth", "negative") == ["n1", "n2"]
    assert ids(extract_training_pairs(graph, min_content_chars=5), "warmth", "negative") == ["n1", "n3"]
    assert extract_training_pairs(graph, min_positive_score=11).empty
    assert list(extract_training_pairs(graph, min_positive_score=11).columns) == PAIR_COLUMNS


def test_graph_round_trips_through_duckdb(sample, tmp_path):
    db = tmp_path / "carl.duckdb"
    storage.write_tables(
        db, {"memory_nodes": sample.nodes, "memory_edges": sample.edges, "memory_rejects": sample.rejects}
    )
    storage.write_tables(
        db, {"emotion_training_pairs": extract_training_pairs(sample, min_positive_score=11)}
    )
    with storage.connect(db, read_only=True) as con:
        types = {
            table: dict(
                con.execute(
                    "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ?",
                    [table],
                ).fetchall()
            )
            for table in ["memory_nodes", "memory_edges", "memory_rejects", "emotion_training_pairs"]
        }
    assert types["memory_nodes"] == {
        "node_id": "VARCHAR",
        "kind": "VARCHAR",
        "text": "VARCHAR",
        "tags_json": "VARCHAR",
        "n_tags": "INTEGER",
        "source_line": "INTEGER",
        "is_stub": "BOOLEAN",
        "n_observations": "INTEGER",
        "updated_at": "VARCHAR",
        "extra_json": "VARCHAR",
    }
    assert types["memory_edges"] == {
        "src": "VARCHAR",
        "dst": "VARCHAR",
        "relation": "VARCHAR",
        "source_line": "INTEGER",
        "extra_json": "VARCHAR",
    }
    # empty tables keep their column types
    assert types["memory_rejects"] == {
        "source": "VARCHAR",
        "line": "INTEGER",
        "reason": "VARCHAR",
        "raw": "VARCHAR",
    }
    assert set(types["emotion_training_pairs"].values()) == {"VARCHAR"}
    rebuilt = graph_from_tables(
        storage.read_table(db, "memory_nodes"),
        storage.read_table(db, "memory_edges"),
        storage.read_table(db, "memory_rejects"),
    )
    assert rebuilt.texts() == sample.texts()
    pd.testing.assert_frame_equal(
        extract_training_pairs(rebuilt, seed=1), extract_training_pairs(sample, seed=1)
    )


def test_new_columns_round_trip_through_duckdb_and_old_tables_still_read(tmp_path):
    records = [
        {
            "_type": "entity",
            "name": "n1",
            "entityType": "journal",
            "observations": [
                {"text": LONG, "timestamp": "2025-05-11T15:54:05.242Z", "version": "1.0"},
                "warmth:9",
            ],
            "weight": 3,
        },
        {
            "type": "relation",
            "from": "n1",
            "to": "ghost",
            "relationType": "mentions",
            "createdAt": 1768061136,
        },
        {"type": "entity", "name": "n2", "entityType": "journal", "observations": [LONG + " Two.", "calm:8"]},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    graph = load_graph(f"jsonl:{path}")
    assert graph.nodes["node_id"].tolist() == ["n1", "ghost", "n2"] and graph.nodes["is_stub"].tolist() == [
        False,
        True,
        False,
    ]
    db = tmp_path / "carl.duckdb"
    storage.write_tables(db, {"memory_nodes": graph.nodes, "memory_edges": graph.edges})
    nodes, edges = storage.read_table(db, "memory_nodes"), storage.read_table(db, "memory_edges")
    rebuilt = graph_from_tables(nodes, edges)
    assert (
        rebuilt.nodes.astype(object).where(rebuilt.nodes.notna(), None).values.tolist()
        == graph.nodes.astype(object).where(graph.nodes.notna(), None).values.tolist()
    )
    assert rebuilt.edges.astype(str).values.tolist() == graph.edges.astype(str).values.tolist()
    assert rebuilt.nodes["updated_at"].tolist()[0] == "2025-05-11T15:54:05.242Z"
    pd.testing.assert_frame_equal(
        extract_training_pairs(rebuilt, min_content_chars=10),
        extract_training_pairs(graph, min_content_chars=10),
    )
    # tables written before the new columns existed read with their defaults
    old = graph_from_tables(
        nodes[["node_id", "kind", "text", "tags_json", "n_tags", "source_line"]],
        edges[["src", "dst", "relation", "source_line"]],
    )
    assert list(old.nodes.columns) == NODE_COLUMNS and list(old.edges.columns) == EDGE_COLUMNS
    assert old.nodes["is_stub"].tolist() == [False] * 3 and old.nodes["extra_json"].tolist() == ["{}"] * 3


# --------------------------------------------------------------------------------------------
# The assets and their checks
# --------------------------------------------------------------------------------------------


def _materialize(home, run_config=None):
    from carl_assets.defs import memory
    from carl_assets.defs.resources import build_resources
    from tests.upstreams import with_upstreams

    return dg.materialize(
        with_upstreams(memory.memory_graph, memory.emotion_training_pairs),
        resources=build_resources(home),
        run_config=run_config or {},
        raise_on_error=False,
    )


def test_assets_materialize_the_sample_with_passing_checks(tmp_path):
    config = {"ops": {"emotion_training_pairs": {"config": {"max_examples_per_emotion": 20, "seed": 2}}}}
    result = _materialize(tmp_path, config)
    assert result.success
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["memory_graph_is_consistent"].passed
    assert checks["pairs_nonempty_within_caps"].passed
    assert checks["pairs_nonempty_within_caps"].metadata["cap"].value == 20
    meta = result.asset_materializations_for_node("memory_graph")[0].metadata
    assert meta["nodes"].value == 420 and meta["rejects"].value == 0
    db = tmp_path / storage.DATABASE_NAME
    pairs = storage.read_table(db, "emotion_training_pairs")
    assert list(pairs.columns) == PAIR_COLUMNS
    assert pair_counts(pairs)[["positive", "negative"]].to_numpy().max() == 20
    pd.testing.assert_frame_equal(
        pairs,
        extract_training_pairs(load_graph("sample"), max_examples_per_emotion=20, seed=2),
        check_dtype=False,
    )


def test_pairs_check_blocks_when_no_pairs(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(_entity("a", "journal", LONG) + "\n" + _entity("b", "journal", LONG, "warmth:9") + "\n")
    result = _materialize(
        tmp_path / "home", {"ops": {"memory_graph": {"config": {"source": f"jsonl:{path}"}}}}
    )
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["memory_graph_is_consistent"].passed
    assert not checks["pairs_nonempty_within_caps"].passed
    assert checks["pairs_nonempty_within_caps"].metadata["rows"].value == 0


def test_unreadable_source_fails_the_asset_with_the_source_named(tmp_path):
    source = f"jsonl:{tmp_path / 'nowhere.jsonl'}"
    result = _materialize(tmp_path / "home", {"ops": {"memory_graph": {"config": {"source": source}}}})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    error = failure.event_specific_data.error
    cause = error.cause or error
    # the library raises MemorySourceError; the asset may turn it into a dg.Failure that says what stays
    assert cause.cls_name in ("MemorySourceError", "Failure")
    assert source in cause.message or source in str(failure.event_specific_data.error.message)


def test_pair_config_changes_the_data_version(tmp_path):
    from carl_assets.defs import memory
    from carl_assets.defs.resources import build_resources
    from tests.upstreams import with_upstreams

    resources = build_resources(tmp_path)
    assert dg.materialize([memory.memory_graph], resources=resources).success

    def version(seed: int) -> str:
        result = dg.materialize(
            with_upstreams(memory.memory_graph, memory.emotion_training_pairs),
            selection=["emotion_training_pairs"],
            resources=resources,
            run_config={
                "ops": {"emotion_training_pairs": {"config": {"seed": seed, "max_examples_per_emotion": 10}}}
            },
        )
        return (
            result.asset_materializations_for_node("emotion_training_pairs")[0].metadata["data_version"].value
        )

    first = version(1)
    assert version(1) == first
    assert version(2) != first
