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
tags, because its text is still good data. Lines that are not valid UTF-8, and strings that UTF-8
cannot hold (a lone surrogate from a JSON escape such as ``"\\ud800"``), are rejects too: they would
break the DuckDB tables. Names may hold any other character, newlines and quotes included (they are
data, stored as such; emotion names alone are restricted to plain words, see `EMOTION_NAME`).

Accounting, for a JSONL source: every non-blank line is either a node or an edge (its
``source_line``) or a reject (its ``line``); a node kept despite bad tag tokens is both, with one
reject per bad token. Blank (whitespace-only) lines are padding: they count in the numbering and
appear nowhere else. Only an unreadable source raises (`MemorySourceError`).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

MIN_SCORE = 0
MAX_SCORE = 10
# Emotion names reach file names and SQL: lower-case letters and underscores only. `\Z`, not `$`:
# `$` also matches before a trailing newline, so "joy\n" would pass `.match`.
EMOTION_NAME = re.compile(r"^[a-z][a-z_]{0,63}\Z")
# A tag token is anything with exactly one colon; a line made only of such tokens is a tag line.
_TOKEN_SHAPE = re.compile(r"^[^\s:]*:[^\s:]*$")
_SCORE = re.compile(r"^\d{1,3}$")

NODE_COLUMNS = ["node_id", "kind", "text", "tags_json", "n_tags", "source_line"]
EDGE_COLUMNS = ["src", "dst", "relation", "source_line"]
REJECT_COLUMNS = ["source", "line", "reason", "raw"]
PAIR_COLUMNS = ["emotion", "polarity", "text", "node_id"]
_RAW_LIMIT = 2000
_SHOW_LIMIT = 120  # a name or value quoted in a reject reason is cut to this many characters


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


def _looks_like_tag(token: str) -> bool:
    """`name:value` with a name that does not start with a digit: "warmth:9", "warmth:high" and
    "../../x:9" do; "10:30" and "Time:" do not."""
    name, _, value = token.partition(":")
    return bool(name) and bool(value) and not name[0].isdigit()


def _is_tag_line(line: str) -> bool:
    tokens = line.split()
    # Every token is `something:something`, and at least one looks like a tag, so that "Time: 10:30"
    # stays prose while "warmth:high" or "../../etc:9" is a (bad) tag line whose tokens are refused
    # with a reason instead of passing silently into the training text.
    return bool(tokens) and all(_TOKEN_SHAPE.match(t) for t in tokens) and any(_looks_like_tag(t) for t in tokens)


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
            parsed.bad.append((token, f"emotion name {_show(raw_name)} is not a plain word (letters and underscores)"))
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


def _show(value: Any) -> str:
    """`repr(value)` cut to a readable length: reasons quote names, and a hostile name can be 1 MB."""
    text = repr(value)
    return text if len(text) <= _SHOW_LIMIT else f"{text[:_SHOW_LIMIT - 3]}..."


def _unencodable(values: Iterable[str]) -> str | None:
    """The first string that UTF-8 cannot encode (a lone surrogate from a JSON escape like "\\ud800"),
    or None. Such a string would break the Arrow/DuckDB write of the whole table."""
    for value in values:
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"{_show(value)} is not valid Unicode ({exc.reason} at character {exc.start})"
    return None


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


_INT_COLUMNS = ("n_tags", "source_line", "line")
_CHUNK_ROWS = 2048


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
                kind = pa.int32() if col in _INT_COLUMNS else pa.string()
                self.chunks[col].append(pa.array(self.pending[col], type=kind))
                self.pending[col] = []

    def frame(self) -> pd.DataFrame:
        import pyarrow as pa

        self._flush()
        data = {}
        for col in self.columns:
            if col in _INT_COLUMNS:
                parts = [c.to_numpy() for c in self.chunks[col]]
                data[col] = pd.Series(np.concatenate(parts) if parts else np.zeros(0), dtype="int32")
            else:
                data[col] = pd.Series(pa.chunked_array(self.chunks[col], type=pa.string()), dtype=pd.StringDtype())
        return pd.DataFrame(data, columns=self.columns)


