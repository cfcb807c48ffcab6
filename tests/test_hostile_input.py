"""Hostile input: malformed and adversarial memory graphs, non-finite logits, dangerous model folders,
misbehaving MCP servers, and a 100 MB memory file.

Memory-graph accounting rule (see `carl_assets.memory.graph`): every non-blank line is a node, an
edge or a reject — nothing is lost; blank lines are padding and appear nowhere.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carl_assets import storage
from carl_assets.memory.graph import (
    EMOTION_NAME,
    TAG_TOKEN,
    MemorySourceError,
    extract_training_pairs,
    graph_from_mcp_graph,
    is_tag_line,
    load_graph,
    parse_tag_line,
    read_jsonl,
    tag_line_problems,
)

# ============================================================================================
# Memory graph: a property test over JSONL lines and tag lines
# ============================================================================================

HOSTILE_WORDS = [
    "../../x",
    "..",
    "/etc/passwd",
    "x'; DROP TABLE memory_nodes;--",
    "'",
    '"',
    "Robert'); --",
    "a\nb",
    "\r\n",
    "\x00",
    "\u2028",
    "\ufeff",
    "\u202e",
    "Joy",
    "joy",
    "self-doubt",
    "😀",
    "\\",
    "%s",
    "{}",
    "NaN",
    "",
    " ",
    "warmth",
    "x" * 300,
]
# any characters, lone surrogates included (a JSON escape like "\ud800" produces one)
any_text = st.one_of(
    st.text(st.characters(codec=None, categories=None), max_size=30),
    st.sampled_from(HOSTILE_WORDS),
)
tag_name = st.one_of(
    st.sampled_from(
        [
            "warmth",
            "joy",
            "clarity",
            "self_doubt",
            "Love",
            "../../x",
            "o'neil",
            '"joy"',
            "joy;drop",
            "x\u0301",
            "",
            "9lives",
        ]
    ),
    st.text(st.characters(exclude_characters=":"), max_size=12),
).filter(lambda name: ":" not in name and not any(c.isspace() for c in name))
tag_value = st.one_of(st.integers(-3, 14).map(str), st.sampled_from(["high", "", "1e3", "07", "٣"]))
tag_line = st.lists(
    st.tuples(tag_name, tag_value).map(lambda t: f"{t[0]}:{t[1]}"), min_size=1, max_size=5
).map(" ".join)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), any_text)


@st.composite
def entity(draw, names: list[str]) -> dict:
    name = draw(st.one_of(any_text, json_scalar, *([st.sampled_from(names)] if names else [])))
    observations = draw(
        st.one_of(st.lists(any_text, max_size=3), json_scalar, st.lists(json_scalar, max_size=2))
    )
    if isinstance(observations, list) and draw(st.booleans()):
        observations = [*observations, draw(tag_line)]
    record = {
        "type": "entity",
        "name": name,
        "entityType": draw(st.one_of(any_text, json_scalar)),
        "observations": observations,
    }
    if isinstance(name, str):
        names.append(name)
    for key in draw(st.sets(st.sampled_from(["name", "entityType", "observations"]), max_size=1)):
        del record[key]
    return record


@st.composite
def relation(draw, names: list[str]) -> dict:
    end = st.sampled_from(names) if names else any_text
    return {
        "type": "relation",
        "from": draw(st.one_of(end, json_scalar)),
        "to": draw(st.one_of(end, json_scalar)),
        "relationType": draw(st.one_of(st.sampled_from(["relates_to", "'; --"]), any_text, json_scalar)),
    }


def _encode(text: str) -> bytes:
    # surrogatepass: a lone surrogate written raw makes a line that is not valid UTF-8
    return text.encode("utf-8", "surrogatepass")


@st.composite
def jsonl_lines(draw) -> tuple[list[bytes], list[dict]]:
    """Lines of a memory file (bytes, no newline inside) and the records among them, in order."""
    names: list[str] = []
    lines: list[bytes] = []
    records: list[dict] = []
    for _ in range(draw(st.integers(0, 14))):
        kind = draw(
            st.sampled_from(["entity", "entity", "relation", "relation", "garbage", "blank", "other"])
        )
        if kind in ("entity", "relation"):
            record = draw(entity(names) if kind == "entity" else relation(names))
            records.append(record)
            lines.append(_encode(json.dumps(record, ensure_ascii=draw(st.booleans()))))
        elif kind == "garbage":
            lines.append(
                draw(
                    st.one_of(
                        st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
                        any_text.map(lambda t: _encode(t.replace("\n", " "))),
                        st.sampled_from(
                            [
                                b'{"type": "entity", "name": "cut',
                                b"[" * 5000,
                                b"1" * 5000,
                                b"NaN",
                                b"[]",
                                b'"entity"',
                                b'{"type": null}',
                                b"\xef\xbb\xbf{}",
                                b"\xff\xfe",
                                b"{}\r",
                            ]
                        ),
                        json_scalar.map(lambda v: _encode(json.dumps(v))),
                    )
                )
            )
        elif kind == "blank":
            lines.append(draw(st.sampled_from([b"", b"   ", b"\t", b"\r"])))
        else:
            lines.append(_encode(json.dumps({"type": draw(any_text), "name": "x"})))
    return lines, records


def _is_blank(line: bytes) -> bool:
    try:
        return not line.removesuffix(b"\r").decode("utf-8").strip()
    except UnicodeDecodeError:
        return False


def _check_accounting(graph, lines: list[bytes]) -> None:
    # a byte-order mark opening the file is not data (line 1 may be only that)
    expected = {
        i
        for i, line in enumerate(lines, start=1)
        if not _is_blank(line.removeprefix(b"\xef\xbb\xbf") if i == 1 else line)
    }
    real = ~graph.nodes["is_stub"]
    node_lines = graph.nodes.loc[real, "source_line"].tolist()
    merged_lines = [
        m["line"] for extra in graph.nodes["extra_json"] for m in json.loads(extra).get("merged", [])
    ]
    edge_lines = graph.edges["source_line"].tolist()
    marker_lines = [m["line"] for m in graph.metadata["markers"]]
    reject_lines = set(graph.rejects["line"].tolist())
    ingested = set(node_lines) | set(merged_lines) | set(edge_lines) | set(marker_lines)
    every = node_lines + merged_lines + edge_lines + marker_lines
    assert len(every) == len(set(every))  # one record a line in these files: each line lands in one place
    assert ingested | reject_lines == expected  # nothing lost, nothing invented
    # every stub is a name some edge points at, and no entity has it
    stubs = set(graph.nodes.loc[~real, "node_id"])
    assert stubs <= set(graph.edges["src"]) | set(graph.edges["dst"])
    assert not stubs & set(graph.nodes.loc[real, "node_id"])
    for line, reason in zip(graph.rejects["line"], graph.rejects["reason"], strict=True):
        assert reason.strip()
        if line in ingested:  # a kept entity's near-miss tag tokens are the only rejects of an ingested line
            assert line in set(node_lines) | set(merged_lines) and reason.startswith("bad tag token"), reason


@pytest.fixture(scope="module")
def memory_db():
    import duckdb

    with duckdb.connect(":memory:") as con:
        yield con


def _check_tables_hold(graph, con) -> None:
    """Every table writes to DuckDB (the asset's bulk write; in memory, so no fsync per example) and
    reads back unchanged; every emotion is a plain word."""
    for name, df in {
        "memory_nodes": graph.nodes,
        "memory_edges": graph.edges,
        "memory_rejects": graph.rejects,
    }.items():
        storage.write_table(con, name, df)
        back = con.execute(f'SELECT * FROM "{name}"').df()
        assert back.astype(str).values.tolist() == df.astype(str).values.tolist(), name
    for tags in graph.tags():
        assert all(EMOTION_NAME.fullmatch(name) and 0 <= score <= 10 for name, score in tags.items()), tags


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(generated=jsonl_lines(), crlf=st.booleans())
def test_every_jsonl_line_is_ingested_or_rejected_with_a_reason(memory_db, generated, crlf):
    lines, records = generated
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "memory.jsonl"
        ending = b"\r\n" if crlf else b"\n"
        path.write_bytes(ending.join(lines) + (ending if lines else b""))
        graph = read_jsonl(path)
        _check_accounting(graph, lines)
        if graph.nodes.empty:  # no entity and no relation: load_graph refuses the source, naming it
            with pytest.raises(MemorySourceError, match=re.escape(str(path))):
                load_graph(f"jsonl:{path}")
        _check_tables_hold(graph, memory_db)
        # the same records from a live server's read_graph: no crash, each one ingested or rejected
        live = graph_from_mcp_graph(
            {
                "entities": [r for r in records if r["type"] == "entity"],
                "relations": [r for r in records if r["type"] == "relation"],
            },
            "mcp+test",
        )
        merged = {
            m["line"] for extra in live.nodes["extra_json"] for m in json.loads(extra).get("merged", [])
        }
        assert set(live.nodes.loc[~live.nodes["is_stub"], "source_line"]) | merged | set(
            live.edges["source_line"]
        ) | set(live.rejects["line"]) == set(range(1, len(records) + 1))
        _check_tables_hold(live, memory_db)


# tokens drawn around the grammar's edges: valid ones, capitalised names, signs, leading zeros, non-ASCII
# digits that str.isdigit() accepts ('²', '٣'), a space after the colon, URLs and clock times
edge_token = st.one_of(
    st.tuples(tag_name, tag_value).map(lambda t: f"{t[0]}:{t[1]}"),
    st.tuples(
        st.sampled_from(["joy", "warmth", "self_doubt", "a", "Joy", "x" * 64, "x" * 65]),
        st.sampled_from(["0", "9", "10", " 9", "  9", "11", "²", "٣", "-0", "07", "9.0", "done"]),
    ).map(lambda t: f"{t[0]}:{t[1]}"),
    st.sampled_from(["²:0", "https://example.org/x", "10:30", "status:done", "Year:", "2023", "URL:"]),
)
any_tag_line = st.tuples(
    st.lists(edge_token, min_size=1, max_size=5),
    st.sampled_from([" ", "\t", "  "]),
    st.sampled_from(["", " ", "\r", "\t"]),
).map(lambda t: t[1].join(t[0]) + t[2])


def _oracle(line: str) -> dict[str, int] | None:
    """The tags of `line` by the grammar's own definitions (TAG_TOKEN), applied token by token: None
    unless every white-space separated token (a "name:" token may take the next one as its score) is a
    TAG_TOKEN; later tokens win."""
    words = line.replace("\t", " ").replace("\r", " ").split(" ")
    words = [w for w in words if w]
    tags: dict[str, int] = {}
    i = 0
    while i < len(words):
        word = words[i]
        spaced = f"{word} {words[i + 1]}" if word.endswith(":") and i + 1 < len(words) else None
        if TAG_TOKEN.fullmatch(word):
            match, i = TAG_TOKEN.fullmatch(word), i + 1
        elif spaced and TAG_TOKEN.fullmatch(spaced) and f"{word} {words[i + 1]}" in line:
            match, i = TAG_TOKEN.fullmatch(spaced), i + 2
        else:
            return None
        tags[match["name"]] = int(match["score"])
    return tags or None


@settings(max_examples=200, deadline=None)
@given(any_tag_line)
def test_tag_lines_follow_the_one_grammar(line):
    parsed = parse_tag_line(line)
    expected = _oracle(line)
    assert is_tag_line(line) == (expected is not None)
    assert (parsed.tags if parsed else None) == expected
    if parsed is not None:
        for name, score in parsed.tags.items():
            assert EMOTION_NAME.fullmatch(name) and name.isascii() and 0 <= score <= 10
        assert tag_line_problems(line) == []  # a tag line is never reported
    for token, reason in tag_line_problems(line):  # a near miss names tokens of the line, with a reason
        assert token in line and reason


@pytest.mark.parametrize("line", ["²:0", "joy:²", "joy:٣", "ｊｏｙ:3", "joy:３"])
def test_non_ascii_digits_and_letters_are_never_tags(line):
    assert parse_tag_line(line) is None and _oracle(line) is None


# --------------------------------------------------------------------------------------------
# Named hostile cases
# --------------------------------------------------------------------------------------------

TEXT = "A long enough journal entry about a quiet morning and an old letter, written with care."


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


def _entity(name: str, *observations: str) -> dict:
    return {"type": "entity", "name": name, "entityType": "journal", "observations": list(observations)}


@pytest.mark.parametrize(
    "bad_name",
    ["../../x", "../../../etc/passwd", "o'neil", '"joy"', "joy';DROP", "joy\\x", "x'||'", "%2e%2e", "-"],
)
def test_path_and_sql_emotion_names_never_become_tags(tmp_path, bad_name):
    records = [
        _entity("n1", TEXT, f"{bad_name}:9 warmth:9"),
        _entity("n2", TEXT, f"{bad_name}:9"),
        _entity("n3", TEXT + " plain", "clarity:9"),
        _entity("n4", TEXT + " more", "joy:9"),
    ]
    graph = load_graph(f"jsonl:{_write_jsonl(tmp_path / 'm.jsonl', records)}")
    tags = dict(zip(graph.nodes["node_id"], graph.tags(), strict=True))
    assert tags == {"n1": {}, "n2": {}, "n3": {"clarity": 9}, "n4": {"joy": 9}}
    # n1 is a near miss (it holds a valid token): kept as prose, the bad token reported; n2 is plain prose
    reasons = graph.rejects.set_index("line")["reason"]
    assert list(reasons.index) == [1]
    assert "is not a lower-case ASCII word" in reasons[1] and "stays in the text" in reasons[1]
    texts = dict(zip(graph.nodes["node_id"], graph.nodes["text"], strict=True))
    assert texts["n1"] == f"n1 (journal)\n{TEXT}\n{bad_name}:9 warmth:9"
    assert texts["n2"] == f"n2 (journal)\n{TEXT}\n{bad_name}:9"
    pairs = extract_training_pairs(graph, min_content_chars=10)
    assert set(pairs["emotion"]) == {"clarity", "joy"}
    assert all(EMOTION_NAME.fullmatch(e) for e in pairs["emotion"])


def test_emotion_name_pattern_has_no_trailing_newline_loophole():
    assert EMOTION_NAME.match("joy") and not EMOTION_NAME.match("joy\n") and not EMOTION_NAME.match("../x")
    assert parse_tag_line("joy:5 ../../x:9") is None  # not a tag line: one token is not name:score
    assert [t for t, _ in tag_line_problems("joy:5 ../../x:9")] == ["../../x:9"]
    assert (
        parse_tag_line("Time: 10:30") is None and tag_line_problems("Time: 10:30") == []
    )  # prose stays prose


def test_node_names_with_newlines_quotes_and_nul_round_trip_through_duckdb(tmp_path):
    names = [
        "line one\nline two",
        'it\'s "quoted"; DROP TABLE memory_nodes;--',
        "nul\x00inside",
        "cr\r\nlf",
        "\u202eevil",
        "tab\there",
    ]
    records = [_entity(n, TEXT, "warmth:9") for n in names]
    records += [{"type": "relation", "from": names[0], "to": names[1], "relationType": "a\nb'c"}]
    graph = load_graph(f"jsonl:{_write_jsonl(tmp_path / 'm.jsonl', records)}")
    assert graph.nodes["node_id"].tolist() == names and graph.rejects.empty
    assert graph.edges[["src", "dst", "relation"]].values.tolist() == [[names[0], names[1], "a\nb'c"]]
    db = tmp_path / "carl.duckdb"
    storage.write_tables(db, {"memory_nodes": graph.nodes, "memory_edges": graph.edges})
    assert storage.read_table(db, "memory_nodes")["node_id"].tolist() == names
    assert storage.read_table(db, "memory_edges")["relation"].tolist() == ["a\nb'c"]


def test_lone_surrogates_and_invalid_utf8_are_rejects_not_broken_tables(tmp_path):
    path = tmp_path / "m.jsonl"
    good = json.dumps(_entity("good", TEXT)).encode()
    escaped = b'{"type": "entity", "name": "bad\\ud800", "entityType": "journal", "observations": []}'
    raw_bytes = b'{"type": "entity", "name": "latin1 caf\xe9", "entityType": "journal", "observations": []}'
    relation = b'{"type": "relation", "from": "good", "to": "good", "relationType": "x\\udfff"}'
    path.write_bytes(b"\n".join([good, escaped, raw_bytes, relation]) + b"\n")
    graph = load_graph(f"jsonl:{path}")
    assert graph.nodes["node_id"].tolist() == ["good"] and graph.edges.empty
    reasons = graph.rejects.set_index("line")["reason"].to_dict()
    assert "not valid Unicode" in reasons[2] and "surrogates not allowed" in reasons[2]
    assert reasons[3] == f"not valid UTF-8 at byte {raw_bytes.index(0xE9)}"
    assert "not valid Unicode" in reasons[4]
    storage.write_tables(tmp_path / "carl.duckdb", {"memory_rejects": graph.rejects})


def test_huge_names_are_cut_in_reasons(tmp_path):
    name = "n" * 100_000
    records = [_entity("ok", TEXT), {**_entity(name, TEXT), "entityType": 5}]
    graph = load_graph(f"jsonl:{_write_jsonl(tmp_path / 'm.jsonl', records)}")
    reason = graph.rejects["reason"].iloc[0]
    assert reason.startswith("entity 'nnn") and "entityType is 5" in reason and len(reason) < 300
    assert len(graph.rejects["raw"].iloc[0]) == 2000


def test_a_folder_as_source_is_a_clear_error(tmp_path):
    with pytest.raises(
        MemorySourceError, match=re.escape(f"{str(tmp_path)!r} is a folder, not a JSONL file")
    ):
        load_graph(f"jsonl:{tmp_path}")
    with pytest.raises(MemorySourceError, match="no such file"):
        load_graph(f"jsonl:{tmp_path / 'missing.jsonl'}")


def test_line_numbers_count_newlines_only(tmp_path):
    # a "\r" or U+2028 inside a line is not a line break (the memory server splits on "\n")
    path = tmp_path / "m.jsonl"
    first = json.dumps(_entity("a", "one\u2028two"), ensure_ascii=False)
    path.write_bytes(
        b"\xef\xbb\xbf"
        + first.encode()
        + b"\r\n"
        + b"garbage\rmore\n\n"
        + json.dumps(_entity("b", TEXT)).encode()
        + b"\n"
    )
    graph = load_graph(f"jsonl:{path}")
    assert graph.nodes["source_line"].tolist() == [1, 4]
    assert graph.rejects["line"].tolist() == [2]


# --------------------------------------------------------------------------------------------
# A 100 MB memory file in bounded memory
# --------------------------------------------------------------------------------------------

MEASURE_LOAD = """
import json, resource, sys, time, tracemalloc
from pathlib import Path
from carl_assets.memory.graph import load_graph

def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

try:  # reset the high-water mark to the current RSS, so the peak is the load's own
    Path("/proc/self/clear_refs").write_text("5")
    peak_of = lambda: status_mb("VmHWM")
except OSError:
    peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = status_mb("VmRSS")
# tracemalloc sees Python objects only (not Arrow buffers): the copies of text the loader makes. Its
# own bookkeeping counts in the RSS peak, which only makes that bound stricter.
tracemalloc.start()
started = time.perf_counter()
graph = load_graph("jsonl:" + sys.argv[1])
seconds = time.perf_counter() - started
python_peak = tracemalloc.get_traced_memory()[1] / 2**20
peak_extra = peak_of() - before
frames = (graph.nodes, graph.edges, graph.rejects)
tables_mb = sum(int(df.memory_usage(deep=True).sum()) for df in frames) / 2**20
rows = {"nodes": len(graph.nodes), "edges": len(graph.edges), "rejects": len(graph.rejects)}
print(json.dumps({"peak_extra_mb": peak_extra, "tables_mb": tables_mb, "python_peak_mb": python_peak,
                  "seconds": seconds, **rows}))
"""


def _write_big_jsonl(path: Path, target_bytes: int) -> int:
    """A memory-server file of about `target_bytes`: 3 entities (2 observations + a tag line, ~1 KB) to 1
    relation, plus a bad line every 5,000 lines. Returns the number of lines."""
    import random

    rng = random.Random(0)
    words = "the agent reads a page quiet morning letter warmth clarity journal note kitchen garden".split()
    sentences = [" ".join(rng.choices(words, k=80)) for _ in range(64)]  # drawn from, not made per line
    size = lines = entities = 0
    with path.open("w", encoding="utf-8") as handle:
        while size < target_bytes:
            lines += 1
            if lines % 5000 == 0:
                line = '{"type": "entity", "name": "cut off'
            elif entities < 2 or rng.random() < 0.75:
                observations = [sentences[rng.randrange(64)], sentences[rng.randrange(64)]]
                observations.append(f"warmth:{rng.randint(0, 10)} clarity:{rng.randint(0, 10)}")
                line = json.dumps(_entity(f"node-{entities}", *observations))
                entities += 1
            else:
                line = json.dumps(
                    {
                        "type": "relation",
                        "from": f"node-{rng.randrange(entities)}",
                        "to": f"node-{rng.randrange(entities)}",
                        "relationType": "relates_to",
                    }
                )
            handle.write(line + "\n")
            size += len(line) + 1
    return lines


@pytest.mark.slow
def test_a_100_mb_file_is_ingested_in_bounded_memory(tmp_path):
    """What is bounded: the Python objects alive at any moment stay under 0.5x the file — it is streamed
    line by line and node rows move into Arrow in chunks, so no whole-file copy (a `read_text()`, a list
    of every line or row) ever exists; and the load's peak extra resident memory stays under 3x the
    output tables, which are themselves O(file) (a node's text is most of its line). Measured: Python
    peak 0.36x the file; RSS 1.8x the tables (2.3x with tracemalloc's own bookkeeping, as here), where
    keeping every row as Python objects until the end peaked at 3.9x."""
    import subprocess
    import sys

    path = tmp_path / "memory.jsonl"
    n_lines = _write_big_jsonl(path, 100 * 2**20)
    file_mb = path.stat().st_size / 2**20
    child = subprocess.run(
        [sys.executable, "-c", MEASURE_LOAD, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"100 MB ingest: {file_mb:.1f} MB, {n_lines} lines, {result}")
    assert result["nodes"] + result["edges"] + result["rejects"] == n_lines  # nothing lost
    assert result["rejects"] == n_lines // 5000
    assert result["tables_mb"] > 0.8 * file_mb  # the tables really hold the text
    assert result["peak_extra_mb"] < 3.0 * result["tables_mb"]
    assert result["python_peak_mb"] < 0.5 * file_mb


# ============================================================================================
# A live MCP server that hangs, dies mid-read or answers garbage
# ============================================================================================

RAW_SERVER = Path(__file__).parent / "data" / "raw_stdio_memory_server.py"


def _raw_source(mode: str, marker: Path) -> str:
    import shlex
    import sys

    python, server = shlex.quote(sys.executable), shlex.quote(str(RAW_SERVER))
    return f"mcp+stdio:{python} {server} {mode} {shlex.quote(str(marker))}"


def test_a_server_that_hangs_in_read_graph_times_out_naming_source_and_timeout(tmp_path, monkeypatch):
    marker = tmp_path / "called"
    source = _raw_source("hang", marker)
    monkeypatch.setenv("CARL_MCP_TIMEOUT", "2")  # the way a user sets it; load_graph's timeout_s wins over it
    with pytest.raises(MemorySourceError) as info:
        load_graph(source)
    message = str(info.value)
    assert source in message and "no answer within 2 s" in message and "CARL_MCP_TIMEOUT" in message
    assert marker.read_text() == "hang"  # it was read_graph that hung, not the start-up


def test_a_server_that_dies_mid_read_is_a_clear_error_not_a_hang(tmp_path):
    marker = tmp_path / "called"
    source = _raw_source("die", marker)
    with pytest.raises(MemorySourceError) as info:
        load_graph(source, timeout_s=120)  # a hang would show as this timeout, not as the message below
    message = str(info.value)
    assert source in message and "closed the connection before answering" in message
    assert "killed while writing the graph" in message  # its stderr
    assert "no answer within" not in message and marker.read_text() == "die"


def test_a_server_that_answers_garbage_is_a_clear_error(tmp_path):
    source = _raw_source("garbage", tmp_path / "called")
    with pytest.raises(MemorySourceError, match="returned text that is not JSON .*'this is not a graph {'"):
        load_graph(source, timeout_s=60)


def test_bad_mcp_timeouts_are_refused(monkeypatch, tmp_path):
    from carl_assets.memory.mcp_source import mcp_timeout_s

    assert mcp_timeout_s(5) == 5.0
    monkeypatch.setenv("CARL_MCP_TIMEOUT", "7.5")
    assert mcp_timeout_s() == 7.5
    for bad in ("soon", "0", "-1", "nan"):  # from the environment: a warning naming it, then the default
        monkeypatch.setenv("CARL_MCP_TIMEOUT", bad)
        with pytest.warns(UserWarning, match=f"CARL_MCP_TIMEOUT='{bad}' ignored"):
            assert mcp_timeout_s() == 60.0
    with pytest.raises(ValueError, match="timeout_s"):
        mcp_timeout_s(float("inf"))


# ============================================================================================
# NaN and inf logits: every CARL entry point
# ============================================================================================


def _logits(T: int = 12, V: int = 40, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, V)) * 3.0, rng.integers(0, V, size=T)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_numpy_carl_names_the_first_nan_or_plus_inf(value):
    from carl_assets.carl import carl_reward, compute_phi

    logits, ids = _logits()
    logits[5, 7] = value
    logits[9, 2] = value
    for call in (lambda: compute_phi(logits), lambda: carl_reward(logits, ids)):
        with pytest.raises(ValueError, match=r"logits\[5, 7\] is (nan|inf).*2 NaN/\+inf"):
            call()


def test_minus_inf_is_an_impossible_token_not_an_error():
    import numpy as np

    from carl_assets.carl import carl_reward, compute_phi

    logits, ids = _logits()
    masked = logits.copy()
    masked[:, 30:] = -np.inf  # masked decoding: the last 10 tokens are impossible
    ids = ids % 30
    phi, probs, _ = compute_phi(masked)
    assert np.isfinite(phi).all() and (probs[:, 30:] == 0).all()
    # the same as the distribution over the first 30 tokens, seen with V = 40 (Phi divides by log 40)
    sub_phi, _, sub_entropy = compute_phi(logits[:, :30])
    np.testing.assert_allclose((1 - phi) * np.log(40), sub_entropy, rtol=1e-6)
    reward, parts = carl_reward(masked, ids)
    assert np.isfinite(reward) and all(np.isfinite(v) for v in parts.values())
    dead = masked.copy()
    dead[3] = -np.inf
    with pytest.raises(ValueError, match="row 3 of the logits is entirely -inf"):
        compute_phi(dead)


def test_phi_level_functions_refuse_nan_instead_of_scoring_it():
    import numpy as np

    from carl_assets.carl import cloud_quality, discontinuity_score, multiscale_coherence

    phi = np.linspace(0.1, 0.9, 8)
    phi[4] = np.nan
    probs = np.full((8, 4), 0.25)
    for call in (
        lambda: multiscale_coherence(phi),
        lambda: discontinuity_score(phi),
        lambda: cloud_quality(phi, probs, np.zeros(8, dtype=int)),
    ):
        with pytest.raises(ValueError, match=r"phi\[4\] is nan"):
            call()
    bad_probs = probs.copy()
    bad_probs[2, 0] = np.inf
    with pytest.raises(ValueError, match=r"probs\[2, 0\] is inf"):
        cloud_quality(np.linspace(0.1, 0.9, 8), bad_probs, np.zeros(8, dtype=int))


def test_batched_carl_names_the_position_and_ignores_padding():
    import torch

    from carl_assets.carl import carl_reward, carl_reward_batch
    from carl_assets.carl.batch import (
        carl_reward_from_stats,
        token_stats_from_hidden,
        token_stats_from_logits,
    )

    rows = [_logits(T, 40, seed) for T, seed in ((10, 1), (6, 2))]
    logits = torch.full((2, 10, 40), float("nan"), dtype=torch.float64)  # padding is NaN: must not matter
    ids = torch.full((2, 10), -100)
    mask = torch.zeros((2, 10), dtype=torch.long)
    for b, (lg, tk) in enumerate(rows):
        logits[b, : len(tk)] = torch.from_numpy(lg)
        ids[b, : len(tk)] = torch.from_numpy(tk)
        mask[b, : len(tk)] = 1
    logits[1, 4, 30:] = float("-inf")  # an impossible stretch of the vocabulary: fine
    rewards, _ = carl_reward_batch(logits, ids, mask)
    expected = carl_reward(logits[1, :6].numpy(), ids[1, :6].numpy())[0]
    assert torch.isfinite(rewards).all() and abs(float(rewards[1]) - expected) <= 1e-9 * abs(expected)

    broken = logits.clone()
    broken[1, 3, 17] = float("inf")
    with pytest.raises(ValueError, match=r"position \[1, 3\].*vocabulary index 17 is inf"):
        carl_reward_batch(broken, ids, mask)
    quiet, parts = carl_reward_batch(broken, ids, mask, nonfinite="nan")
    assert float(quiet[0]) == pytest.approx(float(rewards[0]), rel=1e-12) and torch.isnan(quiet[1])
    assert all(torch.isnan(v[1]) for v in parts.values())
    with pytest.raises(ValueError, match=r"position \[0, 2\].*vocabulary index 5 is nan"):
        bad = logits[0, :4].clone()
        bad[2, 5] = float("nan")
        token_stats_from_logits(bad.unsqueeze(0), ids[0, :4].unsqueeze(0))

    # tiled LM-head path: an LM head whose bias masks the upper half of the vocabulary with -inf, so
    # that with 16 columns a tile, two tiles are entirely -inf; same numbers as the full logits
    hidden = torch.randn(5, 8, dtype=torch.float64)
    head = torch.nn.Linear(8, 64).double()
    with torch.no_grad():
        head.bias[32:] = float("-inf")
    weight = head.weight.detach()
    tok = torch.tensor([1, 2, 3, 4, 40])  # the last one is an impossible token: log P = -inf
    with torch.no_grad():
        full = token_stats_from_logits(head(hidden), tok)
    tiled = token_stats_from_hidden(hidden, head, tok, tile_elements=5 * 16)
    assert torch.isfinite(full.entropy).all() and torch.isneginf(full.selected_logprob[4])
    # exact entropy vs the reference's log(p + 1e-10): at most V * 1e-10 nats apart (see the docstring)
    torch.testing.assert_close(tiled.entropy, full.entropy, rtol=0, atol=64e-10)
    torch.testing.assert_close(tiled.selected_logprob, full.selected_logprob, rtol=1e-9, atol=0)
    hidden[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"position \[3\].*is nan"):
        token_stats_from_hidden(hidden, weight, tok)
    stats = token_stats_from_hidden(hidden, weight, tok, nonfinite="nan")
    assert torch.isnan(stats.entropy[3]) and torch.isfinite(stats.entropy[[0, 1, 2, 4]]).all()
    with pytest.raises(ValueError, match=r"position \[0, 3\] has entropy nan"):
        carl_reward_from_stats(
            stats.entropy.unsqueeze(0), stats.selected_logprob.unsqueeze(0), torch.ones(1, 5), 64
        )
    with pytest.raises(ValueError, match="nonfinite must be 'raise' or 'nan'"):
        carl_reward_batch(logits, ids, mask, nonfinite="zero")


def test_a_diverged_model_gives_zero_rewards_and_one_counted_warning(tiny_model_and_tokenizer, caplog):
    import copy
    import logging
    import math

    import torch

    from carl_assets.carl import make_carl_reward_fn

    model, tokenizer = tiny_model_and_tokenizer
    model = copy.deepcopy(model)
    reward_fn = make_carl_reward_fn(model, tokenizer, min_chars=0)  # placeholder texts: judged by the ids
    prompts = ["I felt the quiet morning", "We wrote about the deadline", "She noticed an old letter"]
    completions = [
        tokenizer(text=t, add_special_tokens=False)["input_ids"]
        for t in (" and it was good.", " which made me angry.", " and everything felt clear.")
    ]
    healthy = reward_fn(prompts=prompts, completions=[""] * 3, completion_ids=completions)
    assert all(math.isfinite(r) and r > 0 for r in healthy)
    with torch.no_grad():  # a diverged run: the final norm's weights went NaN
        model.model.norm.weight[0] = float("nan")
    logged: dict[str, float] = {}
    with caplog.at_level(logging.WARNING, logger="carl_assets.carl"):
        rewards = reward_fn(
            prompts=prompts,
            completions=[""] * 3,
            completion_ids=completions,
            log_metric=lambda k, v: logged.__setitem__(k, v),
        )
    assert rewards == [0.0, 0.0, 0.0]  # a documented value, never NaN
    assert any("0.0 for 3 of 3 completions with non-finite logits" in r.getMessage() for r in caplog.records)
    assert logged["carl/zeroed"] == 1.0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["phi", "--logits-file", "{nan}"], r"logits[2, 3] is nan"),
        (["reward", "--logits-file", "{inf}", "--token-ids-file", "{ids}"], r"logits[0, 1] is inf"),
        (["phi", "--logits-file", "{dead}"], "row 1 of the logits is entirely -inf"),
        (["gate-check", "--phi", "nan"], "must be a finite number, got 'nan'"),
        (["gate-check", "--phi", "0.5", "--threshold=-inf"], "must be a finite number, got '-inf'"),
        (["train", "--model", "m", "--dataset", "d", "--gate-accuracy", "nan"], "must be a finite number"),
        (["agent", "--model", "m", "--task", "t", "--gate-threshold", "inf"], "must be a finite number"),
    ],
)
def test_cli_refuses_non_finite_input_in_one_line(tmp_path, capsys, args, fragment):
    import numpy as np

    from carl_assets import cli

    logits, ids = _logits(4, 6)
    paths = {"ids": tmp_path / "ids.npy"}
    np.save(paths["ids"], ids)
    for name, (t, v, value) in {
        "nan": (2, 3, np.nan),
        "inf": (0, 1, np.inf),
        "dead": (1, None, -np.inf),
    }.items():
        bad = logits.copy()
        if v is None:
            bad[t] = value
        else:
            bad[t, v] = value
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], bad)
    assert cli.main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("carl: error:") and fragment in err


def test_cli_minus_inf_logits_are_scored(tmp_path, capsys):
    import numpy as np

    from carl_assets import cli

    logits, ids = _logits(6, 8)
    logits[:, 6:] = -np.inf
    np.save(tmp_path / "l.npy", logits)
    np.save(tmp_path / "i.npy", ids % 6)
    assert (
        cli.main(
            ["reward", "--logits-file", str(tmp_path / "l.npy"), "--token-ids-file", str(tmp_path / "i.npy")]
        )
        == 0
    )
    assert "CARL reward: " in capsys.readouterr().out


# ============================================================================================
# Model folders: pickle weights refused unless allowed; no remote code by default
# ============================================================================================


@pytest.fixture(scope="module")
def pickle_only_folder(tmp_path_factory, tiny_model_and_tokenizer):
    import torch

    model, tokenizer = tiny_model_and_tokenizer
    folder = tmp_path_factory.mktemp("pickled")
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_a_folder_with_only_pickle_weights_is_refused(pickle_only_folder, tmp_path):
    import shutil

    from carl_assets.models.loading import load_model_and_tokenizer

    with pytest.raises(
        ValueError, match=r"holds only pickle weights \(pytorch_model.bin\).*allow_pickle=True"
    ):
        load_model_and_tokenizer(pickle_only_folder)
    for name in ("weights.pt", "model.pkl"):
        other = tmp_path / name.split(".")[1]
        shutil.copytree(pickle_only_folder, other)
        (other / "pytorch_model.bin").rename(other / name)
        with pytest.raises(ValueError, match=f"only pickle weights \\({name}\\)"):
            load_model_and_tokenizer(other)


def test_pickle_weights_load_when_explicitly_allowed(pickle_only_folder, tiny_model_and_tokenizer):
    import torch

    from carl_assets.models.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(pickle_only_folder, allow_pickle=True)
    reference = tiny_model_and_tokenizer[0]
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_cli_agent_refuses_pickle_weights(pickle_only_folder, capsys):
    from carl_assets import cli

    assert cli.main(["agent", "--model", str(pickle_only_folder), "--task", "t"]) == 1
    err = capsys.readouterr().err
    assert "only pickle weights" in err and "--allow-pickle" in err and err.count("\n") == 1


def test_remote_code_does_not_run_by_default(tmp_path, tiny_model_and_tokenizer):
    from carl_assets.models.loading import load_model_and_tokenizer

    model, tokenizer = tiny_model_and_tokenizer
    folder = tmp_path / "remote"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    marker = tmp_path / "remote-code-ran"
    (folder / "evil_model.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\nclass EvilForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil_model.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    loaded, _ = load_model_and_tokenizer(folder)  # the folder's own class, not its code
    assert type(loaded).__name__ == "LlamaForCausalLM" and not marker.exists()
