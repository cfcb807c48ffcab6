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
from carl_assets.memory.tables import (
    BASE_EDGE_COLUMNS,
    BASE_NODE_COLUMNS,
    EDGE_COLUMNS,
    NODE_COLUMNS,
    REJECT_COLUMNS,
    STUB_KIND,
    ColumnChunks,
    MemoryGraph,
    MemorySourceError,
    graph_from_tables,
    node_header,
    node_text,
    normalise_kind,
    table_json,
    typed_frame,
    unencodable,
)
from carl_assets.memory.tags import parse_tag_line, split_observations

__all__ = [
    "BASE_EDGE_COLUMNS",
    "BASE_NODE_COLUMNS",
    "EDGE_COLUMNS",
    "NODE_COLUMNS",
    "REJECT_COLUMNS",
    "STUB_KIND",
    "MemoryGraph",
    "MemorySourceError",
    "document_records",
    "graph_from_mcp_graph",
    "graph_from_records",
    "graph_from_tables",
    "is_graph_document",
    "node_header",
    "node_text",
    "normalise_kind",
]

_RAW_LIMIT = 2000  # characters of a rejected line kept as evidence


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
    nodes: ColumnChunks = field(default_factory=lambda: ColumnChunks(NODE_COLUMNS))
    # (line, raw cut to _RAW_LIMIT, from, to, relationType, extra_json): valid relations wait for all nodes
    # to be known (a tuple of strings, not the record: a big file has many)
    relations: list[tuple[int, str, str, str, str, str]] = field(default_factory=list)
    rejects: ColumnChunks = field(default_factory=lambda: ColumnChunks(REJECT_COLUMNS))
    row_of: dict[str, int] = field(default_factory=dict)
    later: dict[str, list[_Later]] = field(default_factory=dict)
    markers: list[dict[str, Any]] = field(default_factory=list)
    duplicate_observations: int = 0

    def reject(self, line: int, reason: str, raw: str) -> None:
        raw = raw[:_RAW_LIMIT]
        if unencodable([raw]):  # keep the evidence, written so that the table can hold it
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
                    self.reject(
                        line,
                        f"element {index} of the JSON array is a JSON {type(item).__name__}, "
                        "not an object (a record)",
                        json.dumps(item, default=str),
                    )
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
        if bad := unencodable([name, entity.entity_type, *entity.observations]):
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
        self.nodes.append(
            {
                "node_id": name,
                "kind": kind,
                "text": node_text(name, kind, split.lines),
                "tags_json": json.dumps(split.tags, sort_keys=True),
                "n_tags": len(split.tags),
                "source_line": int(line),
                "is_stub": False,
                "n_observations": len(observations),
                "updated_at": iso_utc(entity.updated_at),
                "extra_json": table_json(extra) if extra else "{}",
            }
        )
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
            self.reject(
                line,
                f"bad tag token {show(token)} in node {show(name)}: {why} (the line is not a tag "
                "line: it stays in the text as prose; fix it to make it one)",
                raw,
            )

    def _merge_duplicates(self, nodes: pd.DataFrame) -> None:
        """Fold later same-name records into their node (in place): observations appended in file order,
        the first entity type kept, exact repeats dropped and counted, tags merged (later wins)."""
        for name, records in self.later.items():
            row = self.row_of[name]
            kind = str(nodes.at[row, "kind"])
            text, header = str(nodes.at[row, "text"]), node_header(name, kind)
            lines = text[len(header) + 1 :].split("\n") if len(text) > len(header) else []
            tags = json.loads(nodes.at[row, "tags_json"])
            extra = json.loads(nodes.at[row, "extra_json"])
            stamps = [s for s in [nodes.at[row, "updated_at"]] if isinstance(s, str)]
            seen, body = set(lines), "\n" + "\n".join(lines) + "\n"
            added = 0
            for later in records:
                fresh = []
                for observation in later.entity.observations:
                    tag_line = parse_tag_line(observation)
                    repeat = (
                        observation in seen
                        or ("\n" in observation and f"\n{observation}\n" in body)
                        or (tag_line is not None and all(tags.get(k) == v for k, v in tag_line.tags.items()))
                    )
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
            nodes.at[row, "extra_json"] = table_json(extra)

    def _relation(self, line: int, record: dict[str, Any], raw: str) -> None:
        relation = parse_relation(record)
        src, dst, rel = relation.src, relation.dst, relation.relation
        if why := relation_problem(relation, record):
            return self.reject(line, why, raw)
        if bad := unencodable([src, dst, rel]):
            return self.reject(line, f"relation {show(src)} -> {show(dst)}: {bad}", raw)
        extra = table_json({"record": relation.extra}) if relation.extra else "{}"
        self.relations.append((line, raw[:_RAW_LIMIT], src, dst, rel, extra))
        return None

    def _edges(self) -> list[dict[str, Any]]:
        """Valid relations as edge rows, duplicates rejected; stub nodes appended for ends no entity has."""
        edges, seen = [], set()
        for line, raw, src, dst, rel, extra in self.relations:
            if (src, dst, rel) in seen:
                self.reject(
                    line,
                    f"duplicate relation {show(src)} -[{show(rel)}]-> {show(dst)} (the edge is kept once)",
                    raw,
                )
                continue
            seen.add((src, dst, rel))
            for end in (src, dst):
                if end not in self.row_of:
                    self._stub(end, line)
            edges.append(
                {"src": src, "dst": dst, "relation": rel, "source_line": int(line), "extra_json": extra}
            )
        return edges

    def _stub(self, name: str, line: int) -> None:
        self.row_of[name] = self.nodes.rows
        self.nodes.append(
            {
                "node_id": name,
                "kind": STUB_KIND,
                "text": name,
                "tags_json": "{}",
                "n_tags": 0,
                "source_line": int(line),
                "is_stub": True,
                "n_observations": 0,
                "updated_at": None,
                "extra_json": "{}",
            }
        )

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
        metadata = {
            **self.metadata,
            "markers": self.markers,
            "duplicate_observations": self.duplicate_observations,
            "merged_records": sum(len(v) for v in self.later.values()),
            "stub_nodes": len(nodes) - entity_rows,
        }
        return MemoryGraph(
            source=self.source,
            nodes=nodes,
            edges=typed_frame(edges, EDGE_COLUMNS),
            rejects=rejects,
            metadata=metadata,
        )


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


