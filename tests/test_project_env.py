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
    assert added == {
        "CARL_HOME": str(REPO / ".carl"),
        "DAGSTER_HOME": str(REPO / ".dagster_home"),
        "CARL_MEMORY_SOURCE": "sample",
    }


def test_env_file_values_resolve_against_its_folder_and_set_variables_win(tmp_path):
    env_file = tmp_path / "conf" / ".env"
    env_file.parent.mkdir()
    env_file.write_text(
        "# comment\nexport CARL_HOME=homes/carl\nDAGSTER_HOME='/abs/dh'\n"
        'CARL_MEMORY_SOURCE="jsonl:/data/memory.jsonl"\nnot a line\n'
    )
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


@pytest.mark.skipif(
    not list(Path(sys.prefix).glob("lib/python*/site-packages/carl_project_env.pth")),
    reason="the venv's start-up hook is made by `make install`",
)
def test_every_python_of_the_venv_gets_the_defaults(tmp_path):
    env = {
        k: v for k, v in os.environ.items() if k not in ("CARL_HOME", "DAGSTER_HOME", "CARL_MEMORY_SOURCE")
    }
    env_file = tmp_path / "x.env"
    env_file.write_text(f"CARL_HOME={tmp_path / 'h'}\n")
    env["CARL_ENV_FILE"] = str(env_file)
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ['CARL_HOME'], os.environ['DAGSTER_HOME'])"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
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


def test_env_file_is_read_as_dagster_reads_it(tmp_path, monkeypatch):
    """python-dotenv's grammar: inline comments, quotes with spaces, `${VAR}` expansion, `~` paths."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    env_file = tmp_path / ".env"
    env_file.write_text(
        'export CARL_HOME=~/carl  # my home\nDAGSTER_HOME="dagster home"\n'
        "CARL_RETRAIN_CRON='0 4 * * *'\nCARL_MEMORY_SOURCE=jsonl:${HOME}/m.jsonl\nNOVALUE\n"
    )
    environ = {"CARL_ENV_FILE": str(env_file)}
    project_env.apply(environ)
    assert environ["CARL_HOME"] == str(tmp_path / "home" / "carl")
    assert environ["DAGSTER_HOME"] == str(tmp_path / "dagster home")
    assert environ["CARL_RETRAIN_CRON"] == "0 4 * * *"
    assert environ["CARL_MEMORY_SOURCE"] == f"jsonl:{tmp_path / 'home'}/m.jsonl"
    assert "NOVALUE" not in environ


def test_set_path_variables_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    environ = {
        "CARL_ENV_FILE": str(tmp_path / "absent.env"),
        "DAGSTER_HOME": ' "~/dh" ',
        "CARL_HOME": "rel/c",
    }
    added = project_env.apply(environ)
    assert environ["DAGSTER_HOME"] == str(tmp_path / "dh") == added["DAGSTER_HOME"]
    assert environ["CARL_HOME"] == str(tmp_path / "rel" / "c")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("30", 30.0), (" 2.5 ", 2.5), ('"45"', 45.0), ("'7'", 7.0), ("10s", 10.0), ("0", 0.0), ("", 120.0)],
)
def test_seconds_in_every_form_a_shell_or_env_file_writes(raw, expected, recwarn):
    assert project_env.env_seconds("CARL_X", 120.0, environ={"CARL_X": raw}) == expected
    assert not [w for w in recwarn if issubclass(w.category, project_env.SettingWarning)]


@pytest.mark.parametrize("raw", ["soon", "-1", "nan", "inf", "1e999", "'"])
def test_bad_seconds_fall_back_with_a_warning_naming_the_variable(raw):
    with pytest.warns(project_env.SettingWarning, match=f"CARL_X={raw!r} ignored: expected a finite number"):
        assert project_env.env_seconds("CARL_X", 120.0, environ={"CARL_X": raw}) == 120.0


def test_positive_seconds_and_whole_numbers():
    with pytest.warns(project_env.SettingWarning, match="> 0"):
        assert project_env.env_seconds("CARL_X", 60.0, positive=True, environ={"CARL_X": "0"}) == 60.0
    assert project_env.env_int("CARL_N", 300, environ={"CARL_N": ' "30" '}) == 30
    assert project_env.env_int("CARL_N", 300, environ={"CARL_N": "30.0"}) == 30
    for bad in ("2.5", "0", "five"):
        with pytest.warns(project_env.SettingWarning, match=f"CARL_N={bad!r}"):
            assert project_env.env_int("CARL_N", 300, environ={"CARL_N": bad}) == 300


def test_memory_source_forms(tmp_path):
    memory = tmp_path / "memory.jsonl"
    memory.write_text("")
    assert project_env.memory_source_setting({}) == "sample"
    assert project_env.memory_source_setting({"CARL_MEMORY_SOURCE": " 'sample' "}) == "sample"
    assert project_env.memory_source_setting({"CARL_MEMORY_SOURCE": f'"jsonl:{memory}"'}) == f"jsonl:{memory}"
    assert (
        project_env.memory_source_setting({"CARL_MEMORY_SOURCE": str(memory)}) == f"jsonl:{memory}"
    )  # bare path
    assert project_env.normalise_memory_source("ftp://x") == "ftp://x"  # the reader names the unknown scheme


def test_definitions_load_with_bad_settings_and_warn(monkeypatch, tmp_path):
    """One bad value per variable: the definitions still load, each bad value is named, defaults apply."""
    import dagster as dg

    from carl_assets import storage
    from carl_assets.defs import build_definitions
    from carl_assets.defs.jobs import DEFAULT_CRON

    bad = {
        "CARL_DB_LOCK_TIMEOUT": "two minutes",
        "CARL_RETRAIN_CRON": "every night",
        "CARL_MCP_TIMEOUT": "-5",
        "CARL_SENSOR_INTERVAL_S": "5min",
        "CARL_TIMEZONE": "Mars/Olympus",
    }
    for key, value in bad.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CARL_MEMORY_SOURCE", ' "sample" ')
    with pytest.warns(project_env.SettingWarning) as record:
        defs = build_definitions(tmp_path)
        assert storage.lock_timeout_s() == storage.DEFAULT_LOCK_TIMEOUT_S
    messages = " | ".join(str(w.message) for w in record)
    for key, value in bad.items():
        if key != "CARL_MCP_TIMEOUT":
            assert f"{key}={value!r} ignored" in messages
    schedule = defs.resolve_schedule_def("nightly_retraining")
    assert schedule.cron_schedule == DEFAULT_CRON and schedule.execution_timezone != "Mars/Olympus"
    sensor = defs.resolve_sensor_def("memory_graph_changed")
    assert sensor.minimum_interval_seconds == 300
    assert isinstance(defs, dg.Definitions)


@pytest.mark.slow  # a fresh interpreter imports torch, transformers and Dagster
def test_loading_the_code_location_with_bad_settings(tmp_path):
    env = {
        **os.environ,
        "CARL_DB_LOCK_TIMEOUT": "soon",
        "CARL_RETRAIN_CRON": "nightly",
        "CARL_HOME": str(tmp_path / "c"),
        "DAGSTER_HOME": str(tmp_path / "d"),
    }
    out = subprocess.run(
        [sys.executable, "-c", "from carl_assets.definitions import defs; print(type(defs()).__name__)"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "Definitions"
    assert "CARL_RETRAIN_CRON='nightly' ignored" in out.stderr
