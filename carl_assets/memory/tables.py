"""The memory graph's tables: their columns, the `MemoryGraph` that holds them, the one node-text format,
and the column-chunked, Arrow-backed building of a table (`ColumnChunks`, `typed_frame`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from carl_assets.memory.records import show

BASE_NODE_COLUMNS = ["node_id", "kind", "text", "tags_json", "n_tags", "source_line"]
BASE_EDGE_COLUMNS = ["src", "dst", "relation", "source_line"]
NODE_COLUMNS = [*BASE_NODE_COLUMNS, "is_stub", "n_observations", "updated_at", "extra_json"]
EDGE_COLUMNS = [*BASE_EDGE_COLUMNS, "extra_json"]
REJECT_COLUMNS = ["source", "line", "reason", "raw"]
STUB_KIND = "stub"
_INT_COLUMNS = ("n_tags", "source_line", "line", "n_observations")
_BOOL_COLUMNS = ("is_stub",)
_NULLABLE_DEFAULTS: dict[str, Any] = {
    "is_stub": False,
    "n_observations": 0,
    "updated_at": None,
    "extra_json": "{}",
}
_CHUNK_ROWS = 2048


class MemorySourceError(ValueError):
    """The memory source as a whole cannot be read (missing, empty or unreadable file, unknown scheme,
    dead server). The message names the source and says what to do."""

    def __init__(self, source: str, why: str):
        super().__init__(f"cannot read memory source {source!r}: {why}")
        self.source = source


@dataclass
class MemoryGraph:
    """Nodes, edges and rejects as DataFrames (columns: NODE_COLUMNS, EDGE_COLUMNS, REJECT_COLUMNS), and
    what the reader learned about the source (`metadata`: format, encoding, line endings, marker records,
    counts of merged records, dropped repeated observations and stub nodes)."""

    source: str
    nodes: pd.DataFrame
    edges: pd.DataFrame
    rejects: pd.DataFrame
    metadata: dict[str, Any] = field(default_factory=dict)

    def texts(self) -> list[str]:
        """Every non-empty node text (tag lines stripped), in node order: tokenizer/pretraining text."""
        return [t for t in self.nodes["text"].tolist() if t and t.strip()]

    def tags(self) -> list[dict[str, int]]:
        """The tags of each node, in node order."""
        return [json.loads(t) for t in self.nodes["tags_json"].tolist()]

    def emotion_counts(self) -> dict[str, int]:
        """How many nodes carry each emotion, most common first."""
        counts: dict[str, int] = {}
        for tags in self.tags():
            for name in tags:
                counts[name] = counts.get(name, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def summary(self) -> dict[str, Any]:
        """Counts: nodes, edges, rejects, tagged nodes, stub nodes, nodes per kind, emotions, dropped
        repeated observations, merged duplicate entity records, marker records."""
        kinds = self.nodes["kind"].value_counts().sort_index()
        stubs = int(self.nodes["is_stub"].sum()) if "is_stub" in self.nodes.columns else 0
        return {
            "nodes": len(self.nodes),
            "edges": len(self.edges),
            "rejects": len(self.rejects),
            "tagged_nodes": int((self.nodes["n_tags"] > 0).sum()),
            "stub_nodes": stubs,
            "kinds": {str(k): int(v) for k, v in kinds.items()},
            "emotions": self.emotion_counts(),
            "duplicate_observations": int(self.metadata.get("duplicate_observations", 0)),
            "merged_records": int(self.metadata.get("merged_records", 0)),
            "markers": len(self.metadata.get("markers", [])),
        }


def node_header(name: str, kind: str) -> str:
    """The first line of a node's text: ``Name (kind)``, or just the name when the kind is unknown."""
    return name if kind in ("", "unknown") else f"{name} ({kind})"


def node_text(name: str, kind: str, lines: list[str]) -> str:
    """A node's text, the one format everything reads (pretraining, pairs, dream prompts): the header
    (`node_header`) on the first line, then the observation lines (tag lines removed) in order, joined by
    newlines; trailing blank space is trimmed. `node_text("Attention Is All You Need", "paper",
    ["Year: 2017"])` is ``"Attention Is All You Need (paper)\\nYear: 2017"``."""
    body = "\n".join(lines).rstrip()
    header = node_header(name, kind)
    return f"{header}\n{body}" if body else header


def normalise_kind(entity_type: str) -> str:
    """A node's kind: the entity type lower-cased and trimmed, "unknown" when empty."""
    return entity_type.strip().lower() or "unknown"


