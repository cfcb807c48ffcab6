"""The project's environment defaults and the memory source fingerprint."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carl_assets import project_env
from carl_assets.memory.fingerprint import file_fingerprint, graph_fingerprint, source_fingerprint
from carl_assets.memory.graph import MemorySourceError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_project_folders_whatever_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    environ = {"CARL_ENV_FILE": str(tmp_path / "absent.env")}
    added = project_env.apply(environ)
    assert added == {"CARL_HOME": str(REPO / ".carl"), "DAGSTER_HOME": str(REPO / ".dagster_home"),
                     "CARL_MEMORY_SOURCE": "sample"}


def test_env_file_values_resolve_against_its_folder_and_set_variables_win(tmp_path):
    env_file = tmp_path / "conf" / ".env"
    env_file.parent.mkdir()
    env_file.write_text("# comment\nexport CARL_HOME=homes/carl\nDAGSTER_HOME='/abs/dh'\n"
                        "CARL_MEMORY_SOURCE=\"jsonl:/data/memory.jsonl\"\nnot a line\n")
    environ = {"CARL_ENV_FILE": str(env_file), "DAGSTER_HOME": "/already/set"}
    added = project_env.apply(environ)
    assert environ["CARL_HOME"] == str(tmp_path / "conf" / "homes" / "carl")
    assert environ["DAGSTER_HOME"] == "/already/set" and "DAGSTER_HOME" not in added
    assert environ["CARL_MEMORY_SOURCE"] == "jsonl:/data/memory.jsonl"


def test_a_broken_env_file_never_breaks_the_interpreter(tmp_path):
    bad = tmp_path / "bad.env"
    bad.write_bytes(b"CARL_HOME=\xff\xfe\n")  # not UTF-8: reading it raises
    environ = {"CARL_ENV_FILE": str(bad)}
    assert project_env.apply(environ) == {} and "CARL_HOME" not in environ


@pytest.mark.skipif(not list(Path(sys.prefix).glob("lib/python*/site-packages/carl_project_env.pth")),
                    reason="the venv's start-up hook is made by `make install`")
def test_every_python_of_the_venv_gets_the_defaults(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CARL_HOME", "DAGSTER_HOME", "CARL_MEMORY_SOURCE")}
    env_file = tmp_path / "x.env"
    env_file.write_text(f"CARL_HOME={tmp_path / 'h'}\n")
    env["CARL_ENV_FILE"] = str(env_file)
    out = subprocess.run([sys.executable, "-c", "import os; print(os.environ['CARL_HOME'], os.environ['DAGSTER_HOME'])"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(tmp_path / "h"), str(REPO / ".dagster_home")]


def test_file_fingerprint_changes_with_content_not_with_reads(tmp_path):
    memory = tmp_path / "memory.jsonl"
    memory.write_text('{"type":"entity","name":"a","entityType":"journal","observations":["x"]}\n')
    first = source_fingerprint(f"jsonl:{memory}")
    assert first == source_fingerprint(f"jsonl:{memory}") and first.kind == "file"
    assert first.details["size_bytes"] == memory.stat().st_size
    stat = memory.stat()
    memory.write_text(memory.read_text().replace('"x"', '"y"'))  # same size, new content
    os.utime(memory, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    assert source_fingerprint(f"jsonl:{memory}").version != first.version  # the tail hash sees it
    time.sleep(0.01)
    memory.touch()
    assert file_fingerprint(memory).details["mtime_ns"] != stat.st_mtime_ns


def test_fingerprints_of_other_sources_and_bad_ones(tmp_path):
    assert source_fingerprint("sample") == source_fingerprint(" sample ")
    graph = {"entities": [{"name": "a"}], "relations": []}
    one = graph_fingerprint(graph, "mcp+http://x")
    assert one.details == {"entities": 1, "relations": 0}
    graph["entities"].append({"name": "b"})
    assert graph_fingerprint(graph, "mcp+http://x").version != one.version
    with pytest.raises(MemorySourceError, match="is a folder"):
        source_fingerprint(f"jsonl:{tmp_path}")
    with pytest.raises(MemorySourceError, match="no such file"):
        source_fingerprint(f"jsonl:{tmp_path / 'nope.jsonl'}")
    with pytest.raises(MemorySourceError, match="unknown scheme"):
        source_fingerprint("ftp://x")
