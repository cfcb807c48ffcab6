"""The memory graph: nodes with text and emotion tags, links between them, and what was rejected.

A node's text is its observations joined by newlines. Its *last* line may be the emotion tag line
the subconscious agents emit (``warmth:9 clarity:10 frustration:2``); that line is parsed into tags
and stripped from the text, so that training text never contains its own labels.

Sources (one string, see `load_graph`):

- ``sample`` (default): the deterministic built-in graph (`carl_assets.memory.sample`).
- ``jsonl:PATH``: the JSONL knowledge graph the MCP memory server writes, one record a line:
  ``{"type":"entity","name","entityType","observations":[...]}`` and
  ``{"type":"relation","from","to","relationType"}``.
- ``mcp+stdio:COMMAND`` / ``mcp+http://HOST:PORT/PATH``: a live MCP memory server, read through its
  ``read_graph`` tool (`carl_assets.memory.mcp_source`).

Bad data never stops the load: malformed JSON, unknown record types, invalid fields, duplicate node
names (the first one wins), duplicate relations, relations to missing nodes and bad tag tokens each
become a row of ``rejects`` with the line number and the reason. A bad tag token (``warmth:high``,
``:9``, ``warmth:99``, ``self-doubt:3``) rejects only that token: the node is kept with its valid
tags, because its text is still good data. Only an unreadable source raises (`MemorySourceError`).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

MIN_SCORE = 0
MAX_SCORE = 10
# Emotion names reach file names and SQL: lower-case letters and underscores only.
EMOTION_NAME = re.compile(r"^[a-z][a-z_]{0,63}$")
# A tag token is anything with exactly one colon; a line made only of such tokens is a tag line.
_TOKEN_SHAPE = re.compile(r"^[^\s:]*:[^\s:]*$")
_SCORE = re.compile(r"^\d{1,3}$")

NODE_COLUMNS = ["node_id", "kind", "text", "tags_json", "n_tags", "source_line"]
EDGE_COLUMNS = ["src", "dst", "relation", "source_line"]
REJECT_COLUMNS = ["source", "line", "reason", "raw"]
PAIR_COLUMNS = ["emotion", "polarity", "text", "node_id"]
_RAW_LIMIT = 2000


class MemorySourceError(ValueError):
    """The memory source as a whole cannot be read (missing file, unknown scheme, dead server)."""

    def __init__(self, source: str, why: str):
        super().__init__(f"cannot read memory source {source!r}: {why}")
        self.source = source


# --------------------------------------------------------------------------------------------
# Tags
# --------------------------------------------------------------------------------------------


@dataclass
class TagLine:
    """A parsed tag line: the valid tags, and each bad token with the reason it was refused."""

    tags: dict[str, int] = field(default_factory=dict)
    bad: list[tuple[str, str]] = field(default_factory=list)


def normalise_emotion(name: str) -> str | None:
    """Lower-case `name`; None unless it is a plain word (letters and underscores)."""
    name = name.strip().lower()
    return name if EMOTION_NAME.match(name) else None


def _is_tag_line(line: str) -> bool:
    tokens = line.split()
    # Every token is `something:something`, and at least one looks like `word:value` (a name that
    # starts with a letter, a value after the colon), so that "Time: 10:30" stays prose while
    # "warmth:high" is a (bad) tag line.
    return bool(tokens) and all(_TOKEN_SHAPE.match(t) for t in tokens) and any(
        t[:1].isalpha() and not t.endswith(":") for t in tokens
    )


def parse_tag_line(line: str) -> TagLine | None:
    """Parse one line of `emotion:score` tokens; None if the line is not a tag line at all.

    Scores are integers 0..10. Names are lower-cased and must be plain words. A repeated emotion
    keeps its first score; the repeat is a bad token.
    """
    if not _is_tag_line(line):
        return None
    parsed = TagLine()
    for token in line.split():
        raw_name, raw_score = token.split(":", 1)
        name = normalise_emotion(raw_name)
        if not raw_name:
            parsed.bad.append((token, "missing emotion name"))
        elif name is None:
            parsed.bad.append((token, f"emotion name {raw_name!r} is not a plain word (letters and underscores)"))
        elif not _SCORE.match(raw_score):
            parsed.bad.append((token, f"score {raw_score!r} is not an integer"))
        elif not MIN_SCORE <= int(raw_score) <= MAX_SCORE:
            parsed.bad.append((token, f"score {int(raw_score)} is outside {MIN_SCORE}..{MAX_SCORE}"))
        elif name in parsed.tags:
            parsed.bad.append((token, f"emotion {name!r} repeated"))
        else:
            parsed.tags[name] = int(raw_score)
    return parsed


def split_tag_line(text: str) -> tuple[str, TagLine | None]:
    """(text without its trailing tag line, the parsed tag line or None)."""
    lines = text.rstrip().split("\n")
    if lines and (parsed := parse_tag_line(lines[-1])) is not None:
        return "\n".join(lines[:-1]).rstrip(), parsed
    return text.rstrip(), None


def parse_tags(text: str) -> dict[str, int]:
    """The valid emotion tags of a node's text (its last line, if that is a tag line); bad tokens
    are dropped. `parse_tags("note\\nwarmth:9 Love:8 joy:high")` is `{"warmth": 9, "love": 8}`."""
    parsed = split_tag_line(text)[1]
    return dict(parsed.tags) if parsed is not None else {}


# --------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------


@dataclass
class MemoryGraph:
    """Nodes, edges and rejects as DataFrames (columns: NODE_COLUMNS, EDGE_COLUMNS, REJECT_COLUMNS)."""

    source: str
    nodes: pd.DataFrame
    edges: pd.DataFrame
    rejects: pd.DataFrame

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
        kinds = self.nodes["kind"].value_counts().sort_index()
        return {
            "nodes": len(self.nodes),
            "edges": len(self.edges),
            "rejects": len(self.rejects),
            "tagged_nodes": int((self.nodes["n_tags"] > 0).sum()),
            "kinds": {str(k): int(v) for k, v in kinds.items()},
            "emotions": self.emotion_counts(),
        }


@dataclass
class _Builder:
    """Turns raw records (entity/relation dicts with line numbers) into the three tables."""

    source: str
    nodes: list[dict[str, Any]] = field(default_factory=list)
    relations: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    first_line: dict[str, int] = field(default_factory=dict)

    def reject(self, line: int, reason: str, raw: str) -> None:
        self.rejects.append({"source": self.source, "line": int(line), "reason": reason, "raw": raw[:_RAW_LIMIT]})

    def add(self, line: int, record: Any, raw: str) -> None:
        if not isinstance(record, dict):
            self.reject(line, f"record is a JSON {type(record).__name__}, not an object", raw)
        elif record.get("type") == "entity":
            self._entity(line, record, raw)
        elif record.get("type") == "relation":
            self.relations.append((line, raw, record))
        else:
            self.reject(line, f"unknown record type {record.get('type')!r}", raw)

    def _entity(self, line: int, record: dict[str, Any], raw: str) -> None:
        name, kind, observations = record.get("name"), record.get("entityType", ""), record.get("observations", [])
        if not isinstance(name, str) or not name.strip():
            return self.reject(line, "entity without a name", raw)
        if not isinstance(kind, str):
            return self.reject(line, f"entity {name!r}: entityType is not a string", raw)
        if not isinstance(observations, list) or not all(isinstance(o, str) for o in observations):
            return self.reject(line, f"entity {name!r}: observations is not a list of strings", raw)
        if name in self.first_line:
            return self.reject(line, f"duplicate node name {name!r} (first at line {self.first_line[name]})", raw)
        self.first_line[name] = line
        text, tag_line = split_tag_line("\n".join(observations))
        tags: dict[str, int] = {}
        if tag_line is not None:
            tags = tag_line.tags
            for token, why in tag_line.bad:
                self.reject(line, f"bad tag token {token!r} in node {name!r}: {why} (node kept with its valid tags)", raw)
        self.nodes.append({
            "node_id": name,
            "kind": kind.strip().lower() or "unknown",
            "text": text,
            "tags_json": json.dumps(tags, sort_keys=True),
            "n_tags": len(tags),
            "source_line": int(line),
        })

    def build(self) -> MemoryGraph:
        edges, seen = [], set()
        for line, raw, record in self.relations:
            src, dst, rel = record.get("from"), record.get("to"), record.get("relationType", "")
            if not all(isinstance(v, str) for v in (src, dst, rel)) or not src or not dst:
                self.reject(line, "relation needs string 'from', 'to' and 'relationType'", raw)
            elif missing := [n for n in (src, dst) if n not in self.first_line]:
                self.reject(line, f"relation {src!r} -> {dst!r} refers to missing node(s) {missing}", raw)
            elif (src, dst, rel) in seen:
                self.reject(line, f"duplicate relation {src!r} -{rel}-> {dst!r}", raw)
            else:
                seen.add((src, dst, rel))
                edges.append({"src": src, "dst": dst, "relation": rel, "source_line": int(line)})
        rejects = sorted(self.rejects, key=lambda r: r["line"])
        return MemoryGraph(
            source=self.source,
            nodes=_frame(self.nodes, NODE_COLUMNS),
            edges=_frame(edges, EDGE_COLUMNS),
            rejects=_frame(rejects, REJECT_COLUMNS),
        )


def _frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=columns)
    for col in columns:
        if col in ("n_tags", "source_line", "line"):
            df[col] = df[col].astype("int32")
        else:
            # A string dtype, not object: an empty object column would reach DuckDB as type NULL.
            df[col] = df[col].astype("string")
    return df


def graph_from_records(records: Iterable[tuple[int, Any, str]], source: str) -> MemoryGraph:
    """Build a graph from `(line_number, parsed_record, raw_text)` triples; a record that failed to
    parse is passed as an `Exception` and becomes a reject."""
    builder = _Builder(source)
    for line, record, raw in records:
        if isinstance(record, Exception):
            builder.reject(line, f"malformed JSON: {record}", raw)
        else:
            builder.add(line, record, raw)
    return builder.build()


def graph_from_mcp_graph(graph: dict[str, Any], source: str) -> MemoryGraph:
    """Build a graph from a `read_graph` result (`{"entities": [...], "relations": [...]}`).

    Records are numbered as the server would write them to its JSONL file (entities first, then
    relations, from 1), so a live read and the file give the same tables."""
    entities = [dict(e, type="entity") if isinstance(e, dict) else e for e in graph.get("entities") or []]
    relations = [dict(r, type="relation") if isinstance(r, dict) else r for r in graph.get("relations") or []]
    records = entities + relations
    return graph_from_records(
        ((i, rec, json.dumps(rec, ensure_ascii=False)) for i, rec in enumerate(records, start=1)), source
    )


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any, str]]:
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            raw = line.rstrip("\n")
            if not raw.strip():
                continue  # blank lines are padding, not data
            try:
                yield number, json.loads(raw), raw
            except json.JSONDecodeError as exc:
                yield number, exc, raw


def read_jsonl(path: str | Path, source: str | None = None) -> MemoryGraph:
    path = Path(path).expanduser()
    source = source or f"jsonl:{path}"
    if not path.is_file():
        raise MemorySourceError(source, f"no such file {str(path)!r}")
    try:
        return graph_from_records(_jsonl_records(path), source)
    except OSError as exc:
        raise MemorySourceError(source, str(exc)) from exc


def graph_from_tables(
    nodes: pd.DataFrame, edges: pd.DataFrame, rejects: pd.DataFrame | None = None, source: str = "tables"
) -> MemoryGraph:
    """Rebuild a graph from the DuckDB tables `memory_nodes`, `memory_edges` (and `memory_rejects`)."""
    missing = [c for c in NODE_COLUMNS if c not in nodes.columns] + [c for c in EDGE_COLUMNS if c not in edges.columns]
    if missing:
        raise ValueError(f"memory tables lack columns {missing}")
    if rejects is None:
        rejects = pd.DataFrame(columns=REJECT_COLUMNS)
    nodes = nodes[NODE_COLUMNS].sort_values("source_line", kind="stable").reset_index(drop=True)
    edges = edges[EDGE_COLUMNS].sort_values("source_line", kind="stable").reset_index(drop=True)
    return MemoryGraph(source=source, nodes=nodes, edges=edges, rejects=rejects[REJECT_COLUMNS].reset_index(drop=True))


def load_graph(source: str = "sample") -> MemoryGraph:
    """Load the memory graph from `source`: ``sample``, ``jsonl:PATH``, ``mcp+stdio:COMMAND`` or
    ``mcp+http(s)://HOST:PORT/PATH``. Raises `MemorySourceError` naming the source if it cannot be read."""
    source = source.strip()
    if source == "sample":
        from carl_assets.memory.sample import sample_records

        return graph_from_records(
            ((i, rec, json.dumps(rec, ensure_ascii=False)) for i, rec in enumerate(sample_records(), start=1)), "sample"
        )
    if source.startswith("jsonl:"):
        path = source[len("jsonl:"):].strip()
        if not path:
            raise MemorySourceError(source, "no path after 'jsonl:'")
        return read_jsonl(path, source)
    if source.startswith(("mcp+stdio:", "mcp+http://", "mcp+https://")):
        from carl_assets.memory.mcp_source import read_mcp_graph

        return graph_from_mcp_graph(read_mcp_graph(source), source)
    raise MemorySourceError(
        source, "unknown scheme: use 'sample', 'jsonl:PATH', 'mcp+stdio:COMMAND' or 'mcp+http://HOST:PORT/PATH'"
    )