def unencodable(values: Iterable[str]) -> str | None:
    """The first string that UTF-8 cannot encode (a lone surrogate from a JSON escape like "\\ud800"),
    or None. Such a string would break the Arrow/DuckDB write of the whole table."""
    for value in values:
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"{show(value)} is not valid Unicode ({exc.reason} at character {exc.start})"
    return None


def table_json(value: Any) -> str:
    """Compact, sorted JSON that UTF-8 (and so DuckDB) can hold: non-ASCII kept, lone surrogates escaped."""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return text if unencodable([text]) is None else json.dumps(value, sort_keys=True, default=str)


class ColumnChunks:
    """Rows gathered column by column and moved into Arrow every `_CHUNK_ROWS` rows.

    Why: a node's text is most of its line, so holding every row as Python strings until the end and
    then converting would keep two copies of the file's text alive at once. Here the Python objects
    of one chunk at most live beside the Arrow columns, which become the DataFrame without a copy."""

    def __init__(self, columns: list[str]):
        self.columns = columns
        self.pending: dict[str, list[Any]] = {c: [] for c in columns}
        self.chunks: dict[str, list[Any]] = {c: [] for c in columns}
        self.rows = 0

    def append(self, row: dict[str, Any]) -> None:
        for col in self.columns:
            self.pending[col].append(row[col])
        self.rows += 1
        if len(self.pending[self.columns[0]]) >= _CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        for col in self.columns:
            if self.pending[col]:
                kind = (
                    pa.int32() if col in _INT_COLUMNS else pa.bool_() if col in _BOOL_COLUMNS else pa.string()
                )
                self.chunks[col].append(pa.array(self.pending[col], type=kind))
                self.pending[col] = []

    def frame(self) -> pd.DataFrame:
        self._flush()
        data = {}
        for col in self.columns:
            if col in _INT_COLUMNS or col in _BOOL_COLUMNS:
                parts = [c.to_numpy(zero_copy_only=False) for c in self.chunks[col]]
                data[col] = pd.Series(
                    np.concatenate(parts) if parts else np.zeros(0),
                    dtype="int32" if col in _INT_COLUMNS else "bool",
                )
            else:
                data[col] = pd.Series(
                    pa.chunked_array(self.chunks[col], type=pa.string()), dtype=pd.StringDtype()
                )
        return pd.DataFrame(data, columns=self.columns)


def typed_frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    """`rows` as a frame with the tables' dtypes (int32, bool, string)."""
    df = pd.DataFrame(rows, columns=columns)
    for col in columns:
        if col in _INT_COLUMNS:
            df[col] = df[col].astype("int32")
        elif col in _BOOL_COLUMNS:
            df[col] = df[col].astype("bool")
        else:
            # A string dtype, not object: an empty object column would reach DuckDB as type NULL.
            df[col] = df[col].astype("string")
    return df


def graph_from_tables(
    nodes: pd.DataFrame, edges: pd.DataFrame, rejects: pd.DataFrame | None = None, source: str = "tables"
) -> MemoryGraph:
    """Rebuild a graph from the DuckDB tables `memory_nodes`, `memory_edges` (and `memory_rejects`).
    Tables written before the columns `is_stub`, `n_observations`, `updated_at`, `extra_json` existed are
    read with their defaults (not a stub, 0, null, "{}")."""
    missing = [c for c in BASE_NODE_COLUMNS if c not in nodes.columns] + [
        c for c in BASE_EDGE_COLUMNS if c not in edges.columns
    ]
    if missing:
        raise ValueError(f"memory tables lack columns {missing}")
    nodes, edges = nodes.copy(), edges.copy()
    for frame, columns in ((nodes, NODE_COLUMNS), (edges, EDGE_COLUMNS)):
        for col in columns:
            if col not in frame.columns:
                frame[col] = _NULLABLE_DEFAULTS[col]
    nodes["is_stub"] = nodes["is_stub"].fillna(False).astype(bool)
    if rejects is None:
        rejects = pd.DataFrame(columns=REJECT_COLUMNS)
    nodes = nodes[NODE_COLUMNS].sort_values("source_line", kind="stable").reset_index(drop=True)
    edges = edges[EDGE_COLUMNS].sort_values("source_line", kind="stable").reset_index(drop=True)
    return MemoryGraph(
        source=source, nodes=nodes, edges=edges, rejects=rejects[REJECT_COLUMNS].reset_index(drop=True)
    )
