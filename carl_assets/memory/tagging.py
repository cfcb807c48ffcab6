"""Emotion tags for every node: the user's own tag lines, and a tagger's for the nodes without one.

The reference's "subconscious agents" write the trailing tag lines (`warmth:9 clarity:10`) the steering
vectors learn from; a memory file kept by hand or by another MCP memory server has none. A tagger
fills them in:

- ``off``: the user's tags only;
- ``lexicon``: word counts in the Empath lexicon (`carl_assets.memory.taggers.lexicon`);
- ``model``: the policy model's log-probabilities of the answers 0..10 under a rating prompt
  (`carl_assets.memory.taggers.model`).

Rules:

- User tags (a node's ``tags_json``, parsed from its tag lines by the reader) are always kept, with
  ``source = "user"``, whatever the emotion list.
- A tagger tags only nodes *without* user tags. A user's tag line is a whole statement: the pairs
  read an emotion it leaves out as absent (a negative example, the reference's "absent or low"), so a
  tagger adding emotions to it would overrule the user. User tags therefore always win.
- Stub nodes (``is_stub`` true: an entity a relation names but the file never created) and nodes
  with empty text or no observations (``n_observations`` 0: the text is only the entity's name) are
  never tagged by a tagger: there is nothing to read.
- A tagger writes the emotions it scored at least ``min_score`` (a tag line names the emotions
  present); the node statuses (`node_status`) tell a node the tagger read and found nothing in
  (``none_found``: a negative for every emotion) from one it never read.

Table contract (DuckDB ``emotion_tags``, `TAG_COLUMNS`): ``node_id`` (str), ``emotion`` (str, a plain
word, `EMOTION_NAME`), ``score`` (int 0..10), ``source`` (``user`` / ``model`` / ``lexicon``),
``raw_score`` (float: the user's score; the model's expected score; the lexicon's hits per 100 words).
One row per (node, emotion); a node's rows all have one source.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from carl_assets.memory.graph import EMOTION_NAME, MAX_SCORE, MIN_SCORE
from carl_assets.memory.taggers import lexicon as lexicon_tagger
from carl_assets.memory.taggers import model as model_tagger
from carl_assets.settings import PERFORMANCE_ONLY, Settings

Tagger = Literal["off", "lexicon", "model"]
TAGGERS: tuple[str, ...] = get_args(Tagger)
SOURCES: tuple[str, ...] = ("user", "model", "lexicon")
TAG_COLUMNS = ["node_id", "emotion", "score", "source", "raw_score"]
STATUS_COLUMNS = ["node_id", "status", "source", "n_tags"]

# When neither the caller nor the graph's user tags name any emotion: the built-in sample graph's 16
# emotions, which include every emotion the reference names (warmth, clarity, frustration, love, tiredness).
DEFAULT_EMOTIONS = [
    "anxiety",
    "awe",
    "calm",
    "clarity",
    "confusion",
    "curiosity",
    "frustration",
    "gratitude",
    "hope",
    "joy",
    "loneliness",
    "love",
    "pride",
    "sadness",
    "tiredness",
    "warmth",
]


def _tags_of(node_id: str, tags_json: Any) -> dict[str, int]:
    if tags_json is None or (isinstance(tags_json, float) and np.isnan(tags_json)) or tags_json == "":
        return {}
    try:
        tags = json.loads(tags_json)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"node {node_id!r}: tags_json is not JSON ({exc}); rebuild memory_nodes "
            "by materializing memory_graph"
        ) from None
    if not isinstance(tags, dict):
        raise ValueError(
            f"node {node_id!r}: tags_json must be an object of emotion -> score, not {tags_json!r}"
        )
    return tags


def user_tags(nodes: pd.DataFrame) -> pd.DataFrame:
    """The user's tags as `TAG_COLUMNS` rows (source "user", raw_score = score), in node order.

    Raises ValueError naming the node whose ``tags_json`` is not a JSON object."""
    rows = []
    for node_id, tags_json in zip(nodes["node_id"].tolist(), nodes["tags_json"].tolist(), strict=True):
        for emotion, score in sorted(_tags_of(node_id, tags_json).items()):
            rows.append((str(node_id), str(emotion), int(score), "user", float(score)))
    return _frame(rows)


def _frame(rows: Iterable[tuple]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=TAG_COLUMNS)
    return frame.astype(
        {
            "node_id": "string",
            "emotion": "string",
            "score": "int64",
            "source": "string",
            "raw_score": "float64",
        }
    )


def _is_stub(nodes: pd.DataFrame) -> np.ndarray:
    if "is_stub" not in nodes.columns:
        return np.zeros(len(nodes), dtype=bool)
    return nodes["is_stub"].fillna(False).astype(bool).to_numpy()


def _is_empty(nodes: pd.DataFrame) -> np.ndarray:
    """No text, or (where the reader counts them) no observations: a node text that is only the
    entity's name and type gives a tagger nothing to read."""
    empty = np.array(
        [not str(t).strip() if t is not None and t == t else True for t in nodes["text"].tolist()]
    )
    if "n_observations" in nodes.columns:
        empty |= nodes["n_observations"].fillna(0).astype(int).to_numpy() == 0
    return empty


