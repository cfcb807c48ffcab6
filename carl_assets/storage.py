"""Project storage: the CARL home, atomic artifact writes, bulk DuckDB tables and content hashes.

Everything here is plain Python so that the library, the CLI and the Dagster layer share one notion
of where things live and what a "data version" is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from carl_assets.project_env import env_seconds, setting

DEFAULT_CARL_HOME = ".carl"
DATABASE_NAME = "carl.duckdb"
ARTIFACTS_DIR = "artifacts"


def carl_home(home: str | os.PathLike[str] | None = None) -> Path:
    """The project home: `home` if given, else `$CARL_HOME`, else `./.carl` (made if missing)."""
    path = Path(home or setting("CARL_HOME") or DEFAULT_CARL_HOME).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_path(home: str | os.PathLike[str] | None = None) -> Path:
    return carl_home(home) / DATABASE_NAME


def artifact_dir(asset: str, home: str | os.PathLike[str] | None = None) -> Path:
    """`<home>/artifacts/<asset>`; the folder itself is created by an atomic write, not here."""
    root = carl_home(home) / ARTIFACTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    return root / asset


# --------------------------------------------------------------------------------------------
# Atomic writes: a reader sees the old artifact or the new one, never half of one.
# --------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes 0600 files; artifacts are read by other users (a vLLM server), so use the umask.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces `path` in one rename.

    The old folder is first renamed aside and removed after the swap, so a concurrent reader holding
    the old path keeps a complete copy until the swap, and on failure nothing at `path` changes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# DuckDB: short connections, bulk writes, a retry when another process holds the writer lock.
# --------------------------------------------------------------------------------------------


# DuckDB's Python client races when threads of one process open, scan and close connections to the
# same file at once ("python_arrow_scan does not exist"); processes are safe (the file lock), so
# threads of one process take turns. Re-entrant so write_table can run inside connect().
_PROCESS_LOCK = threading.RLock()


# How long a connection waits for another process's lock before failing (seconds); a notebook or the
# DuckDB CLI holding carl.duckdb open is the usual holder, so the default outlasts a short query.
LOCK_TIMEOUT_ENV = "CARL_DB_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 120.0
_MAX_BACKOFF_S = 2.0
_WAIT_LOG_EVERY_S = 10.0
# DuckDB names the holder: 'Conflicting lock is held in /usr/bin/python3 (PID 4242) by user ana.'
_HOLDER = re.compile(
    r"Conflicting lock is held in (?P<program>.+?) \(PID (?P<pid>\d+)\)(?: by user (?P<user>[^.]+))?"
)

logger = logging.getLogger("carl_assets.storage")


class DatabaseLockedError(duckdb.IOException):
    """Another process held the database's lock for longer than we were willing to wait.

    A `duckdb.IOException`, so code that caught DuckDB's own lock error still catches this one."""

    def __init__(self, message: str, db_path: Path, holder: str | None, pid: int | None, waited_s: float):
        super().__init__(message)
        self.db_path = db_path
        self.holder = holder
        self.pid = pid
        self.waited_s = waited_s


def lock_holder(message: str) -> tuple[str | None, int | None]:
    """(program, PID) of the process holding the lock, as DuckDB's IOException names it; Nones if it
    does not (an older DuckDB, another platform)."""
    match = _HOLDER.search(message)
    if match is None:
        return None, None
    who = match.group("program")
    if match.group("user"):
        who = f"{who} (user {match.group('user').strip()})"
    return who, int(match.group("pid"))


def lock_timeout_s() -> float:
    """The wait for a lock: `$CARL_DB_LOCK_TIMEOUT` seconds, else 120 (a value that is not a number of
    seconds >= 0 warns, naming it, and gives 120: see `project_env.env_seconds`)."""
    return env_seconds(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT_S)