# --------------------------------------------------------------------------------------------
# Training pairs (the seed's step 1)
# --------------------------------------------------------------------------------------------


def count_mentions(text: str, emotion: str) -> int:
    """How often the emotion is named in `text`: case-insensitive words that start with the emotion
    name, underscores read as spaces or kept (`love` counts `love`, `Loved`, `lovely`;
    `self_doubt` counts `self doubt` and `self_doubt`)."""
    parts = [re.escape(p) for p in emotion.split("_") if p]
    pattern = r"\b" + r"[ _\-]".join(parts) + r"\w*"
    return len(re.findall(pattern, text, flags=re.IGNORECASE))


def _sample(rows: list[dict[str, Any]], cap: int, seed: int, emotion: str, polarity: str) -> list[dict[str, Any]]:
    rows = sorted(rows, key=lambda r: r["node_id"])
    if len(rows) > cap:
        # A string seed is hashed with SHA-512 by `random`: the same on every machine and run, and
        # independent per (emotion, polarity), so adding an emotion does not reshuffle the others.
        picked = random.Random(f"{seed}:{emotion}:{polarity}").sample(range(len(rows)), cap)
        rows = [rows[i] for i in sorted(picked)]
    return rows


def extract_training_pairs(
    graph: MemoryGraph,
    min_positive_score: int = 8,
    max_negative_mentions: int = 0,
    min_content_chars: int = 40,
    max_examples_per_emotion: int = 500,
    seed: int = 0,
    max_negative_score: int | None = None,
) -> pd.DataFrame:
    """(emotion, polarity, text, node_id) examples for every emotion with at least one positive and
    one negative example.

    - positive: the node scored the emotion >= `min_positive_score`;
    - negative: the node has a tag line without the emotion (an untagged node says nothing about
      its emotions, so it is never a negative) or, when `max_negative_score` is set, with the
      emotion scored at most that ("absent or low", the seed's words); and its text names the
      emotion at most `max_negative_mentions` times (`count_mentions`);
    - both: the text (tag line stripped) has at least `min_content_chars` characters after trimming;
    - at most `max_examples_per_emotion` per polarity per emotion, sampled deterministically from
      `seed`. Rows are ordered by emotion, polarity (positive first), node id.
    """
    if max_examples_per_emotion < 1:
        raise ValueError("max_examples_per_emotion must be at least 1")
    if max_negative_score is not None and max_negative_score >= min_positive_score:
        # A node scored between the two would be both a positive and a negative of the same emotion.
        raise ValueError(f"max_negative_score ({max_negative_score}) must be below min_positive_score "
                         f"({min_positive_score})")
    texts = [str(t).strip() for t in graph.nodes["text"].tolist()]
    ids = graph.nodes["node_id"].tolist()
    all_tags = graph.tags()
    emotions = sorted({e for tags in all_tags for e in tags if EMOTION_NAME.match(e)})
    rows: list[dict[str, Any]] = []
    for emotion in emotions:
        positives, negatives = [], []
        for node_id, text, tags in zip(ids, texts, all_tags, strict=True):
            if len(text) < min_content_chars:
                continue
            if tags.get(emotion, -1) >= min_positive_score:
                positives.append({"emotion": emotion, "polarity": "positive", "text": text, "node_id": node_id})
            elif tags and _absent_or_low(tags, emotion, max_negative_score) \
                    and count_mentions(text, emotion) <= max_negative_mentions:
                negatives.append({"emotion": emotion, "polarity": "negative", "text": text, "node_id": node_id})
        if not positives or not negatives:
            continue
        rows += _sample(positives, max_examples_per_emotion, seed, emotion, "positive")
        rows += _sample(negatives, max_examples_per_emotion, seed, emotion, "negative")
    return pd.DataFrame(rows, columns=PAIR_COLUMNS).astype("string")


def _absent_or_low(tags: dict[str, int], emotion: str, max_negative_score: int | None) -> bool:
    if emotion not in tags:
        return True
    return max_negative_score is not None and tags[emotion] <= max_negative_score


def pair_counts(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per emotion: positive and negative example counts."""
    if pairs.empty:
        return pd.DataFrame(columns=["emotion", "positive", "negative"])
    counts = pairs.groupby(["emotion", "polarity"]).size().unstack(fill_value=0)
    for col in ("positive", "negative"):
        if col not in counts.columns:
            counts[col] = 0
    return counts[["positive", "negative"]].astype(int).reset_index()
