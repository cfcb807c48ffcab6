"""Resources, built in one place: the DuckDB database, the versioned artifact store under CARL_HOME
(`carl_assets.defs.artifact_store`) and its IO manager, and the memory source every run reads; and the
table reads and writes assets share."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource
from pydantic import Field

from carl_assets import storage
from carl_assets.defs.artifact_store import VERSIONS_TABLE, ArtifactStore, say_waiting
from carl_assets.defs.io_manager import ArtifactIOManager
from carl_assets.project_env import DEFAULT_MEMORY_SOURCE, MEMORY_SOURCE_VAR, normalise_memory_source

# The store's names, importable from here as before (the asset modules read them with the other resources).
__all__ = [
    "VERSIONS_TABLE",
    "ArtifactStore",
    "MemorySource",
    "append_rows",
    "build_resources",
    "memory_source_from_env",
    "read_table",
    "write_tables",
]


class MemorySource(dg.ConfigurableResource):
    """The memory graph every run reads, unless an asset's config overrides it for one run."""

    source: str = Field(
        default=DEFAULT_MEMORY_SOURCE,
        description="'sample' (built in), 'jsonl:PATH' (MCP memory-server file), 'mcp+stdio:COMMAND' or "
        "'mcp+http://HOST:PORT/PATH'. Set from $CARL_MEMORY_SOURCE (the project's .env).",
    )

    @property
    def resolved(self) -> str:
        """The source string as the readers take it: quotes and whitespace dropped, a bare file path read
        as `jsonl:PATH`, empty meaning the default ('sample')."""
        return normalise_memory_source(self.source) or DEFAULT_MEMORY_SOURCE


def memory_source_from_env() -> MemorySource:
    # Resolved when a run starts (an EnvVar), so a changed variable needs no reload; read through `resolved`.
    return (
        MemorySource(source=dg.EnvVar(MEMORY_SOURCE_VAR))
        if os.environ.get(MEMORY_SOURCE_VAR)
        else MemorySource()
    )


def write_tables(duckdb: DuckDBResource, tables: dict[str, pd.DataFrame]) -> dict[str, int]:
    """Replace each table in bulk through one short connection (waiting, and saying so in the run's log,
    while a notebook or another run holds the database)."""
    with storage.connect(duckdb.database, on_wait=say_waiting) as con:
        return {name: storage.write_table(con, name, df) for name, df in tables.items()}


def append_rows(
    duckdb: DuckDBResource, name: str, new: pd.DataFrame, key: str, sort_by: str | None = None
) -> pd.DataFrame:
    """Add rows to a table kept across runs, replacing earlier rows with the same `key` value (a rerun
    replaces its own rows); optionally ordered by `sort_by`. The read and the write share one connection,
    so a concurrent run's rows are never lost in between. Returns the whole table."""
    with storage.connect(duckdb.database, on_wait=say_waiting) as con:
        try:
            old = storage.select_table(con, name, duckdb.database)
        except LookupError:
            old = pd.DataFrame(columns=new.columns)
        if key in old.columns:
            old = old[~old[key].isin(set(new[key]))]
        both = new if old.empty else pd.concat([old.astype(object), new.astype(object)], ignore_index=True)
        both = both.infer_objects()
        if sort_by is not None:
            both = both.sort_values(sort_by, kind="stable").reset_index(drop=True)
        storage.write_table(con, name, both)
    return both


def read_table(duckdb: DuckDBResource, name: str) -> pd.DataFrame:
    with storage.connect(
        duckdb.database, read_only=Path(duckdb.database).exists(), on_wait=say_waiting
    ) as con:
        return storage.select_table(con, name, duckdb.database)


def build_resources(home: str | os.PathLike[str] | None = None) -> dict[str, dg.ConfigurableResource]:
    """The resources every asset uses. `home` overrides `$CARL_HOME` (tests pass a temp folder)."""
    root = storage.carl_home(home)
    return {
        "duckdb": DuckDBResource(database=str(root / storage.DATABASE_NAME)),
        "artifacts": ArtifactStore(home=str(root)),
        # Declared inputs arrive as handles of the version this run made (carl_assets.handles).
        "io_manager": ArtifactIOManager(home=str(root)),
        "memory_source": memory_source_from_env(),
        "pipes": dg.PipesSubprocessClient(),  # runs SFT under torchrun / accelerate launch (sft_checkpoint)
    }