@contextlib.contextmanager
def connect(
    db_path: str | os.PathLike[str],
    read_only: bool = False,
    retries: int | None = None,
    timeout_s: float | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open a short-lived connection, waiting for another process's lock instead of failing at once.

    DuckDB lets one process write, or several read, a file at a time: a notebook or the DuckDB CLI
    holding ``carl.duckdb`` open blocks a run's writes (and a run's write blocks their opening). While
    the lock is held elsewhere this waits with exponential backoff (50 ms growing to 2 s, jittered),
    saying what it waits for — the holder's program and PID — through `on_wait` (default: a warning on
    the ``carl_assets.storage`` logger), at the first wait and then every 10 s. After `timeout_s`
    (default `$CARL_DB_LOCK_TIMEOUT`, else 120 s) or `retries` attempts, whichever comes first, it
    raises `DatabaseLockedError` naming the holder. Other IO errors are raised at once.
    """
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    if read_only and not db_path.exists():
        raise FileNotFoundError(f"DuckDB database {db_path} does not exist yet: materialize its assets first")
    if retries is not None and retries < 1:
        raise ValueError(f"retries must be at least 1, got {retries}")
    timeout = lock_timeout_s() if timeout_s is None else float(timeout_s)
    if not math.isfinite(timeout) or timeout < 0:
        raise ValueError(f"timeout_s must be a finite number of seconds >= 0, got {timeout_s!r}")
    with _PROCESS_LOCK:
        yield from _connect_locked(db_path, read_only, retries, timeout, on_wait)


def _connect_locked(
    db_path: Path,
    read_only: bool,
    retries: int | None,
    timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    say = on_wait or logger.warning
    started = time.monotonic()
    delay, attempt, next_note = 0.05, 0, 0.0
    while True:
        attempt += 1
        try:
            con = duckdb.connect(str(db_path), read_only=read_only)
            break
        except duckdb.IOException as exc:
            message = str(exc)
            if "lock" not in message.lower():  # not contention: a corrupt file, a permission problem
                raise
            waited = time.monotonic() - started
            holder, pid = lock_holder(message)
            who = f"{holder} (PID {pid})" if pid is not None else "another process"
            if waited >= timeout_s or (retries is not None and attempt >= retries):
                raise DatabaseLockedError(
                    f"DuckDB database {db_path} is locked by {who}: gave up after {waited:.1f} s and "
                    f"{attempt} attempts (wait longer with {LOCK_TIMEOUT_ENV}=SECONDS). Close that "
                    "connection — a notebook or the DuckDB CLI holding the file open — or read with "
                    "short "
                    f"read-only connections. DuckDB said: {message}",
                    db_path,
                    holder,
                    pid,
                    waited,
                ) from exc
            if waited >= next_note:
                mode = "read" if read_only else "write"
                say(
                    f"waiting for the lock on {db_path} to {mode}: held by {who}; "
                    f"{waited:.1f} s waited of {timeout_s:g} s"
                )
                next_note = waited + _WAIT_LOG_EVERY_S
            # jitter: several waiting runs should not retry in lockstep
            time.sleep(min(delay * random.uniform(0.5, 1.0), max(0.0, timeout_s - waited)))
            delay = min(delay * 1.5, _MAX_BACKOFF_S)
    try:
        yield con
    finally:
        con.close()


def _check_identifier(name: str) -> str:
    if not name.replace("_", "").isalnum() or not name[0].isalpha():
        raise ValueError(f"invalid table name {name!r}: use letters, digits and underscores")
    return name


def write_table(con: duckdb.DuckDBPyConnection, name: str, df: pd.DataFrame) -> int:
    """Replace table `name` with `df` in one bulk statement (through Arrow), inside a transaction."""
    _check_identifier(name)
    # An Arrow relation, not a registered pandas view: DuckDB's pandas replacement scan races when
    # several connections of one process open at once ("pandas_scan does not exist").
    with _PROCESS_LOCK:
        return _write_table_locked(con, name, df)


def _write_table_locked(con: duckdb.DuckDBPyConnection, name: str, df: pd.DataFrame) -> int:
    relation = con.from_arrow(pa.Table.from_pandas(df, preserve_index=False))
    try:
        con.execute("BEGIN TRANSACTION")
        con.execute(f'DROP TABLE IF EXISTS "{name}"')
        relation.create(name)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return len(df)


def write_tables(db_path: str | os.PathLike[str], tables: Mapping[str, pd.DataFrame]) -> dict[str, int]:
    """Write several tables through one short connection; returns the row count of each."""
    with connect(db_path) as con:
        return {name: write_table(con, name, df) for name, df in tables.items()}


def select_table(con: duckdb.DuckDBPyConnection, name: str, where: str = "the database") -> pd.DataFrame:
    """All of table `name` through an open connection; a LookupError naming it if it was never written."""
    _check_identifier(name)
    tables = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    if name not in tables:
        raise LookupError(f"table {name!r} is not in {where}: materialize the asset that writes it first")
    return con.execute(f'SELECT * FROM "{name}"').df()


def read_table(db_path: str | os.PathLike[str], name: str) -> pd.DataFrame:
    with connect(db_path, read_only=True) as con:
        return select_table(con, name, str(db_path))


# --------------------------------------------------------------------------------------------
# Content hashes: the data versions Dagster uses to mark downstream assets stale.
# --------------------------------------------------------------------------------------------


def _update_with(hasher: Any, obj: Any) -> None:
    if isinstance(obj, pd.DataFrame):
        hasher.update(b"df")
        hasher.update(json.dumps([str(c) for c in obj.columns]).encode())
        hasher.update(pd.util.hash_pandas_object(obj, index=False).values.tobytes())
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        hasher.update(bytes(obj))
    elif isinstance(obj, Path):
        _update_with_path(hasher, obj)
    elif hasattr(obj, "detach") and hasattr(obj, "numpy"):  # torch tensor, without importing torch
        array = obj.detach().cpu().contiguous().numpy()
        hasher.update(str(array.dtype).encode() + str(array.shape).encode())
        hasher.update(array.tobytes())
    elif hasattr(obj, "tobytes") and hasattr(obj, "dtype"):  # numpy array
        hasher.update(str(obj.dtype).encode() + str(obj.shape).encode())
        hasher.update(obj.tobytes())
    else:
        hasher.update(json.dumps(obj, sort_keys=True, default=str).encode())


# What an artifact version folder holds about the run that wrote it rather than what it made, left out of the
# folder's content hash so that two runs writing the same files get the same data version (matched by file
# name, at any depth; a single file passed as a `Path` is always hashed):
# - `_version.json`: the artifact store's bookkeeping (run id, creation time, parent versions, data version);
# - trainer logs (wall-clock seconds, the temporary output folder, run id, finish time; their losses are
#   the weights' history, and the weights are hashed): base_model's `pretraining.json`, SFT's
#   `training_log.json`, GRPO's `grpo_log.json`, the HF Trainer's `trainer_state.json`;
# - Hugging Face datasets' `map` caches (`cache-<fingerprint>.arrow`): their names are drawn per run for
#   a transform datasets cannot fingerprint, and they repeat the saved dataset's rows;
# - `atomic_write_bytes`'s temporaries (`.<name>.<random>.tmp`): a write in progress, such as another
#   process recording a `_version.json` field while this one hashes the folder.
RUN_RECORD_FILES = frozenset(
    {"_version.json", "pretraining.json", "training_log.json", "grpo_log.json", "trainer_state.json"}
)
RUN_RECORD_PATTERNS = ("cache-*.arrow", ".*.tmp")


def is_run_record(path: Path) -> bool:
    """Whether a file in a folder being hashed records its run, not content (`RUN_RECORD_FILES`)."""
    return path.name in RUN_RECORD_FILES or any(path.match(pattern) for pattern in RUN_RECORD_PATTERNS)


def _update_with_path(hasher: Any, path: Path) -> None:
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file() and not is_run_record(p)):
            hasher.update(str(child.relative_to(path)).encode())
            _hash_file_into(hasher, child)
    elif path.is_file():
        _hash_file_into(hasher, path)
    else:
        raise FileNotFoundError(f"cannot hash {path}: it does not exist")


def _hash_file_into(hasher: Any, path: Path) -> None:
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(chunk)


def content_hash(*parts: Any) -> str:
    """A short, stable SHA-256 over DataFrames, arrays, tensors, files/folders (as `Path`) and JSON-able
    values. Pass an asset's config too, so that a config change is a new data version. A folder is hashed
    by its files' relative paths and bytes, less the files that record the run that wrote them
    (`RUN_RECORD_FILES`, `RUN_RECORD_PATTERNS`): the same content written by two runs hashes the same.
    Raises FileNotFoundError for a `Path` that does not exist."""
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(b"\x00")
        _update_with(hasher, part)
    return hasher.hexdigest()[:16]
