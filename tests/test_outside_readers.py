"""Outside readers: a notebook or the DuckDB CLI holding carl.duckdb open while a run writes.

The holder is a real second process (DuckDB's lock is per process): it opens the file, prints
"holding", and keeps the connection until a line arrives on its stdin. The waiting side releases it
from inside its `on_wait` callback, so "waits, then succeeds" needs no sleeps and no timing asserts.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from carl_assets import storage

HOLDER = """
import sys, duckdb
con = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == "ro")
print("holding", flush=True)
sys.stdin.readline()
con.close()
print("released", flush=True)
"""


class Holder:
    """A process holding `db` open (read-only like a notebook, or read-write like another run)."""

    def __init__(self, db: Path, read_only: bool):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(db), "ro" if read_only else "rw"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline().strip()
        assert line == "holding", self.proc.stderr.read()
        self.pid = self.proc.pid

    def release(self) -> None:
        if self.proc.poll() is None and not self.proc.stdin.closed:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            assert self.proc.stdout.readline().strip() == "released"

    def stop(self) -> None:
        try:
            self.release()
        finally:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture
def db(tmp_path) -> Path:
    path = tmp_path / "carl.duckdb"
    storage.write_tables(path, {"memory_nodes": pd.DataFrame({"node_id": ["a", "b"], "n_tags": [1, 2]})})
    return path


@pytest.fixture
def notebook(db):
    holder = Holder(db, read_only=True)
    yield holder
    holder.stop()


def test_a_write_waits_for_a_notebook_and_says_whom_it_waits_for(db, notebook):
    notes: list[str] = []

    def on_wait(message: str) -> None:
        notes.append(message)
        notebook.release()  # the user closes the notebook's connection while we wait

    with storage.connect(db, timeout_s=60, on_wait=on_wait) as con:
        storage.write_table(con, "memory_nodes", pd.DataFrame({"node_id": ["c"], "n_tags": [3]}))
    assert len(notes) == 1
    assert f"PID {notebook.pid}" in notes[0] and "to write" in notes[0] and str(db) in notes[0]
    assert storage.read_table(db, "memory_nodes")["node_id"].tolist() == ["c"]


def test_the_default_wait_message_goes_to_the_storage_logger(db, notebook, caplog, monkeypatch):
    released = []
    real_sleep = storage.time.sleep

    def sleep_then_release(seconds: float) -> None:  # release on the first back-off, after the log line
        if not released:
            released.append(True)
            notebook.release()
        real_sleep(seconds)

    monkeypatch.setattr(storage.time, "sleep", sleep_then_release)
    with caplog.at_level(logging.WARNING, logger="carl_assets.storage"):
        assert storage.write_tables(db, {"t": pd.DataFrame({"x": [1, 2, 3]})}) == {"t": 3}
    waits = [r.getMessage() for r in caplog.records if r.name == "carl_assets.storage"]
    assert len(waits) == 1 and f"PID {notebook.pid}" in waits[0]


def test_waiting_too_long_fails_naming_the_holders_lock(db, notebook):
    with (
        pytest.raises(storage.DatabaseLockedError) as info,
        storage.connect(db, timeout_s=0.3, on_wait=lambda m: None),
    ):
        pass
    error = info.value
    assert isinstance(error, duckdb.IOException)  # callers catching DuckDB's own error still catch it
    assert error.pid == notebook.pid and f"(PID {notebook.pid})" in str(error)
    assert error.holder and "python" in error.holder.lower()
    assert str(db) in str(error) and storage.LOCK_TIMEOUT_ENV in str(error)
    assert error.waited_s >= 0.3


def test_the_timeout_comes_from_the_environment(db, notebook, monkeypatch):
    monkeypatch.setenv(storage.LOCK_TIMEOUT_ENV, "0.2")
    with pytest.raises(storage.DatabaseLockedError, match=f"PID {notebook.pid}"):
        storage.write_tables(db, {"t": pd.DataFrame({"x": [1]})})
    # A value that is no number of seconds warns, naming it, and the default wait (120 s) applies.
    monkeypatch.setenv(storage.LOCK_TIMEOUT_ENV, "soon")
    with pytest.warns(UserWarning, match="CARL_DB_LOCK_TIMEOUT='soon' ignored"):
        assert storage.lock_timeout_s() == storage.DEFAULT_LOCK_TIMEOUT_S


def test_retries_still_cap_the_attempts(db, notebook):
    notes: list[str] = []
    with (
        pytest.raises(storage.DatabaseLockedError, match="2 attempts"),
        storage.connect(db, retries=2, timeout_s=60, on_wait=notes.append),
    ):
        pass
    assert len(notes) == 1


def test_a_reader_waits_for_a_running_writer(db):
    writer = Holder(db, read_only=False)  # another run in the middle of its write
    try:
        notes: list[str] = []

        def on_wait(message: str) -> None:
            notes.append(message)
            writer.release()

        with storage.connect(db, read_only=True, timeout_s=60, on_wait=on_wait) as con:
            assert storage.select_table(con, "memory_nodes")["node_id"].tolist() == ["a", "b"]
        assert "to read" in notes[0] and f"PID {writer.pid}" in notes[0]
    finally:
        writer.stop()


def test_an_error_that_is_not_a_lock_is_raised_at_once(tmp_path):
    bad = tmp_path / "carl.duckdb"
    bad.write_bytes(b"this is not a duckdb file" * 100)
    notes: list[str] = []
    with pytest.raises(duckdb.Error) as info, storage.connect(bad, timeout_s=60, on_wait=notes.append):
        pass
    assert not isinstance(info.value, storage.DatabaseLockedError) and notes == []


def test_bad_wait_settings_are_refused(db):
    for kwargs, message in (
        ({"timeout_s": -1}, "timeout_s"),
        ({"timeout_s": float("nan")}, "timeout_s"),
        ({"retries": 0}, "retries"),
    ):
        with pytest.raises(ValueError, match=message), storage.connect(db, **kwargs):
            pass


def test_lock_holder_parses_duckdbs_message():
    message = (
        'IO Error: Could not set lock on file "/x/carl.duckdb": Conflicting lock is held in '
        "/usr/bin/python3.11 (PID 4242) by user ana. See also https://duckdb.org/docs/connect/concurrency"
    )
    assert storage.lock_holder(message) == ("/usr/bin/python3.11 (user ana)", 4242)
    assert storage.lock_holder("IO Error: Could not set lock on file: Resource temporarily unavailable") == (
        None,
        None,
    )


# --------------------------------------------------------------------------------------------
# The README's advice for reading the tables meanwhile, checked
# --------------------------------------------------------------------------------------------


def test_short_read_only_connections_and_an_exported_copy(db, tmp_path):
    # 1. a short read-only connection: open, query, close — the run's next write is not blocked after it
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM memory_nodes").fetchone()[0] == 2
    storage.write_tables(
        db, {"memory_nodes": pd.DataFrame({"node_id": ["a", "b", "c"], "n_tags": [1, 2, 3]})}
    )
    # 2. an exported copy (Parquet) read for as long as one likes while a run holds the write lock
    export = tmp_path / "snapshot"
    with duckdb.connect(str(db), read_only=True) as con:
        con.execute(f"EXPORT DATABASE '{export}' (FORMAT parquet)")
    writer = Holder(db, read_only=False)
    try:
        with pytest.raises(duckdb.IOException, match="lock"):
            duckdb.connect(str(db), read_only=True)  # the live file is busy...
        nodes = duckdb.sql(f"SELECT * FROM '{export}/memory_nodes.parquet' ORDER BY node_id").df()
        assert nodes["node_id"].tolist() == ["a", "b", "c"]  # ...the copy is not
    finally:
        writer.stop()
