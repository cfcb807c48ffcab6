"""Helpers shared by the asset modules: data versions, metadata, table previews."""

from __future__ import annotations

from typing import Any

import dagster as dg
import pandas as pd

from carl_assets import storage
from carl_assets.plotting import png_markdown


def config_values(config: dg.Config | None) -> dict[str, Any]:
    return {} if config is None else config.model_dump()


def materialized(
    *version_parts: Any,
    config: dg.Config | None = None,
    metadata: dict[str, Any] | None = None,
    plots: dict[str, bytes] | None = None,
) -> dg.MaterializeResult:
    """A MaterializeResult whose data version hashes the content *and* the asset's config, so that a
    change of either makes downstream assets stale."""
    version = storage.content_hash(config_values(config), *version_parts)
    meta: dict[str, Any] = {"data_version": version}
    meta.update(metadata or {})
    for name, png in (plots or {}).items():
        meta[name] = dg.MetadataValue.md(png_markdown(png, alt=name))
    return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(version))


def table_preview(df: pd.DataFrame, rows: int = 10) -> dg.MetadataValue:
    """A markdown table of the first rows, with long strings shortened."""
    head = df.head(rows).copy()
    for col in head.columns:
        if head[col].dtype == object:
            head[col] = head[col].map(lambda v: (str(v)[:77] + "...") if len(str(v)) > 80 else v)
    if not len(head):
        return dg.MetadataValue.md("_(empty)_")
    cells = [[str(c) for c in head.columns]] + [[str(v).replace("|", "\\|").replace("\n", " ") for v in row] for row in head.itertuples(index=False)]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(head.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    return dg.MetadataValue.md("\n".join(lines))
