"""Helpers shared by the asset modules: data versions, Dagster-native table metadata, previews."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import pandas as pd
from pydantic import BaseModel

from carl_assets import storage
from carl_assets.plotting import png_markdown
from carl_assets.settings import PERFORMANCE_ONLY  # noqa: F401 - the asset modules take it from here too

# Fields marked PERFORMANCE_ONLY (carl_assets.settings) stay out of the data version, so tuning them never
# marks downstream stale; `threads` is one wherever it appears.
_PERFORMANCE_NAMES = {"threads"}


def performance_only_fields(config: dg.Config) -> set[str]:
    names = set()
    for name, info in type(config).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("performance_only") or name in _PERFORMANCE_NAMES:
            names.add(name)
    return names


def config_values(config: dg.Config | None) -> dict[str, Any]:
    """The config values that define an asset's content (performance-only fields left out)."""
    if config is None:
        return {}
    skip = performance_only_fields(config)
    return {k: v for k, v in config.model_dump().items() if k not in skip}


SettingsT = TypeVar("SettingsT", bound=BaseModel)


def library_config(config: dg.Config, cls: type[SettingsT]) -> SettingsT:
    """The library config `cls` holding `config`'s values of `cls`'s fields (the asset's own fields left
    out): the Dagster config inherits `cls`, so each setting is defined once (`carl_assets.settings`)."""
    return cls.model_validate({name: getattr(config, name) for name in cls.model_fields})


_DTYPES = {"b": "bool", "i": "int", "u": "int", "f": "float", "M": "timestamp", "m": "interval"}


def table_schema(df: pd.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(str(c), _DTYPES.get(df[c].dtype.kind, "string"))
                                   for c in df.columns])


def table_metadata(name: str, df: pd.DataFrame, database: str | Path | None = None) -> dict[str, Any]:
    """Dagster's standard table metadata (row count, column schema, table name) for one DuckDB table.
    The first table an asset writes gets the `dagster/` keys; every table gets `<name>/...` keys."""
    schema = table_schema(df)
    return {
        f"{name}/rows": len(df),
        f"{name}/columns": dg.MetadataValue.table_schema(schema),
        f"{name}/table": f"{Path(database).name + '.' if database else ''}{name}",
    }


def materialized(
    *version_parts: Any,
    config: dg.Config | None = None,
    metadata: dict[str, Any] | None = None,
    plots: dict[str, bytes] | None = None,
    tables: dict[str, pd.DataFrame] | None = None,
    uri: str | Path | None = None,
    check_results: list[dg.AssetCheckResult] | None = None,
) -> dg.MaterializeResult:
    """A MaterializeResult whose data version hashes the content *and* the asset's config (less its
    performance-only fields), so that a change of either makes downstream assets stale.

    `tables`: the DuckDB tables the asset wrote, reported as `dagster/row_count`, `dagster/column_schema`
    and `dagster/table_name` (the first one) and per table. `uri`: the artifact version folder (stays
    valid while that version is kept)."""
    version = storage.content_hash(config_values(config), *version_parts)
    meta: dict[str, Any] = {"data_version": version}
    for i, (name, df) in enumerate((tables or {}).items()):
        if i == 0:
            meta["dagster/row_count"] = len(df)
            meta["dagster/column_schema"] = dg.MetadataValue.table_schema(table_schema(df))
            meta["dagster/table_name"] = name
        if len(tables or {}) > 1:
            meta.update(table_metadata(name, df))
    if uri is not None:
        meta["dagster/uri"] = dg.MetadataValue.path(str(uri))
    meta.update(metadata or {})
    for name, png in (plots or {}).items():
        meta[name] = dg.MetadataValue.md(png_markdown(png, alt=name))
    return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(version),
                                check_results=check_results or None)


def _cell(value: Any) -> str | int | float | bool | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, (bool, int, float, str)):
        return value if not isinstance(value, str) or len(value) <= 80 else value[:77] + "..."
    if hasattr(value, "item"):  # numpy scalars
        return _cell(value.item())
    return _cell(str(value))


def table_preview(df: pd.DataFrame, rows: int = 10) -> dg.MetadataValue:
    """The first rows as a Dagster table (typed columns, long strings shortened)."""
    head = df.head(rows)
    records = [dg.TableRecord({str(c): _cell(v) for c, v in zip(head.columns, row, strict=True)})
               for row in head.itertuples(index=False)]
    return dg.MetadataValue.table(records=records, schema=table_schema(head))
