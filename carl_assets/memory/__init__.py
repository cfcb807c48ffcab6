"""The memory graph: parsing tag lines, loading a source (sample, JSONL, live MCP server), training pairs.

- `graph`: `MemoryGraph`, `load_graph`, `parse_tags`, `extract_training_pairs` (also importable as
  `carl_assets.memory_graph`, the old path: docs/architecture.md); it re-exports the pieces below.
- `tags`: the one tag-line grammar; `records`: one record in any shape the server and its forks write;
  `jsonl`: reading a file (encodings, line endings, JSONL or one JSON document); `build`: records -> tables;
  `pairs`: the training pairs.
- `sample`: the deterministic built-in sample graph.
- `mcp_source`: reading a live MCP memory server with its `read_graph` tool.
- `fingerprint`: the version of a source (what the Dagster source asset observes).
"""

from carl_assets.memory.graph import (
    MemoryGraph,
    MemorySourceError,
    extract_training_pairs,
    graph_from_tables,
    load_graph,
    parse_tags,
)

__all__ = ["MemoryGraph", "MemorySourceError", "extract_training_pairs", "graph_from_tables", "load_graph",
           "parse_tags"]