def _has_user_tags(nodes: pd.DataFrame) -> np.ndarray:
    return np.array([bool(_tags_of(n, t)) for n, t in zip(nodes["node_id"], nodes["tags_json"], strict=True)])


def taggable(nodes: pd.DataFrame) -> np.ndarray:
    """Boolean mask `[len(nodes)]`: the nodes a tagger reads (no user tags, not a stub, text not empty)."""
    return ~_has_user_tags(nodes) & ~_is_stub(nodes) & ~_is_empty(nodes)


def emotion_vocabulary(nodes: pd.DataFrame, emotions: Sequence[str] | None = None) -> list[str]:
    """The emotions a tagger scores: `emotions` when given; else those the user tags use, most used
    first; else `DEFAULT_EMOTIONS`. Raises ValueError naming any name that is not a plain lower-case word."""
    if emotions:
        bad = [e for e in emotions if not EMOTION_NAME.match(str(e))]
        if bad:
            raise ValueError(f"emotion names must be lower-case words (a-z, _), not {bad}")
        return list(dict.fromkeys(emotions))
    tags = user_tags(nodes)
    if len(tags):
        counts = tags.groupby("emotion").size()
        return sorted(counts.index.astype(str), key=lambda e: (-int(counts[e]), e))
    return list(DEFAULT_EMOTIONS)


def _score_rows(
    node_ids: Sequence[str],
    emotions: Sequence[str],
    scores: np.ndarray,
    raw: np.ndarray,
    source: str,
    min_score: int,
) -> list[tuple]:
    keep = np.argwhere(scores >= min_score)
    return [(node_ids[i], emotions[j], int(scores[i, j]), source, float(raw[i, j])) for i, j in keep]


def _lexicon_rows(
    node_ids: list[str],
    texts: list[str],
    emotions: Sequence[str],
    min_score: int,
    lexicon_map: Mapping[str, Sequence[str]] | None,
) -> list[tuple]:
    rates, scored = lexicon_tagger.lexicon_rates(texts, emotions, lexicon_map)
    scores = (
        np.vectorize(lexicon_tagger.rate_to_score, otypes=[int])(rates)
        if rates.size
        else np.zeros(rates.shape, dtype=int)
    )
    return _score_rows(node_ids, scored, scores, rates, "lexicon", min_score)


class TaggerSettings(Settings):
    """How a tagger scores and which of its scores it writes (the emotion_tags asset's config inherits
    these fields: each is defined here once)."""

    min_score: int = Field(default=1, description="a tagger's scores below this (0..10) are not written")
    reduction: model_tagger.Reduction = Field(
        default="expected", description="model tagger: the score is the expected value of the answer "
        "distribution over 0..10 (rounded) or its most likely answer")
    max_text_tokens: int = Field(
        default=256, description="model tagger: node texts are cut to this many tokens"
    )
    batch_size: int = Field(default=16, description="model tagger: prompts per forward pass",
                            json_schema_extra=PERFORMANCE_ONLY)

    @field_validator("min_score")
    @classmethod
    def _on_the_scale(cls, value: int) -> int:
        if not MIN_SCORE <= value <= MAX_SCORE:
            raise ValueError(f"min_score must be within {MIN_SCORE}..{MAX_SCORE}, not {value}")
        return value


