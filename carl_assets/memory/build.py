"""Records -> the graph's three tables (nodes, edges, rejects) and its metadata.

The rules (the module docstring of `carl_assets.memory.graph` explains them for users):

- node text: `node_text` (name and type, then the observations without tag lines);
- same-name entities merge (`_merge_duplicates`): observations appended in file order, first entity type
  wins, exact repeats dropped and counted (`MemoryGraph.summary()["duplicate_observations"]`);
- a relation to a name no entity has gets a *stub* node (`is_stub`, kind "stub", text = the name, no tags);
- exact duplicate relations (same from, to and type) are rejected as duplicates: the edge exists once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from carl_assets.memory.records import (
    Entity,
    RecordProblem,
    classify,
    iso_utc,
    parse_entity,
    parse_relation,
    relation_problem,
    show,
)
from carl_assets.memory.tags import parse_tag_line, split_observations

BASE_NODE_COLUMNS = ["node_id", "kind", "text", "tags_json", "n_tags", "source_line"]
BASE_EDGE_COLUMNS = ["src", "dst", "relation", "source_line"]
NODE_COLUMNS = [*BASE_NODE_COLUMNS, "is_stub", "n_observations", "updated_at", "extra_json"]
EDGE_COLUMNS = [*BASE_EDGE_COLUMNS, "extra_json"]
REJECT_COLUMNS = ["source", "line", "reason", "raw"]
STUB_KIND = "stub"
_RAW_LIMIT = 2000
_INT_COLUMNS = ("n_tags", "source_line", "line", "n_observations")
_BOOL_COLUMNS = ("is_stub",)
_NULLABLE_DEFAULTS: dict[str, Any] = {"is_stub": False, "n_observations": 0, "updated_at": None, "extra_json": "{}"}
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


def _unencodable(values: Iterable[str]) -> str | None:
    """The first string that UTF-8 cannot encode (a lone surrogate from a JSON escape like "\\ud800"),
    or None. Such a string would break the Arrow/DuckDB write of the whole table."""
    for value in values:
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"{show(value)} is not valid Unicode ({exc.reason} at character {exc.start})"
    return None


def _json(value: Any) -> str:
    """Compact, sorted JSON that UTF-8 (and so DuckDB) can hold: non-ASCII kept, lone surrogates escaped."""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return text if _unencodable([text]) is None else json.dumps(value, sort_keys=True, default=str)


class _ColumnChunks:
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
        import pyarrow as pa

        for col in self.columns:
            if self.pending[col]:
                kind = pa.int32() if col in _INT_COLUMNS else pa.bool_() if col in _BOOL_COLUMNS else pa.string()
                self.chunks[col].append(pa.array(self.pending[col], type=kind))
                self.pending[col] = []

    def frame(self) -> pd.DataFrame:
        import pyarrow as pa

        self._flush()
        data = {}
        for col in self.columns:
            if col in _INT_COLUMNS or col in _BOOL_COLUMNS:
                parts = [c.to_numpy(zero_copy_only=False) for c in self.chunks[col]]
                data[col] = pd.Series(np.concatenate(parts) if parts else np.zeros(0),
                                      dtype="int32" if col in _INT_COLUMNS else "bool")
            else:
                data[col] = pd.Series(pa.chunked_array(self.chunks[col], type=pa.string()), dtype=pd.StringDtype())
        return pd.DataFrame(data, columns=self.columns)


@dataclass
class _Later:
    """A later record of an already seen entity name, merged at the end."""

    line: int
    entity: Entity
    raw: str


@dataclass
class _Builder:
    """Turns raw records (dicts with line numbers) into the three tables."""

    source: str
    metadata: dict[str, Any] = field(default_factory=dict)
    nodes: _ColumnChunks = field(default_factory=lambda: _ColumnChunks(NODE_COLUMNS))
    # (line, raw cut to _RAW_LIMIT, from, to, relationType, extra_json): valid relations wait for all nodes
    # to be known (a tuple of strings, not the record: a big file has many)
    relations: list[tuple[int, str, str, str, str, str]] = field(default_factory=list)
    rejects: _ColumnChunks = field(default_factory=lambda: _ColumnChunks(REJECT_COLUMNS))
    row_of: dict[str, int] = field(default_factory=dict)
    later: dict[str, list[_Later]] = field(default_factory=dict)
    markers: list[dict[str, Any]] = field(default_factory=list)
    duplicate_observations: int = 0

    def reject(self, line: int, reason: str, raw: str) -> None:
        raw = raw[:_RAW_LIMIT]
        if _unencodable([raw]):  # keep the evidence, written so that the table can hold it
            raw = raw.encode("utf-8", "backslashreplace").decode("utf-8")
        self.rejects.append({"source": self.source, "line": int(line), "reason": reason, "raw": raw})

    def add(self, line: int, record: Any, raw: str) -> None:
        """One parsed JSON value of `line`: a record, or an array of records (all with that line)."""
        if isinstance(record, list):
            if not record:
                return self.reject(line, "an empty JSON array: no record", raw)
            for index, item in enumerate(record, start=1):
                if isinstance(item, dict):
                    self._record(line, item, json.dumps(item, ensure_ascii=False, default=str))
                else:
                    self.reject(line, f"element {index} of the JSON array is a JSON {type(item).__name__}, "
                                      "not an object (a record)", json.dumps(item, default=str))
            return None
        if not isinstance(record, dict):
            return self.reject(line, f"record is a JSON {type(record).__name__}, not an object", raw)
        return self._record(line, record, raw)

    def _record(self, line: int, record: dict[str, Any], raw: str) -> None:
        try:
            kind = classify(record)
            if kind == "entity":
                self._entity(line, parse_entity(record), raw)
            elif kind == "relation":
                self._relation(line, record, raw)
            else:
                self.markers.append({"line": int(line), "record": record})
        except RecordProblem as problem:
            self.reject(line, str(problem), raw)

    def _entity(self, line: int, entity: Entity, raw: str) -> None:
        name = entity.name
        if bad := _unencodable([name, entity.entity_type, *entity.observations]):
            return self.reject(line, f"entity {show(name)}: {bad}", raw)
        if name in self.row_of:
            self.later.setdefault(name, []).append(_Later(line, entity, raw[:_RAW_LIMIT]))
            return None
        observations = self._unique(entity.observations, set())
        split = split_observations(observations)
        self._tag_problems(line, name, split.problems, raw)
        kind = normalise_kind(entity.entity_type)
        extra: dict[str, Any] = {}
        if entity.extra:
            extra["record"] = entity.extra
        if entity.observation_fields:
            extra["observations"] = entity.observation_fields
        self.row_of[name] = self.nodes.rows
        self.nodes.append({
            "node_id": name, "kind": kind, "text": node_text(name, kind, split.lines),
            "tags_json": json.dumps(split.tags, sort_keys=True), "n_tags": len(split.tags), "source_line": int(line),
            "is_stub": False, "n_observations": len(observations), "updated_at": iso_utc(entity.updated_at),
            "extra_json": _json(extra) if extra else "{}",
        })
        return None

    def _unique(self, observations: list[str], seen: set[str]) -> list[str]:
        """`observations` without exact repeats (of each other or of `seen`), counting those dropped."""
        if not seen and len(set(observations)) == len(observations):  # no repeat: the common case, fast
            return observations
        kept = []
        for observation in observations:
            if observation in seen:
                self.duplicate_observations += 1
            else:
                seen.add(observation)
                kept.append(observation)
        return kept

    def _tag_problems(self, line: int, name: str, problems: list[tuple[str, str]], raw: str) -> None:
        for token, why in problems:
            self.reject(line, f"bad tag token {show(token)} in node {show(name)}: {why} (the line is not a tag "
                              "line: it stays in the text as prose; fix it to make it one)", raw)

    def _merge_duplicates(self, nodes: pd.DataFrame) -> None:
        """Fold later same-name records into their node (in place): observations appended in file order,
        the first entity type kept, exact repeats dropped and counted, tags merged (later wins)."""
        for name, records in self.later.items():
            row = self.row_of[name]
            kind = str(nodes.at[row, "kind"])
            text, header = str(nodes.at[row, "text"]), node_header(name, kind)
            lines = text[len(header) + 1:].split("\n") if len(text) > len(header) else []
            tags = json.loads(nodes.at[row, "tags_json"])
            extra = json.loads(nodes.at[row, "extra_json"])
            stamps = [s for s in [nodes.at[row, "updated_at"]] if isinstance(s, str)]
            seen, body = set(lines), "\n" + "\n".join(lines) + "\n"
            added = 0
            for later in records:
                fresh = []
                for observation in later.entity.observations:
                    tag_line = parse_tag_line(observation)
                    repeat = (observation in seen or ("\n" in observation and f"\n{observation}\n" in body)
                              or (tag_line is not None and all(tags.get(k) == v for k, v in tag_line.tags.items())))
                    if repeat:
                        self.duplicate_observations += 1
                    else:
                        seen.add(observation)
                        fresh.append(observation)
                split = split_observations(fresh)
                self._tag_problems(later.line, name, split.problems, later.raw)
                tags.update(split.tags)
                lines += split.lines
                body += "\n".join(split.lines) + "\n"
                added += len(fresh)
                if (stamp := iso_utc(later.entity.updated_at)) is not None:
                    stamps.append(stamp)
                extra.setdefault("merged", []).append(_merged_entry(later, kind))
            nodes.at[row, "text"] = node_text(name, kind, lines)
            nodes.at[row, "tags_json"] = json.dumps(tags, sort_keys=True)
            nodes.at[row, "n_tags"] = len(tags)
            nodes.at[row, "n_observations"] = int(nodes.at[row, "n_observations"]) + added
            nodes.at[row, "updated_at"] = max(stamps) if stamps else None
            nodes.at[row, "extra_json"] = _json(extra)

    def _relation(self, line: int, record: dict[str, Any], raw: str) -> None:
        relation = parse_relation(record)
        src, dst, rel = relation.src, relation.dst, relation.relation
        if why := relation_problem(relation, record):
            return self.reject(line, why, raw)
        if bad := _unencodable([src, dst, rel]):
            return self.reject(line, f"relation {show(src)} -> {show(dst)}: {bad}", raw)
        extra = _json({"record": relation.extra}) if relation.extra else "{}"
        self.relations.append((line, raw[:_RAW_LIMIT], src, dst, rel, extra))
        return None

    def _edges(self) -> list[dict[str, Any]]:
        """Valid relations as edge rows, duplicates rejected; stub nodes appended for ends no entity has."""
        edges, seen = [], set()
        for line, raw, src, dst, rel, extra in self.relations:
            if (src, dst, rel) in seen:
                self.reject(line, f"duplicate relation {show(src)} -[{show(rel)}]-> {show(dst)} (the edge is "
                                  "kept once)", raw)
                continue
            seen.add((src, dst, rel))
            for end in (src, dst):
                if end not in self.row_of:
                    self._stub(end, line)
            edges.append({"src": src, "dst": dst, "relation": rel, "source_line": int(line), "extra_json": extra})
        return edges

    def _stub(self, name: str, line: int) -> None:
        self.row_of[name] = self.nodes.rows
        self.nodes.append({"node_id": name, "kind": STUB_KIND, "text": name, "tags_json": "{}", "n_tags": 0,
                           "source_line": int(line), "is_stub": True, "n_observations": 0, "updated_at": None,
                           "extra_json": "{}"})

    def build(self) -> MemoryGraph:
        entity_rows = self.nodes.rows
        edges = self._edges()
        nodes = self.nodes.frame()
        self._merge_duplicates(nodes)
        if len(nodes) > entity_rows:  # stubs were appended: put them in line order among the entities
            nodes = nodes.sort_values("source_line", kind="stable").reset_index(drop=True)
        rejects = self.rejects.frame()
        if not rejects["line"].is_monotonic_increasing:  # relation rejects come last: put them in line order
            rejects = rejects.sort_values("line", kind="stable").reset_index(drop=True)
        metadata = {**self.metadata, "markers": self.markers, "duplicate_observations": self.duplicate_observations,
                    "merged_records": sum(len(v) for v in self.later.values()),
                    "stub_nodes": len(nodes) - entity_rows}
        return MemoryGraph(source=self.source, nodes=nodes, edges=_frame(edges, EDGE_COLUMNS), rejects=rejects,
                           metadata=metadata)


def _merged_entry(later: _Later, kind: str) -> dict[str, Any]:
    """What `extra_json["merged"]` keeps of a later same-name record: its line, and what the node does not
    already show (a different entity type, the record's other fields, observation fields)."""
    entry: dict[str, Any] = {"line": later.line}
    if normalise_kind(later.entity.entity_type) != kind:
        entry["entityType"] = later.entity.entity_type
    if later.entity.extra:
        entry["record"] = later.entity.extra
    if later.entity.observation_fields:
        entry["observations"] = later.entity.observation_fields
    return entry


def _frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
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


def graph_from_records(records: Iterable[tuple[int, Any, str]], source: str,
                       metadata: dict[str, Any] | None = None) -> MemoryGraph:
    """Build a graph from `(line_number, parsed_value, raw_text)` triples. A value may be a record (a JSON
    object), an array of records (all numbered with that line), or an `Exception` for a line that could
    not be parsed, which becomes a reject with its message as the reason."""
    builder = _Builder(source, metadata if metadata is not None else {})
    for line, record, raw in records:
        if isinstance(record, Exception):
            builder.reject(line, str(record), raw)
        else:
            builder.add(line, record, raw)
    return builder.build()


def document_records(document: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """(records, the document's other top-level keys) of a `read_graph`-shaped document
    `{"entities": [...], "relations": [...]}`: entities first, then relations, each typed by its list."""
    def typed(items: Any, kind: str) -> list[Any]:
        if not isinstance(items, list):
            return [items]  # rejected record by record, with its type named
        return [dict(r, type=kind) if isinstance(r, dict) and not any(k in r for k in ("type", "_type")) else r
                for r in items]

    records = typed(document.get("entities") or [], "entity") + typed(document.get("relations") or [], "relation")
    return records, {k: v for k, v in document.items() if k not in ("entities", "relations")}


def is_graph_document(value: Any) -> bool:
    """True for `{"entities": [...], "relations": [...]}` (either key alone too) that is not a record."""
    return isinstance(value, dict) and ("entities" in value or "relations" in value) and not any(
        k in value for k in ("type", "_type", "name", "from"))


def graph_from_mcp_graph(graph: dict[str, Any], source: str) -> MemoryGraph:
    """Build a graph from a `read_graph` result (`{"entities": [...], "relations": [...]}`).

    Records are numbered as the server would write them to its JSONL file (entities first, then
    relations, from 1), so a live read and the file give the same tables."""
    records, others = document_records(graph)
    metadata = {"format": "read_graph", **({"document": others} if others else {})}
    return graph_from_records(
        ((i, rec, json.dumps(rec, ensure_ascii=False, default=str)) for i, rec in enumerate(records, start=1)),
        source, metadata)


def graph_from_tables(
    nodes: pd.DataFrame, edges: pd.DataFrame, rejects: pd.DataFrame | None = None, source: str = "tables"
) -> MemoryGraph:
    """Rebuild a graph from the DuckDB tables `memory_nodes`, `memory_edges` (and `memory_rejects`).
    Tables written before the columns `is_stub`, `n_observations`, `updated_at`, `extra_json` existed are
    read with their defaults (not a stub, 0, null, "{}")."""
    missing = [c for c in BASE_NODE_COLUMNS if c not in nodes.columns] + [
        c for c in BASE_EDGE_COLUMNS if c not in edges.columns]
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
    return MemoryGraph(source=source, nodes=nodes, edges=edges, rejects=rejects[REJECT_COLUMNS].reset_index(drop=True))
