"""Resources, built in one place: the DuckDB database and the artifact store under CARL_HOME."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource

from carl_assets import storage


class ArtifactStore(dg.ConfigurableResource):
    """Where asset artifacts live: `<home>/artifacts/<asset>/...`, written atomically.

    `home` empty means `$CARL_HOME`, else `./.carl`, resolved when a run starts.
    """

    home: str = ""

    @property
    def root(self) -> Path:
        return storage.carl_home(self.home or None)

    @property
    def database(self) -> Path:
        return self.root / storage.DATABASE_NAME

    def path(self, asset: str) -> Path:
        """The final folder of an asset's artifacts (it may not exist yet)."""
        return storage.artifact_dir(asset, self.root)

    @contextlib.contextmanager
    def write_dir(self, asset: str) -> Iterator[Path]:
        """A temporary folder that replaces the asset's folder in one rename when the block succeeds."""
        with storage.atomic_directory(self.path(asset)) as tmp:
            yield tmp

    def require(self, asset: str, filename: str | None = None) -> Path:
        """The asset's folder (or a file in it); a clear error if the upstream asset was never materialized."""
        path = self.path(asset) if filename is None else self.path(asset) / filename
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: materialize the upstream asset {asset!r} first")
        return path


def write_tables(duckdb: DuckDBResource, tables: dict[str, pd.DataFrame]) -> dict[str, int]:
    """Replace each table in bulk through one short connection."""
    with duckdb.get_connection() as con:
        return {name: storage.write_table(con, name, df) for name, df in tables.items()}


def read_table(duckdb: DuckDBResource, name: str) -> pd.DataFrame:
    with duckdb.get_connection() as con:
        return storage.select_table(con, name, duckdb.database)


def build_resources(home: str | os.PathLike[str] | None = None) -> dict[str, dg.ConfigurableResource]:
    """The resources every asset uses. `home` overrides `$CARL_HOME` (tests pass a temp folder)."""
    root = storage.carl_home(home)
    return {
        "duckdb": DuckDBResource(database=str(root / storage.DATABASE_NAME)),
        "artifacts": ArtifactStore(home=str(root)),
    }