def tag_nodes(
    nodes: pd.DataFrame,
    tagger: Tagger,
    emotions: Sequence[str] | None = None,
    settings: TaggerSettings | None = None,
    *,
    lexicon_map: Mapping[str, Sequence[str]] | None = None,
    model: Any = None,
    tokenizer: Any = None,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """Every node's emotion tags, `TAG_COLUMNS`, ordered by node (as in `nodes`), then emotion.

    `nodes`: memory_nodes rows (``node_id``, ``text``, ``tags_json``; ``is_stub`` if present).
    `emotions`: what the tagger scores (default `emotion_vocabulary`). `settings` (default
    `TaggerSettings()`, any field replaced by `overrides`, e.g. `min_score=0`): the score cut, and for the
    model tagger its reduction, text length and batch. `lexicon_map`: extra emotion -> Empath categories
    (lexicon). `model`/`tokenizer`: a causal LM and its tokenizer (model tagger); `threads` as in
    `model_probabilities`.

    Raises ValueError for an unknown tagger or setting, a `min_score` outside 0..10, or the model tagger
    without a model and tokenizer."""
    if tagger not in TAGGERS:
        raise ValueError(f"tagger must be one of {list(TAGGERS)}, not {tagger!r}")
    chosen = TaggerSettings.overridden(settings, **overrides)
    min_score = chosen.min_score
    if tagger == "model" and (model is None or tokenizer is None):
        raise ValueError("the model tagger needs a model and its tokenizer (the base_model folder)")
    user = user_tags(nodes)
    mask = taggable(nodes)
    if tagger == "off" or not mask.any():
        return user
    emotions = emotion_vocabulary(nodes, emotions)
    node_ids = nodes["node_id"].astype(str).to_numpy()[mask].tolist()
    texts = nodes["text"].astype(str).to_numpy()[mask].tolist()
    if tagger == "lexicon":
        rows = _lexicon_rows(node_ids, texts, emotions, min_score, lexicon_map)
    else:
        probs = model_tagger.model_probabilities(
            model,
            tokenizer,
            texts,
            emotions,
            batch_size=chosen.batch_size,
            max_text_tokens=chosen.max_text_tokens,
            threads=threads,
            progress=progress,
        )
        flat = probs.reshape(-1, probs.shape[-1])
        scores, raw = model_tagger.reduce_scores(flat, chosen.reduction)
        shape = (len(texts), len(emotions))
        rows = _score_rows(node_ids, emotions, scores.reshape(shape), raw.reshape(shape), "model", min_score)
    order = {n: i for i, n in enumerate(nodes["node_id"].astype(str))}
    both = pd.concat([user, _frame(rows)], ignore_index=True)
    both = both.assign(_order=both["node_id"].map(order)).sort_values(["_order", "emotion"], kind="stable")
    return both.drop(columns="_order").reset_index(drop=True)


def node_status(nodes: pd.DataFrame, tags: pd.DataFrame, tagger: Tagger) -> pd.DataFrame:
    """One row per node, `STATUS_COLUMNS`: ``status`` is ``user`` (its own tag line), ``tagged`` (the
    tagger's tags), ``none_found`` (the tagger read it and scored every emotion below min_score),
    ``stub``, ``empty_text`` or ``untagged`` (tagger off); ``source`` the tags' source (empty if none);
    ``n_tags`` its rows in `tags`."""
    counts = tags.groupby("node_id").size()
    sources = tags.drop_duplicates("node_id").set_index("node_id")["source"]
    user, stub, empty = _has_user_tags(nodes), _is_stub(nodes), _is_empty(nodes)
    rows = []
    for i, node_id in enumerate(nodes["node_id"].astype(str)):
        n = int(counts.get(node_id, 0))
        if user[i]:
            status = "user"
        elif stub[i]:
            status = "stub"
        elif empty[i]:
            status = "empty_text"
        elif tagger == "off":
            status = "untagged"
        else:
            status = "tagged" if n else "none_found"
        rows.append((node_id, status, str(sources.get(node_id, "")) if n else "", n))
    return pd.DataFrame(rows, columns=STATUS_COLUMNS).astype(
        {"node_id": "string", "status": "string", "source": "string", "n_tags": "int64"}
    )


def tags_by_node(tags: pd.DataFrame, sources: Iterable[str] = SOURCES) -> dict[str, dict[str, int]]:
    """{node_id: {emotion: score}} from `TAG_COLUMNS` rows of the given sources (how a reader such as
    the pairs turns the table back into per-node tag dicts)."""
    wanted = set(sources)
    bad = wanted - set(SOURCES)
    if bad:
        raise ValueError(f"tag sources must be among {list(SOURCES)}, not {sorted(bad)}")
    out: dict[str, dict[str, int]] = {}
    for row in tags[tags["source"].isin(wanted)].itertuples(index=False):
        out.setdefault(str(row.node_id), {})[str(row.emotion)] = int(row.score)
    return out


def nodes_with_tags(
    nodes: pd.DataFrame, tags: pd.DataFrame, sources: Iterable[str] = SOURCES
) -> pd.DataFrame:
    """A copy of `nodes` whose ``tags_json`` and ``n_tags`` hold the `tags` rows of the given sources
    (so `extract_training_pairs` and anything else that reads ``tags_json`` sees the tagger's tags);
    nodes without such rows get ``{}``. Raises ValueError for an unknown source."""
    per_node = tags_by_node(tags, sources)
    ids = nodes["node_id"].astype(str)
    out = nodes.copy()
    out["tags_json"] = [json.dumps(per_node.get(n, {}), sort_keys=True) for n in ids]
    out["n_tags"] = [len(per_node.get(n, {})) for n in ids]
    return out


def tag_counts(tags: pd.DataFrame) -> pd.DataFrame:
    """Rows per emotion and source: columns emotion, user, model, lexicon, total (most tagged first)."""
    table = tags.groupby(["emotion", "source"]).size().unstack(fill_value=0) if len(tags) else pd.DataFrame()
    table = table.reindex(columns=list(SOURCES), fill_value=0).astype(int)
    table.columns.name = None
    table["total"] = table.sum(axis=1)
    table = table.sort_values("total", ascending=False, kind="stable").reset_index()
    return table.rename(columns={"index": "emotion"})
