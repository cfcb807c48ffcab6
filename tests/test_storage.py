"""Storage: atomic artifacts, bulk tables with short connections, content hashes as data versions."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest

from carl_assets import storage


def test_atomic_directory_replaces_whole_folder(tmp_path):
    target = tmp_path / "artifacts" / "thing"
    with storage.atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
        assert not target.exists()  # nothing visible until the block succeeds
    assert (target / "a.txt").read_text() == "one"
    with storage.atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in target.parent.iterdir()] == ["thing"]  # no temp folders left


def test_atomic_directory_keeps_old_folder_on_failure(tmp_path):
    target = tmp_path / "thing"
    with storage.atomic_directory(target) as tmp:
        (tmp / "good.txt").write_text("kept")
    with pytest.raises(RuntimeError), storage.atomic_directory(target) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert [p.name for p in target.iterdir()] == ["good.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]


def test_atomic_write_json_round_trip(tmp_path):
    path = storage.atomic_write_json(tmp_path / "x" / "m.json", {"b": 2, "a": [1, 2]})
    assert path.read_text().startswith('{\n  "a"')
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_write_tables_bulk_and_replace(tmp_path):
    db = tmp_path / "carl.duckdb"
    df = pd.DataFrame({"x": np.arange(10_000), "s": [f"r{i}" for i in range(10_000)]})
    assert storage.write_tables(db, {"t": df}) == {"t": 10_000}
    back = storage.read_table(db, "t")
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    storage.write_tables(db, {"t": df.head(3)})
    assert len(storage.read_table(db, "t")) == 3


def test_read_missing_table_names_it(tmp_path):
    db = tmp_path / "carl.duckdb"
    storage.write_tables(db, {"t": pd.DataFrame({"x": [1]})})
    with pytest.raises(LookupError, match="'nope'"):
        storage.read_table(db, "nope")


def test_table_names_are_validated(tmp_path):
    with pytest.raises(ValueError, match="invalid table name"):
        storage.write_tables(tmp_path / "d.duckdb", {"t; DROP": pd.DataFrame({"x": [1]})})


def test_concurrent_writers_wait_for_the_lock(tmp_path):
    """Several threads writing through short connections all land (same-process DuckDB shares the file)."""
    db = tmp_path / "carl.duckdb"
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            storage.write_tables(db, {f"t{i}": pd.DataFrame({"x": range(100 * (i + 1))})})
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [len(storage.read_table(db, f"t{i}")) for i in range(4)] == [100, 200, 300, 400]


def test_content_hash_changes_with_content_and_config(tmp_path):
    df = pd.DataFrame({"a": [1, 2, 3]})
    base = storage.content_hash({"k": 1}, df)
    assert base == storage.content_hash({"k": 1}, df.copy())
    assert base != storage.content_hash({"k": 2}, df)
    assert base != storage.content_hash({"k": 1}, pd.DataFrame({"a": [1, 2, 4]}))
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"abc")
    h1 = storage.content_hash(folder)
    (folder / "w.bin").write_bytes(b"abd")
    assert storage.content_hash(folder) != h1
    arr = np.arange(6, dtype=np.float32)
    assert storage.content_hash(arr) != storage.content_hash(arr.reshape(2, 3))


def test_atomic_files_are_readable_by_others(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = storage.atomic_write_bytes(tmp_path / "v.safetensors", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