@dataclass
class _Builder:
    """Turns raw records (entity/relation dicts with line numbers) into the three tables."""

    source: str
    nodes: _ColumnChunks = field(default_factory=lambda: _ColumnChunks(NODE_COLUMNS))
    # (line, raw cut to _RAW_LIMIT, from, to, relationType): relations wait for all nodes to be known
    relations: list[tuple[int, str, Any, Any, Any]] = field(default_factory=list)
    rejects: _ColumnChunks = field(default_factory=lambda: _ColumnChunks(REJECT_COLUMNS))
    first_line: dict[str, int] = field(default_factory=dict)

    def reject(self, line: int, reason: str, raw: str) -> None:
        raw = raw[:_RAW_LIMIT]
        if _unencodable([raw]):  # keep the evidence, written so that the table can hold it
            raw = raw.encode("utf-8", "backslashreplace").decode("utf-8")
        self.rejects.append({"source": self.source, "line": int(line), "reason": reason, "raw": raw})

    def add(self, line: int, record: Any, raw: str) -> None:
        if not isinstance(record, dict):
            self.reject(line, f"record is a JSON {type(record).__name__}, not an object", raw)
        elif record.get("type") == "entity":
            self._entity(line, record, raw)
        elif record.get("type") == "relation":
            # only the first _RAW_LIMIT characters are ever kept: no second copy of a long line
            self.relations.append((line, raw[:_RAW_LIMIT], record.get("from"), record.get("to"),
                                   record.get("relationType", "")))
        else:
            self.reject(line, f"unknown record type {_show(record.get('type'))}", raw)

    def _entity(self, line: int, record: dict[str, Any], raw: str) -> None:
        name, kind, observations = record.get("name"), record.get("entityType", ""), record.get("observations", [])
        if not isinstance(name, str) or not name.strip():
            return self.reject(line, "entity without a name", raw)
        if not isinstance(kind, str):
            return self.reject(line, f"entity {_show(name)}: entityType is not a string", raw)
        if not isinstance(observations, list) or not all(isinstance(o, str) for o in observations):
            return self.reject(line, f"entity {_show(name)}: observations is not a list of strings", raw)
        if bad := _unencodable([name, kind, *observations]):
            return self.reject(line, f"entity {_show(name)}: {bad}", raw)
        if name in self.first_line:
            return self.reject(line, f"duplicate node name {_show(name)} (first at line {self.first_line[name]})", raw)
        self.first_line[name] = line
        text, tag_line = split_tag_line("\n".join(observations))
        tags: dict[str, int] = {}
        if tag_line is not None:
            tags = tag_line.tags
            for token, why in tag_line.bad:
                self.reject(line, f"bad tag token {_show(token)} in node {_show(name)}: {why} "
                                  "(node kept with its valid tags)", raw)
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
        for line, raw, src, dst, rel in self.relations:
            if not all(isinstance(v, str) for v in (src, dst, rel)) or not src or not dst:
                self.reject(line, "relation needs string 'from', 'to' and 'relationType'", raw)
            elif bad := _unencodable([src, dst, rel]):
                self.reject(line, f"relation {_show(src)} -> {_show(dst)}: {bad}", raw)
            elif missing := [n for n in (src, dst) if n not in self.first_line]:
                self.reject(line, f"relation {_show(src)} -> {_show(dst)} refers to missing node(s) "
                                  f"{_show(missing)}", raw)
            elif (src, dst, rel) in seen:
                self.reject(line, f"duplicate relation {_show(src)} -[{_show(rel)}]-> {_show(dst)}", raw)
            else:
                seen.add((src, dst, rel))
                edges.append({"src": src, "dst": dst, "relation": rel, "source_line": int(line)})
        rejects = self.rejects.frame()
        if not rejects["line"].is_monotonic_increasing:  # relation rejects come last: put them in line order
            rejects = rejects.sort_values("line", kind="stable").reset_index(drop=True)
        return MemoryGraph(
            source=self.source,
            nodes=self.nodes.frame(),
            edges=_frame(edges, EDGE_COLUMNS),
            rejects=rejects,
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
        if isinstance(record, _BadLine):
            builder.reject(line, str(record), raw)
        elif isinstance(record, Exception):
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


class _BadLine(ValueError):
    """A line that is not a record (invalid UTF-8, malformed or too deeply nested JSON)."""


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any, str]]:
    """`(line number, record or _BadLine, raw text)` per non-blank line, streamed: one line in memory
    at a time. Lines end at "\n" only (as the memory server writes them; a "\r\n" ending is accepted),
    so a stray "\r" or U+2028 inside a line never shifts the line numbers."""
    with path.open("rb") as handle:
        for number, data in enumerate(handle, start=1):
            data = data.removesuffix(b"\n").removesuffix(b"\r")
            if number == 1:
                data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not data
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, _BadLine(f"not valid UTF-8 at byte {exc.start}"), data.decode("utf-8", "replace")
                continue
            if not raw.strip():
                continue  # blank lines are padding, not data: they are neither nodes nor rejects
            try:
                yield number, json.loads(raw), raw
            except RecursionError:
                yield number, _BadLine("malformed JSON: nested too deeply"), raw
            except ValueError as exc:  # JSONDecodeError, and integers longer than Python reads
                yield number, _BadLine(f"malformed JSON: {exc}"), raw


def jsonl_file(path: str | Path, source: str | None = None) -> tuple[Path, str]:
    """(the file, the source string) of a `jsonl:` source; `MemorySourceError` if it is a folder or missing."""
    path = Path(path).expanduser()
    source = source or f"jsonl:{path}"
    if path.is_dir():
        raise MemorySourceError(source, f"{str(path)!r} is a folder, not a JSONL file")
    if not path.is_file():
        raise MemorySourceError(source, f"no such file {str(path)!r}")
    return path, source


def read_jsonl(path: str | Path, source: str | None = None) -> MemoryGraph:
    """The graph of a memory-server JSONL file, read line by line (memory: the tables, not the file)."""
    path, source = jsonl_file(path, source)
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


def load_graph(source: str = "sample", timeout_s: float | None = None) -> MemoryGraph:
    """Load the memory graph from `source`: ``sample``, ``jsonl:PATH``, ``mcp+stdio:COMMAND`` or
    ``mcp+http(s)://HOST:PORT/PATH``. Raises `MemorySourceError` naming the source if it cannot be read.
    `timeout_s` bounds a live MCP read (default `$CARL_MCP_TIMEOUT`, else 60 s)."""
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

        return graph_from_mcp_graph(read_mcp_graph(source, timeout_s), source)
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
    # tags may come back from the tables (graph_from_tables): check the names again before they
    # become pair labels, and from there file names and SQL
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