def graph_from_records(
    records: Iterable[tuple[int, Any, str]], source: str, metadata: dict[str, Any] | None = None
) -> MemoryGraph:
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
        return [
            dict(r, type=kind) if isinstance(r, dict) and not any(k in r for k in ("type", "_type")) else r
            for r in items
        ]

    records = typed(document.get("entities") or [], "entity") + typed(
        document.get("relations") or [], "relation"
    )
    return records, {k: v for k, v in document.items() if k not in ("entities", "relations")}


def is_graph_document(value: Any) -> bool:
    """True for `{"entities": [...], "relations": [...]}` (either key alone too) that is not a record."""
    return (
        isinstance(value, dict)
        and ("entities" in value or "relations" in value)
        and not any(k in value for k in ("type", "_type", "name", "from"))
    )


def graph_from_mcp_graph(graph: dict[str, Any], source: str) -> MemoryGraph:
    """Build a graph from a `read_graph` result (`{"entities": [...], "relations": [...]}`).

    Records are numbered as the server would write them to its JSONL file (entities first, then
    relations, from 1), so a live read and the file give the same tables."""
    records, others = document_records(graph)
    metadata = {"format": "read_graph", **({"document": others} if others else {})}
    return graph_from_records(
        (
            (i, rec, json.dumps(rec, ensure_ascii=False, default=str))
            for i, rec in enumerate(records, start=1)
        ),
        source,
        metadata,
    )
