"""Versioned artifacts: each materialization writes `artifacts/<asset>/<version>/`, the last N are kept.

Layout of one asset:

    artifacts/<asset>/
        20261126T120501Z-1a2b3c4d/     one folder per materialization (time + run id), never changed again
            ...files...
            _version.json              asset, version, run id, created_at, data version, parent versions,
                                       the content hash (once asked for)
        current -> 20261126T...        a relative symlink, swapped atomically to the newest version

A reader resolves `current` once and reads a complete folder; an old materialization's path in the UI
stays valid while its version is kept. Rolling back = starting the next run from a named version (or
`promote()`-ing it to `current`). A version's name says when and by which run it was made; its content
hash (`content_id`) says what it holds, and is what a downstream data version may depend on. Nothing here
imports Dagster.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carl_assets import storage

CURRENT = "current"
VERSION_FILE = "_version.json"
DEFAULT_KEEP = 5
LEGACY_VERSION = "00000000T000000Z-legacy"
_VERSION_NAME = re.compile(r"^\d{8}T\d{6}(\d{6})?Z-[0-9a-z]{4,32}$")
VERSION_COLUMNS = [
    "asset",
    "version",
    "path",
    "current",
    "created_at",
    "run_id",
    "data_version",
    "parents_json",
    "files",
    "bytes",
]


class ArtifactVersionError(LookupError):
    """A requested artifact or version does not exist."""


@dataclass
class ArtifactVersion:
    asset: str
    version: str
    path: str
    created_at: str
    run_id: str = ""
    data_version: str = ""
    parents: dict[str, str] = field(default_factory=dict)  # upstream asset -> version it was made from
    content_hash: str = ""  # storage.content_hash of the folder, once `content_id` computed it
    extra: dict[str, Any] = field(default_factory=dict)


def new_version_name(run_id: str | None = None, now: dt.datetime | None = None) -> str:
    """`<UTC time to the microsecond>Z-<8 chars of the run id><4 random>`: sorts by time, names the run
    that made it, and stays unique when one run writes twice in the same microsecond."""
    now = now or dt.datetime.now(dt.timezone.utc)
    tag = re.sub(r"[^0-9a-z]", "", (run_id or uuid.uuid4().hex).lower())[:8] or uuid.uuid4().hex[:8]
    return f"{now.strftime('%Y%m%dT%H%M%S%f')}Z-{tag}{uuid.uuid4().hex[:4]}"


class ArtifactVersions:
    """The versions of one asset's artifacts under `root` (= `<home>/artifacts/<asset>`)."""

    def __init__(self, root: str | os.PathLike[str], asset: str, keep: int = DEFAULT_KEEP) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1 (got {keep})")
        self.root = Path(root)
        self.asset = asset
        self.keep = keep

    # ---- reading ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Version folder names, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.is_symlink() and _VERSION_NAME.match(p.name)
        )

    def current_name(self) -> str | None:
        link = self.root / CURRENT
        if link.is_symlink():
            target = os.readlink(link)
            return Path(target).name if (self.root / target).is_dir() else None
        names = self.names()
        return names[-1] if names else None

    def made_by(self, run_id: str) -> str | None:
        """The newest version written by run `run_id` (its `_version.json` says so), or None. A step reads
        what an upstream step of its own run made from here: `current` may meanwhile point at the
        version of another run that overlaps this one."""
        tag = re.sub(r"[^0-9a-z]", "", run_id.lower())[:8]
        for name in reversed(self.names()):
            # the name carries 8 chars of the run id: read only the candidates' _version.json
            if not tag or name.split("-", 1)[-1].startswith(tag):
                meta_file = self.root / name / VERSION_FILE
                if meta_file.is_file() and json.loads(meta_file.read_text()).get("run_id") == run_id:
                    return name
        return None

    def path(self, version: str | None = None) -> Path:
        """The folder of `version` (default: the current one); ArtifactVersionError if it is not there."""
        name = version or self.current_name()
        if name is None:
            raise ArtifactVersionError(
                f"{self.root} has no version yet: materialize the asset {self.asset!r} first"
            )
        if name == CURRENT:
            return self.path(None)
        folder = self.root / name
        if not _VERSION_NAME.match(name) or not folder.is_dir():
            known = ", ".join(self.names()) or "none"
            raise ArtifactVersionError(f"{self.asset!r} has no version {name!r} (kept: {known})")
        return folder

    def info(self, version: str | None = None) -> ArtifactVersion:
        folder = self.path(version)
        meta_file = folder / VERSION_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        return ArtifactVersion(
            asset=self.asset,
            version=folder.name,
            path=str(folder),
            created_at=str(meta.get("created_at", "")),
            run_id=str(meta.get("run_id", "")),
            data_version=str(meta.get("data_version", "")),
            parents=dict(meta.get("parents", {})),
            content_hash=str(meta.get("content_hash", "")),
            extra=dict(meta.get("extra", {})),
        )

    def content_id(self, version: str | None = None) -> str:
        """What version `version` (default: the current one) holds, independent of the run that wrote it:
        `storage.content_hash` of its folder, which leaves out `_version.json` and the other run records
        (`storage.RUN_RECORD_FILES`). Computed once and kept in `_version.json` (a version's files never
        change after it is written). ArtifactVersionError if the version is not kept."""
        return folder_content_id(self.path(version))

    def listing(self) -> list[dict[str, Any]]:
        """One row per kept version (the rows of the `artifact_versions` table)."""
        current = self.current_name()
        rows = []
        for name in self.names():
            info = self.info(name)
            files = [p for p in (self.root / name).rglob("*") if p.is_file()]
            rows.append(
                {
                    "asset": self.asset,
                    "version": name,
                    "path": info.path,
                    "current": name == current,
                    "created_at": info.created_at,
                    "run_id": info.run_id,
                    "data_version": info.data_version,
                    "parents_json": json.dumps(info.parents, sort_keys=True),
                    "files": len(files),
                    "bytes": int(sum(p.stat().st_size for p in files)),
                }
            )
        return rows

    # ---- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def write(
        self, run_id: str | None = None, parents: dict[str, str] | None = None
    ) -> Iterator[tuple[Path, str]]:
        """Yield (a temporary folder, the version name); on success the folder becomes the new version
        in one rename, `current` points at it, and versions beyond `keep` are removed (oldest first,
        never the current one). On failure nothing visible changes."""
        name = new_version_name(run_id)
        self.root.mkdir(parents=True, exist_ok=True)
        self.adopt_legacy_layout()
        with storage.atomic_directory(self.root / name) as tmp:
            yield tmp, name
            meta = {
                "asset": self.asset,
                "version": name,
                "run_id": run_id or "",
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                "parents": parents or {},
            }
            storage.atomic_write_json(tmp / VERSION_FILE, meta)
        self.promote(name)
        self.prune()

    def adopt_legacy_layout(self) -> str | None:
        """A home written before versions existed holds the files directly in `artifacts/<asset>/`:
        move them into a version of their own (`00000000T000000Z-legacy`) so they can still be rolled
        back to."""
        loose = (
            [
                p
                for p in self.root.iterdir()
                if p.name != CURRENT
                and not p.name.startswith(".")
                and not (p.is_dir() and _VERSION_NAME.match(p.name))
            ]
            if self.root.is_dir()
            else []
        )
        if not loose:
            return None
        legacy = self.root / LEGACY_VERSION
        legacy.mkdir(exist_ok=True)
        for item in loose:
            os.replace(item, legacy / item.name)
        if not (self.root / CURRENT).is_symlink():
            self.promote(LEGACY_VERSION)
        return LEGACY_VERSION

    def record(self, version: str, **fields: Any) -> None:
        """Add fields (the data version, say) to a version's `_version.json` once they are known."""
        meta_file = self.path(version) / VERSION_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        for key, value in fields.items():
            if key in ("data_version", "run_id", "parents", "content_hash"):
                meta[key] = value
            else:
                meta.setdefault("extra", {})[key] = value
        storage.atomic_write_json(meta_file, meta)

    def promote(self, version: str) -> Path:
        """Point `current` at `version` (atomic: a new symlink renamed over the old one)."""
        folder = self.path(version)
        tmp_link = self.root / f".{CURRENT}.{uuid.uuid4().hex[:8]}"
        os.symlink(folder.name, tmp_link)
        os.replace(tmp_link, self.root / CURRENT)
        return folder

    def prune(self) -> list[str]:
        """Remove the oldest versions beyond `keep`; the current version is always kept."""
        names = self.names()
        current = self.current_name()
        removable = [n for n in names if n != current]
        excess = len(names) - self.keep
        removed = []
        for name in removable[: max(0, excess)]:
            shutil.rmtree(self.root / name, ignore_errors=True)
            removed.append(name)
        return removed


def folder_content_id(folder: str | os.PathLike[str]) -> str:
    """`storage.content_hash` of a folder (run records left out). A version folder's hash is kept in its
    `_version.json` (`content_hash`) the first time, and read from there after: a policy's weights are
    hashed once, not at every read. Another folder (a model outside the store) is hashed each time.
    FileNotFoundError if the folder does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot hash {folder}: it is not a folder")
    meta_file = folder / VERSION_FILE
    versioned = bool(_VERSION_NAME.match(folder.name)) and meta_file.is_file()
    if versioned:
        known = json.loads(meta_file.read_text()).get("content_hash")
        if known:
            return str(known)
    digest = storage.content_hash(folder)
    if versioned:
        ArtifactVersions(folder.parent, folder.parent.name).record(folder.name, content_hash=digest)
    return digest


def all_versions(home: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The `artifact_versions` rows of every asset under `<home>/artifacts`."""
    base = Path(home) / storage.ARTIFACTS_DIR
    rows: list[dict[str, Any]] = []
    if base.is_dir():
        for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            rows.extend(ArtifactVersions(folder, folder.name).listing())
    return rows
