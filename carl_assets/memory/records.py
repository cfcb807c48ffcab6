"""One record of a memory file, whatever shape the MCP memory server or one of its forks wrote it in.

Shapes recognised (`classify`):

- the official server: ``{"type":"entity","name","entityType","observations":[...]}`` and
  ``{"type":"relation","from","to","relationType"}``;
- ``_type`` instead of ``type`` (mcp-think-tank), or no type key at all (ports in other languages): an
  entity is inferred from ``name`` with ``entityType`` or ``observations``, a relation from its two ends;
- relation ends under ``from``/``to``, ``from_entity``/``to_entity``, ``source``/``target``,
  ``src``/``dst`` or ``fromEntity``/``toEntity``; its type under ``relationType``, ``relation_type`` or
  ``relation`` (missing: the empty string); ``entity_type`` for ``entityType``;
- observations as strings, or as objects with a ``text`` string (their other fields, such as
  ``timestamp`` and ``version``, are kept);
- marker / metadata records: a ``type`` that starts with ``_`` (``{"type":"_aim","source":
  "mcp-knowledge-graph"}``) or is ``metadata``/``meta``/``header``.

Every field the reader does not use is kept (`Entity.extra`, `Relation.extra`); nothing is dropped.
Timestamps (`parse_timestamp`): ISO-8601 strings, or numbers of seconds (milliseconds above 1e11) since the
epoch; written back as ISO-8601 UTC with milliseconds (``2025-05-11T15:54:05.242Z``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

TYPE_KEYS = ("type", "_type")
ENTITY_TYPE_KEYS = ("entityType", "entity_type")
FROM_KEYS = ("from", "from_entity", "source", "src", "fromEntity")
TO_KEYS = ("to", "to_entity", "target", "dst", "toEntity")
RELATION_TYPE_KEYS = ("relationType", "relation_type", "relation")
# Record-level times, most telling first; observation objects use the same keys.
TIMESTAMP_KEYS = ("updatedAt", "updated_at", "_savedAt", "timestamp", "createdAt", "created_at")
MARKER_TYPES = frozenset({"metadata", "meta", "header"})
_ENTITY_KEYS = frozenset({"name", "observations", *TYPE_KEYS})
EXPECTED = "expected an entity (name, entityType, observations) or a relation (from, to, relationType)"
_SHOW_LIMIT = 120


def show(value: Any) -> str:
    """`repr(value)` cut to a readable length: reasons quote names, and a hostile name can be 1 MB."""
    text = repr(value)
    return text if len(text) <= _SHOW_LIMIT else f"{text[: _SHOW_LIMIT - 3]}..."


def _keys(record: dict[str, Any]) -> str:
    keys = [str(k) for k in record]
    return show(keys[:12] + (["..."] if len(keys) > 12 else []))


class RecordProblem(ValueError):
    """A record that cannot become a node or an edge; the message is the reject reason."""


@dataclass
class Entity:
    name: str
    entity_type: str
    observations: list[str]
    updated_at: datetime | None = None  # the latest observation time, else the record's own time
    observation_fields: list[dict[str, Any]] = field(default_factory=list)  # non-text fields, with "index"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Relation:
    src: Any
    dst: Any
    relation: Any
    extra: dict[str, Any] = field(default_factory=dict)


def classify(record: dict[str, Any]) -> str:
    """ "entity", "relation" or "marker" for a record (a JSON object); `RecordProblem` naming the keys found
    and what was expected otherwise."""
    declared = record.get("type")
    if declared is None or declared == "":
        declared = record.get("_type")
    if declared in ("entity", "relation"):
        return declared
    if (
        isinstance(declared, str)
        and declared
        and (declared.startswith("_") or declared.lower() in MARKER_TYPES)
    ):
        return "marker"
    if declared is not None and declared != "":
        raise RecordProblem(
            f"unknown record type {show(declared)} (record has keys {_keys(record)}): {EXPECTED}"
        )
    if "name" in record and any(k in record for k in (*ENTITY_TYPE_KEYS, "observations")):
        return "entity"
    if any(k in record for k in FROM_KEYS) and any(k in record for k in TO_KEYS):
        return "relation"
    raise RecordProblem(f"record has keys {_keys(record)}: {EXPECTED}")


def _first_key(record: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in record), None)


def parse_entity(record: dict[str, Any]) -> Entity:
    """The entity of a record `classify` called "entity"; `RecordProblem` if a field has the wrong type."""
    name = record.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RecordProblem(
            f"entity without a name: 'name' is {show(name)}, expected a non-empty string "
            f"(record has keys {_keys(record)})"
        )
    type_key = _first_key(record, ENTITY_TYPE_KEYS)
    entity_type = record.get(type_key, "") if type_key else ""
    if entity_type is None:
        entity_type = ""
    if not isinstance(entity_type, str):
        raise RecordProblem(f"entity {show(name)}: entityType is {show(entity_type)}, expected a string")
    raw_observations = record.get("observations", [])
    if raw_observations is None:
        raw_observations = []
    if not isinstance(raw_observations, list):
        raise RecordProblem(
            f"entity {show(name)}: observations is a {type(raw_observations).__name__}, "
            "expected a list of strings (or of objects with a 'text' string)"
        )
    entity = Entity(name, entity_type, [])
    times: list[datetime] = []
    if all(type(item) is str for item in raw_observations):  # the common case, fast
        entity.observations = list(raw_observations)
        raw_observations = []
    for index, item in enumerate(raw_observations, start=1):
        if isinstance(item, str):
            entity.observations.append(item)
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            entity.observations.append(item["text"])
            others = {k: v for k, v in item.items() if k != "text"}
            if others:
                entity.observation_fields.append({"index": index, **others})
            times += [t for k in TIMESTAMP_KEYS if k in item and (t := parse_timestamp(item[k])) is not None]
        else:
            raise RecordProblem(
                f"entity {show(name)}: observation {index} is {show(item)}, expected a string "
                "or an object with a 'text' string (observations is not a list of strings)"
            )
    entity.extra = {k: v for k, v in record.items() if k not in _ENTITY_KEYS and k != type_key}
    if not times and entity.extra:  # no observation time: the record's own
        times = [
            t
            for k in TIMESTAMP_KEYS
            if k in entity.extra and (t := parse_timestamp(entity.extra[k])) is not None
        ]
    entity.updated_at = max(times) if times else None
    return entity


def parse_relation(record: dict[str, Any]) -> Relation:
    """The relation of a record `classify` called "relation"; its fields are checked by the builder."""
    src_key, dst_key = _first_key(record, FROM_KEYS), _first_key(record, TO_KEYS)
    rel_key = _first_key(record, RELATION_TYPE_KEYS)
    used = {*TYPE_KEYS, src_key, dst_key, rel_key} - {None}
    return Relation(
        src=record.get(src_key) if src_key else None,
        dst=record.get(dst_key) if dst_key else None,
        relation=record.get(rel_key, "") if rel_key else "",
        extra={k: v for k, v in record.items() if k not in used},
    )


def relation_problem(relation: Relation, record: dict[str, Any]) -> str | None:
    """Why a relation cannot be an edge (ends must be non-blank strings, the type a string), or None."""
    ends_ok = all(isinstance(v, str) and v.strip() for v in (relation.src, relation.dst))
    if ends_ok and isinstance(relation.relation, str):
        return None
    return (
        f"relation needs string 'from', 'to' and 'relationType': found from={show(relation.src)}, "
        f"to={show(relation.dst)}, relationType={show(relation.relation)} (record has keys {_keys(record)})"
    )


def parse_timestamp(value: Any) -> datetime | None:
    """A UTC datetime from an ISO-8601 string (no zone: UTC) or a number of seconds since the epoch (above
    1e11: milliseconds); None for anything else (the value is still kept with the record's fields)."""
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            seconds = value / 1000.0 if abs(value) >= 1e11 else float(value)
            return datetime.fromtimestamp(seconds, tz=timezone.utc)
        if isinstance(value, str) and 0 < len(value) <= 64:
            stamp = datetime.fromisoformat(value.strip())
            return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    except (ValueError, OverflowError, OSError):
        return None
    return None


def iso_utc(stamp: datetime | None) -> str | None:
    """`2025-05-11T15:54:05.242Z` (sorts as text for years 1000..9999), or None."""
    if stamp is None:
        return None
    return stamp.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
