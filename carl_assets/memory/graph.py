"""The memory graph: nodes with text and emotion tags, links between them, and what was rejected.

Sources (one string, see `load_graph`):

- ``sample`` (default): the deterministic built-in graph (`carl_assets.memory.sample`).
- ``jsonl:PATH``: a memory file as the MCP memory server or one of its forks writes it: JSONL records
  (``{"type":"entity","name","entityType","observations":[...]}``, ``{"type":"relation","from","to",
  "relationType"}``, and the forks' shapes: ``_type`` or no type key, observation objects with ``text``,
  relation key aliases, marker lines; `carl_assets.memory.records`), or one JSON document (``{"entities":
  [...], "relations": [...]}`` or an array of records), in UTF-8 or UTF-16 with any line ending
  (`carl_assets.memory.jsonl`).
- ``mcp+stdio:COMMAND`` / ``mcp+http://HOST:PORT/PATH``: a live MCP memory server, read through its
  ``read_graph`` tool (`carl_assets.memory.mcp_source`).

Node text (`node_text`): the entity's name and type on the first line (``Attention Is All You Need
(paper)``), then its observations, one per line, with tag lines removed. The name is what a paper title,
a person or a project is known by, so it belongs in pretraining text, pairs and dream prompts. (This
changed every node text of the built-in sample, which now starts with e.g. ``journal-000 (journal)``.)

Emotion tags (`carl_assets.memory.tags`, one grammar for everything): any observation line made only of
``name:score`` tokens (lower-case ASCII name, integer 0..10, ``name: 9`` allowed) is a tag line; every one
is parsed and removed from the text, later ones winning. Everything else is prose and stays, untouched;
a near miss (``warmth:high joy:8``, ``warmth:11``) stays as prose too, with a reject row per bad token.

Nothing is lost:

- Same-name entities merge into one node: observations appended in file order, the first entity type
  wins, exact repeated observations are dropped and counted (``summary()["duplicate_observations"]``);
  the later records' lines, other types and fields are kept in the node's ``extra_json["merged"]``.
  (The official server keeps every copy and returns them all; merging keeps all of their text.)
- A relation to a name no entity has is kept, with a *stub* node for that name (``is_stub`` true, kind
  ``stub``, text = the name, no tags, ``source_line`` = the first relation naming it). Why a stub and not
  a flagged edge: older servers wrote such relations and ``read_graph`` returns them, so they are part of
  the graph's structure (up to 59 % of a real file's relations); with a node at each end every reader
  (walks, checks, DuckDB joins) sees a plain graph, and a stub can never be a training pair (no tags) nor
  a dream start (kind ``stub``).
- An exact duplicate relation (same from, to and type) is rejected as a duplicate: the edge is kept once.
- Fields the reader does not use are kept as JSON (``extra_json`` of nodes and edges: ``{"record": the
  record's other fields, "observations": the non-text fields of observation objects with their 1-based
  "index", "merged": [...]}``); marker records (``{"type":"_aim",...}``) go to ``MemoryGraph.metadata
  ["markers"]`` with their line, not to rejects.
- Timestamps: ``updated_at`` is the latest observation timestamp (ISO-8601 UTC), else the record's own
  ``updatedAt``/``_savedAt``/``createdAt``..., else null: the recency signal the dream sampler can use.

Node columns: ``node_id, kind, text, tags_json, n_tags, source_line`` and ``is_stub`` (bool),
``n_observations`` (int: distinct observations read, tag lines included), ``updated_at`` (ISO string or
null), ``extra_json`` (str). Edge columns: ``src, dst, relation, source_line, extra_json``.

Bad data never stops the load: malformed JSON, unknown record types, records that are neither entity nor
relation, fields of the wrong type, duplicate relations and near-miss tag tokens each become a row of
``rejects`` with the line number, a reason that names what was found and what was expected, and the raw
text. Lines that are not valid UTF-8, and strings that UTF-8 cannot hold (a lone surrogate from a JSON
escape such as ``"\\ud800"``), are rejects too: they would break the DuckDB tables.

Accounting, for a JSONL source: every non-blank line is a node (``source_line``), a merged record (its
node's ``extra_json["merged"][i]["line"]``), an edge, a marker (``metadata["markers"]``) or a reject (its
``line``); a line kept despite near-miss tag tokens is both, with one reject per bad token. Blank lines
are padding. A source that cannot be read, or holds no entity and no relation at all (0 bytes, only
whitespace, ``{}``, ``[]``, nothing but rejects or markers), raises `MemorySourceError` from `load_graph`
naming the file and saying what to do, so that nothing is written over the last good graph.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from carl_assets.memory.build import (
    BASE_EDGE_COLUMNS,
    BASE_NODE_COLUMNS,
    EDGE_COLUMNS,
    NODE_COLUMNS,
    REJECT_COLUMNS,
    STUB_KIND,
    MemoryGraph,
    MemorySourceError,
    graph_from_mcp_graph,
    graph_from_records,
    graph_from_tables,
    node_header,
    node_text,
)
from carl_assets.memory.jsonl import file_records
from carl_assets.memory.pairs import (
    PAIR_COLUMNS,
    count_mentions,
    extract_training_pairs,
    pair_counts,
)
from carl_assets.memory.records import show as _show
from carl_assets.memory.sample import sample_records
from carl_assets.memory.tags import (
    EMOTION_NAME,
    MAX_SCORE,
    MIN_SCORE,
    TAG_LINE,
    TAG_NAME,
    TAG_SCORE,
    TAG_TOKEN,
    TagLine,
    _is_tag_line,
    is_tag_line,
    normalise_emotion,
    parse_tag_line,
    parse_tags,
    split_observations,
    split_tag_line,
    tag_line_problems,
)

__all__ = [
    "BASE_EDGE_COLUMNS",
    "BASE_NODE_COLUMNS",
    "EDGE_COLUMNS",
    "EMOTION_NAME",
    "MAX_SCORE",
    "MIN_SCORE",
    "NODE_COLUMNS",
    "PAIR_COLUMNS",
    "REJECT_COLUMNS",
    "STUB_KIND",
    "TAG_LINE",
    "TAG_NAME",
    "TAG_SCORE",
    "TAG_TOKEN",
    "MemoryGraph",
    "MemorySourceError",
    "TagLine",
    "_is_tag_line",
    "count_mentions",
    "extract_training_pairs",
    "graph_from_mcp_graph",
    "graph_from_records",
    "graph_from_tables",
    "is_tag_line",
    "jsonl_file",
    "load_graph",
    "node_header",
    "node_text",
    "normalise_emotion",
    "pair_counts",
    "parse_tag_line",
    "parse_tags",
    "read_jsonl",
    "require_records",
    "split_observations",
    "split_tag_line",
    "tag_line_problems",
    "_show",
]

WHAT_TO_DO = (
    "point $CARL_MEMORY_SOURCE (or the memory_graph config 'source') at the memory server's file "
    "(its MEMORY_FILE_PATH, e.g. 'jsonl:~/memory.jsonl'), or use 'sample' for the built-in graph"
)


def jsonl_file(path: str | Path, source: str | None = None) -> tuple[Path, str]:
    """(the file, the source string) of a `jsonl:` source; `MemorySourceError` if it is a folder or
    missing."""
    path = Path(path).expanduser()
    source = source or f"jsonl:{path}"
    if path.is_dir():
        raise MemorySourceError(source, f"{str(path)!r} is a folder, not a JSONL file")
    if not path.is_file():
        raise MemorySourceError(source, f"no such file {str(path)!r}")
    return path, source


def read_jsonl(path: str | Path, source: str | None = None) -> MemoryGraph:
    """The graph of a memory file (JSONL or one JSON document), streamed (memory: the tables, not the
    file). An empty graph is returned as is; `load_graph` refuses it (`require_records`)."""
    path, source = jsonl_file(path, source)
    metadata: dict[str, Any] = {"path": str(path)}
    try:
        return graph_from_records(file_records(path, source, metadata), source, metadata)
    except OSError as exc:
        raise MemorySourceError(
            source, f"cannot read {str(path)!r}: {exc}; make the file readable by this user, or {WHAT_TO_DO}"
        ) from exc


def require_records(graph: MemoryGraph, source: str) -> MemoryGraph:
    """`graph` if it has at least one node; else `MemorySourceError` saying what the source held instead
    and what to do."""
    if len(graph.nodes):
        return graph
    meta = graph.metadata
    path = meta.get("path")
    where = f"{path!r}" if path else "the source"
    if path and Path(path).stat().st_size == 0:
        held = "is empty (0 bytes)"
    elif meta.get("format") == "jsonl" and meta.get("nonblank_lines", 1) == 0:
        held = "holds only whitespace"
    elif len(graph.rejects):
        first = graph.rejects.iloc[0]
        held = (
            f"holds no entity and no relation: {len(graph.rejects)} record(s) rejected (see memory_rejects), "
            f"the first at line {int(first['line'])}: {first['reason']}"
        )
    elif meta.get("markers"):
        held = f"holds only {len(meta['markers'])} marker record(s) and no entity or relation"
    else:
        held = "holds no entity and no relation (an empty graph)"
    if meta.get("not_a_json_document"):
        held += f"; it starts like one JSON document but is not valid JSON ({meta['not_a_json_document']})"
    raise MemorySourceError(source, f"{where} {held}: {WHAT_TO_DO}")


def _sample_graph() -> MemoryGraph:
    records = (
        (i, rec, json.dumps(rec, ensure_ascii=False)) for i, rec in enumerate(sample_records(), start=1)
    )
    return graph_from_records(records, "sample", {"format": "sample"})


def load_graph(source: str, timeout_s: float | None = None) -> MemoryGraph:
    """Load the memory graph from `source`: ``sample``, ``jsonl:PATH``, ``mcp+stdio:COMMAND`` or
    ``mcp+http(s)://HOST:PORT/PATH``. Raises `MemorySourceError` naming the source if it cannot be read or
    holds no entity and no relation. `timeout_s` bounds a live MCP read (default `$CARL_MCP_TIMEOUT`, else
    60 s)."""
    source = source.strip()
    if source == "sample":
        return _sample_graph()
    if source.startswith("jsonl:"):
        path = source[len("jsonl:") :].strip()
        if not path:
            raise MemorySourceError(source, "no path after 'jsonl:'")
        return require_records(read_jsonl(path, source), source)
    if source.startswith(("mcp+stdio:", "mcp+http://", "mcp+https://")):
        from carl_assets.memory.mcp_source import read_mcp_graph  # here: mcp + anyio take 0.7 s to import

        return require_records(graph_from_mcp_graph(read_mcp_graph(source, timeout_s), source), source)
    raise MemorySourceError(
        source,
        "unknown scheme: use 'sample', 'jsonl:PATH', 'mcp+stdio:COMMAND' or 'mcp+http://HOST:PORT/PATH'",
    )
