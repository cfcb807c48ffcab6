"""The version of a memory source, cheap enough to compute every few minutes.

- `sample`: a hash of the built-in sample's records (changes only with the package).
- `jsonl:PATH`: size, modification time and a hash of the file's last 64 KiB. The MCP memory server
  appends and rewrites whole files, so a change shows in the size, the mtime or the tail; the
  file is never read whole.
- `mcp+stdio:` / `mcp+http(s)://`: a live server has no mtime, so the graph is read with `read_graph`
  and its entity/relation counts and a hash of its canonical JSON are the version.

The Dagster source asset reports `version` as its data version; the `memory_graph_changed` sensor keeps
it as its cursor.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carl_assets.memory.graph import MemorySourceError, jsonl_file
from carl_assets.memory.sample import sample_records

TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class SourceFingerprint:
    source: str
    kind: str  # "sample" | "file" | "mcp"
    version: str  # short hex: the data version
    details: dict[str, Any] = field(default_factory=dict)


def _short(hasher: Any) -> str:
    return hasher.hexdigest()[:16]


def file_fingerprint(path: str | Path, source: str | None = None) -> SourceFingerprint:
    path, source = jsonl_file(path, source)
    stat = path.stat()
    with open(path, "rb") as handle:
        handle.seek(max(0, stat.st_size - TAIL_BYTES))
        tail = handle.read()
    hasher = hashlib.sha256()
    hasher.update(f"{stat.st_size}:{stat.st_mtime_ns}:".encode())
    hasher.update(tail)
    return SourceFingerprint(
        source,
        "file",
        _short(hasher),
        {
            "path": str(path.resolve()),
            "size_bytes": int(stat.st_size),
            "mtime_ns": int(stat.st_mtime_ns),
            "tail_sha256": hashlib.sha256(tail).hexdigest()[:16],
        },
    )


def graph_fingerprint(graph: dict[str, Any], source: str) -> SourceFingerprint:
    """The version of a graph read from a live server: counts and a hash of its canonical JSON."""
    entities = graph.get("entities", []) or []
    relations = graph.get("relations", []) or []
    hasher = hashlib.sha256(json.dumps(graph, sort_keys=True, ensure_ascii=False, default=str).encode())
    return SourceFingerprint(
        source, "mcp", _short(hasher), {"entities": len(entities), "relations": len(relations)}
    )


def source_fingerprint(source: str) -> SourceFingerprint:
    """The fingerprint of any memory source string `load_graph` accepts; `MemorySourceError` if it
    cannot be read."""
    source = source.strip()
    if source == "sample":
        hasher = hashlib.sha256(json.dumps(sample_records(), sort_keys=True, ensure_ascii=False).encode())
        return SourceFingerprint(source, "sample", _short(hasher), {})
    if source.startswith("jsonl:"):
        path = source[len("jsonl:") :].strip()
        if not path:
            raise MemorySourceError(source, "no path after 'jsonl:'")
        return file_fingerprint(path, source)
    if source.startswith(("mcp+stdio:", "mcp+http://", "mcp+https://")):
        from carl_assets.memory.mcp_source import read_mcp_graph  # loads mcp (0.5 s): MCP sources only

        return graph_fingerprint(read_mcp_graph(source), source)
    raise MemorySourceError(
        source,
        "unknown scheme: use 'sample', 'jsonl:PATH', 'mcp+stdio:COMMAND' or 'mcp+http://HOST:PORT/PATH'",
    )
