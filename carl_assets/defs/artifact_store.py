"""The versioned artifact store under CARL_HOME, as a Dagster resource: `<home>/artifacts/<asset>/<version>/`
folders made atomically, `current` pointing at the newest, the last `keep_versions` kept, and the one place
that picks which version a run reads (`ArtifactStore.resolve`). Its two settings are `StoreSettings`,
shared with the IO manager (`carl_assets.defs.io_manager`) that hands the same versions to readers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import BaseModel, Field, PrivateAttr

from carl_assets import storage
from carl_assets.artifacts import (
    DEFAULT_KEEP,
    VERSION_COLUMNS,
    ArtifactVersion,
    ArtifactVersionError,
    ArtifactVersions,
    all_versions,
)
from carl_assets.handles import AssetHandle, make_handle

VERSIONS_TABLE = "artifact_versions"


class StoreSettings(BaseModel):
    """Where the artifact store is and how many versions it keeps (the store resource and the IO manager
    inherit these, so both name the same folders)."""

    home: str | None = Field(
        default=None, description="CARL_HOME (None: $CARL_HOME, else the project's .carl)"
    )
    keep_versions: int = Field(
        default=DEFAULT_KEEP, ge=1, description="versions of each artifact kept for rollback"
    )


class ArtifactStore(dg.ConfigurableResource, StoreSettings):
    """Where asset artifacts live: `<home>/artifacts/<asset>/<version>/...`, `current` pointing at the
    newest; each write is a new version folder made atomically, and the last `keep_versions` are kept."""

    _run_id: str | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Inside a run, an upstream the run made itself is read from its own version, not `current`:
        # another run overlapping this one may have promoted its version in between.
        self._run_id = context.run.run_id if context.run else None

    @property
    def root(self) -> Path:
        """CARL_HOME (made if missing)."""
        return storage.carl_home(self.home or None)

    @property
    def database(self) -> Path:
        """The DuckDB file under CARL_HOME."""
        return self.root / storage.DATABASE_NAME

    def versions(self, asset: str) -> ArtifactVersions:
        """All kept versions of `asset` (for writing and listing; a read of one goes through `resolve`)."""
        return ArtifactVersions(storage.artifact_dir(asset, self.root), asset, keep=self.keep_versions)

    @property
    def run_id(self) -> str | None:
        """The run this resource was set up for (None outside a run)."""
        return self._run_id

    def for_run(self, run_id: str | None) -> ArtifactStore:
        """The same store as set up for run `run_id` (its reads resolve that run's versions first)."""
        store = ArtifactStore(home=self.home, keep_versions=self.keep_versions)
        store._run_id = run_id
        return store

    def resolve(self, asset: str, run_ids: tuple[str | None, ...] = ()) -> str | None:
        """The one place a version is chosen for reading: the newest version made by the first of `run_ids`
        (then this run) that made one, else `current`; None when the asset has no version. Every read of a
        run goes through here, so a path and its `_version.json` always name the same version even after an
        overlapping run promoted another `current`."""
        versions = self.versions(asset)
        for run_id in (*run_ids, self._run_id):
            if run_id:
                made = versions.made_by(run_id)
                if made is not None:
                    return made
        return versions.current_name()

    def path(self, asset: str, version: str | None = None) -> Path:
        """The folder of a version of the asset's artifacts (default: `resolve(asset)`: the one this run
        made, if it made one, else the current one)."""
        return self.versions(asset).path(version or self.resolve(asset))

    def info(self, asset: str, version: str | None = None) -> ArtifactVersion:
        """A version's `_version.json` (default: `resolve(asset)`, the same version `path` names)."""
        return self.versions(asset).info(version or self.resolve(asset))

    def handle(self, asset: str, run_ids: tuple[str | None, ...] = ()) -> AssetHandle:
        """The typed handle a downstream asset receives for `asset` (version from `resolve`)."""
        version = self.resolve(asset, run_ids)
        path = self.versions(asset).path(version) if version is not None else None
        return make_handle(asset, version, path, self.database)

    @contextlib.contextmanager
    def write_version(
        self, asset: str, run_id: str | None = None, parents: dict[str, str] | None = None
    ) -> Iterator[tuple[Path, str]]:
        """(temporary folder, version name); the folder becomes the asset's new current version when the
        block succeeds, and the `artifact_versions` table is refreshed."""
        # The run that writes is known from the resource's set-up: every version names its run.
        with self.versions(asset).write(run_id=run_id or self._run_id, parents=parents) as (tmp, name):
            yield tmp, name
        self.refresh_table()

    @contextlib.contextmanager
    def write_dir(self, asset: str, run_id: str | None = None) -> Iterator[Path]:
        """A temporary folder that becomes the asset's new current version when the block succeeds."""
        with self.write_version(asset, run_id=run_id) as (tmp, _):
            yield tmp

    def require(self, asset: str, filename: str | None = None, version: str | None = None) -> Path:
        """A version's folder (or a file in it); a clear error if the upstream asset was never
        materialized."""
        try:
            folder = self.path(asset, version)
        except ArtifactVersionError as exc:
            raise FileNotFoundError(str(exc)) from None
        path = folder if filename is None else folder / filename
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: materialize the upstream asset {asset!r} first")
        return path

    def record(self, asset: str, version: str, **fields: object) -> None:
        """Add fields to a version's `_version.json` (see `ArtifactVersions.record`) and refresh the table."""
        self.versions(asset).record(version, **fields)
        self.refresh_table()

    def refresh_table(self) -> int:
        """Rewrite `artifact_versions` from the folders on disk (the disk is the source of truth)."""
        with storage.connect(self.database, on_wait=say_waiting) as con:
            # Listed while holding the writer lock: a listing made before it could miss a version another
            # run placed meanwhile and overwrite that run's fresher table.
            rows = pd.DataFrame(all_versions(self.root), columns=VERSION_COLUMNS)
            return storage.write_table(con, VERSIONS_TABLE, rows)


def say_waiting(message: str) -> None:
    # Inside a run this logger writes to the run's event log, so the UI shows whose lock a step waits for.
    dg.get_dagster_logger("carl_assets.storage").warning(message)
