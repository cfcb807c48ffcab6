"""Memory graphs from the real MCP memory server (npm `@modelcontextprotocol/server-memory`):
the JSONL file it writes, the same file with bad lines added, and the live server over stdio and HTTP.

`make test` installs the server under tests/.npm and passes its path in `MCP_MEMORY_SERVER`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from carl_assets.memory.graph import MemorySourceError, load_graph
from carl_assets.memory.mcp_source import call_tool, parse_stdio_command, read_mcp_graph, run_with_session
from carl_assets.memory.sample import sample_records

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SERVER = REPO / "tests" / ".npm" / "node_modules" / ".bin" / "mcp-server-memory"


def _server_binary() -> str:
    path = os.environ.get("MCP_MEMORY_SERVER") or str(DEFAULT_SERVER)
    problem = None
    if not (Path(path).is_file() and os.access(path, os.X_OK)):
        problem = f"MCP memory server not found at {path} (run `make test`, or set MCP_MEMORY_SERVER)"
    elif shutil.which("node") is None:
        problem = "node is not on PATH: the MCP memory server cannot run"
    if problem:
        if os.environ.get("CI") or os.environ.get("MCP_MEMORY_SERVER"):  # asked for explicitly: a failure
            pytest.fail(f"{problem}; CI (or an explicit MCP_MEMORY_SERVER) must run these tests")
        pytest.skip(problem)
    return path


def _stdio_source(binary: str, memory_file: Path) -> str:
    return f"mcp+stdio:MEMORY_FILE_PATH={shlex.quote(str(memory_file))} {shlex.quote(binary)}"


@pytest.fixture(scope="module")
def server() -> str:
    return _server_binary()


@pytest.fixture(scope="module")
def written(server, tmp_path_factory) -> tuple[Path, list[dict], list[dict]]:
    """Drive the real server through its tools to write the sample graph to its JSONL file."""
    memory_file = tmp_path_factory.mktemp("mcp") / "memory.jsonl"
    records = sample_records()
    entities = [{k: v for k, v in r.items() if k != "type"} for r in records if r["type"] == "entity"]
    relations = [{k: v for k, v in r.items() if k != "type"} for r in records if r["type"] == "relation"]

    async def work(session):
        created = await call_tool(session, "create_entities", {"entities": entities})
        linked = await call_tool(session, "create_relations", {"relations": relations})
        return len(created["entities"]), len(linked["relations"])

    assert run_with_session(_stdio_source(server, memory_file), work) == (len(entities), len(relations))
    assert memory_file.is_file()
    return memory_file, entities, relations


def test_server_written_jsonl_ingests_with_the_right_counts(written):
    memory_file, entities, relations = written
    lines = memory_file.read_text().splitlines()
    assert len(lines) == len(entities) + len(relations) == 420 + len(relations)
    graph = load_graph(f"jsonl:{memory_file}")
    assert len(graph.nodes) == 420
    assert len(graph.edges) == len(relations)
    assert graph.rejects.empty
    # the same records through the server give the same tables as the built-in sample
    sample = load_graph("sample")
    pd.testing.assert_frame_equal(graph.nodes, sample.nodes)
    pd.testing.assert_frame_equal(graph.edges, sample.edges)
    assert graph.summary()["tagged_nodes"] == sample.summary()["tagged_nodes"]


def test_copy_with_bad_lines_keeps_the_good_and_rejects_the_bad(written, tmp_path):
    memory_file, entities, relations = written
    good = memory_file.read_text().rstrip("\n").split("\n")
    n = len(good)
    extra = "A new entry that is long enough to be a training example on its own."
    bad = [
        json.dumps(
            {"type": "entity", "name": "journal-000", "entityType": "journal", "observations": ["again"]}
        ),
        "this is not json {",
        json.dumps({"type": "comment", "text": "hello"}),
        json.dumps(
            {
                "type": "entity",
                "name": "extra-1",
                "entityType": "journal",
                "observations": [extra, "warmth:high joy:7"],
            }
        ),
        json.dumps({"type": "relation", "from": "extra-1", "to": "ghost", "relationType": "relates_to"}),
        json.dumps(
            {"type": "relation", "from": "extra-1", "to": "journal-000", "relationType": "relates_to"}
        ),
        json.dumps(
            {
                "type": "entity",
                "name": "extra-2",
                "entityType": "journal",
                "observations": [extra, "warmth:99"],
            }
        ),
    ]
    copy = tmp_path / "memory-with-bad-lines.jsonl"
    # one bad line in the middle (line numbers of the good lines after it shift by one) and the rest at
    # the end
    middle = n // 2
    copy.write_text("\n".join(good[:middle] + ["{broken"] + good[middle:] + bad) + "\n")

    graph = load_graph(f"jsonl:{copy}")
    original = load_graph(f"jsonl:{memory_file}")
    # extra-1 and extra-2 kept (their near-miss tag lines stay prose: no tags), a stub node for 'ghost'
    assert len(graph.nodes) == 420 + 2 + 1 and graph.nodes["is_stub"].sum() == 1
    assert len(graph.edges) == len(relations) + 2  # the relation to 'ghost' is kept
    kept = graph.nodes.set_index("node_id")
    assert json.loads(kept.loc["extra-1", "tags_json"]) == {}
    assert json.loads(kept.loc["extra-2", "tags_json"]) == {}
    assert kept.loc["extra-1", "text"] == f"extra-1 (journal)\n{extra}\nwarmth:high joy:7"
    # the second 'journal-000' record is merged into the first: its observation appended
    assert (
        kept.loc["journal-000", "text"]
        == original.nodes.set_index("node_id").loc["journal-000", "text"] + "\nagain"
    )
    pd.testing.assert_frame_equal(
        graph.nodes.iloc[1:420].drop(columns="source_line"),
        original.nodes.iloc[1:].drop(columns="source_line"),
    )

    rejects = graph.rejects
    assert rejects["line"].tolist() == [middle + 1] + [n + 2 + i for i in (1, 2, 3, 6)]
    reasons = rejects["reason"].tolist()
    assert "malformed JSON" in reasons[0]
    assert "malformed JSON" in reasons[1]
    assert "unknown record type 'comment'" in reasons[2]
    assert "bad tag token 'warmth:high'" in reasons[3] and "stays in the text" in reasons[3]
    assert "bad tag token 'warmth:99'" in reasons[4] and "outside 0..10" in reasons[4]
    assert rejects["raw"].iloc[1] == "this is not json {"


def test_live_stdio_read_gives_the_same_tables(written, server):
    memory_file, _, _ = written
    from_file = load_graph(f"jsonl:{memory_file}")
    live = load_graph(_stdio_source(server, memory_file))
    pd.testing.assert_frame_equal(live.nodes, from_file.nodes)
    pd.testing.assert_frame_equal(live.edges, from_file.edges)
    assert live.rejects.empty and list(live.rejects.columns) == list(from_file.rejects.columns)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_live_http_read_gives_the_same_tables(written):
    memory_file, _, _ = written
    port = _free_port()
    script = Path(__file__).parent / "data" / "http_memory_server.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port), str(memory_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        live = load_graph(f"mcp+http://127.0.0.1:{port}/mcp")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    from_file = load_graph(f"jsonl:{memory_file}")
    pd.testing.assert_frame_equal(live.nodes, from_file.nodes)
    pd.testing.assert_frame_equal(live.edges, from_file.edges)


# --------------------------------------------------------------------------------------------
# Failures are one clear error naming the source (no npm server needed)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "mcp+stdio:/nonexistent/mcp-server",  # cannot spawn
        "mcp+stdio:false",  # exits at once
        "mcp+stdio:sh -c 'echo boom-on-stderr >&2; exit 3'",  # dies, saying why
        "mcp+stdio:",
    ],
)
def test_a_server_that_fails_is_one_error_naming_the_source(source):
    with pytest.raises(MemorySourceError) as info:
        load_graph(source)
    assert source in str(info.value)
    if "boom" in source:
        assert "boom-on-stderr" in str(info.value)  # the server's stderr is in the message


def test_unreachable_http_server_is_one_error():
    source = f"mcp+http://127.0.0.1:{_free_port()}/mcp"
    with pytest.raises(MemorySourceError, match="cannot read memory source") as info:
        load_graph(source)
    assert source in str(info.value)


def test_a_silent_server_times_out():
    source = "mcp+stdio:sleep 30"
    started = time.monotonic()
    with pytest.raises(MemorySourceError, match="no answer within 1 s"):
        read_mcp_graph(source, timeout_s=1)
    assert time.monotonic() - started < 15


def test_parse_stdio_command():
    assert parse_stdio_command("mcp+stdio:MEMORY_FILE_PATH=/m/x.jsonl A_B=1 npx -y '@scope/pkg' --flag") == (
        "npx",
        ["-y", "@scope/pkg", "--flag"],
        {"MEMORY_FILE_PATH": "/m/x.jsonl", "A_B": "1"},
    )
    assert parse_stdio_command("mcp+stdio:/usr/bin/server") == ("/usr/bin/server", [], {})
    for bad in ["mcp+stdio:X=1", "mcp+stdio:  ", "mcp+stdio:'unclosed"]:
        with pytest.raises(MemorySourceError):
            parse_stdio_command(bad)
