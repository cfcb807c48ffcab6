"""Training pairs (the reference's step 1): (emotion, polarity, text, node_id) examples from a tagged
graph."""

from __future__ import annotations

import random
import re
from typing import Any

import pandas as pd
from pydantic import Field, model_validator

from carl_assets.memory.build import MemoryGraph
from carl_assets.memory.tags import EMOTION_NAME
from carl_assets.settings import Settings

PAIR_COLUMNS = ["emotion", "polarity", "text", "node_id"]


def count_mentions(text: str, emotion: str) -> int:
    """How often the emotion is named in `text`: case-insensitive words that start with the emotion
    name, underscores read as spaces or kept (`love` counts `love`, `Loved`, `lovely`;
    `self_doubt` counts `self doubt` and `self_doubt`)."""
    parts = [re.escape(p) for p in emotion.split("_") if p]
    pattern = r"\b" + r"[ _\-]".join(parts) + r"\w*"
    return len(re.findall(pattern, text, flags=re.IGNORECASE))


def _sample(rows: list[dict[str, Any]], cap: int, seed: int, emotion: str,
            polarity: str) -> list[dict[str, Any]]:
    rows = sorted(rows, key=lambda r: r["node_id"])
    if len(rows) > cap:
        # A string seed is hashed with SHA-512 by `random`: the same on every machine and run, and
        # independent per (emotion, polarity), so adding an emotion does not reshuffle the others.
        picked = random.Random(f"{seed}:{emotion}:{polarity}").sample(range(len(rows)), cap)
        rows = [rows[i] for i in sorted(picked)]
    return rows


class PairSettings(Settings):
    """Which nodes make an emotion's positive and negative examples (the emotion_training_pairs asset's
    config inherits these fields: each is defined here once)."""

    min_positive_score: int = Field(
        default=8, description="a positive example scored the emotion at least this"
    )
    max_negative_mentions: int = Field(
        default=0, description="a negative example names the emotion at most this many times in its text"
    )
    min_content_chars: int = Field(default=40, description="shorter texts (tag line stripped) are skipped")
    max_examples_per_emotion: int = Field(default=500, description="cap per polarity per emotion")
    seed: int = Field(default=0, description="seed of the deterministic sampling under the cap")
    max_negative_score: int | None = Field(
        default=None,
        description="negatives are nodes without the emotion (None, the default) or also nodes that scored "
        "it at most this (the reference's 'absent or low'); must be below min_positive_score",
    )

    @model_validator(mode="after")
    def _consistent(self) -> PairSettings:
        if self.max_examples_per_emotion < 1:
            raise ValueError("max_examples_per_emotion must be at least 1")
        if self.max_negative_score is not None and self.max_negative_score >= self.min_positive_score:
            # A node scored between the two would be both a positive and a negative of the same emotion.
            raise ValueError(f"max_negative_score ({self.max_negative_score}) must be below "
                             f"min_positive_score ({self.min_positive_score})")
        return self


def extract_training_pairs(
    graph: MemoryGraph, settings: PairSettings | None = None, **overrides: Any
) -> pd.DataFrame:
    """(emotion, polarity, text, node_id) examples for every emotion with at least one positive and
    one negative example, under `settings` (default `PairSettings()`) with any field replaced by
    `overrides` (e.g. `min_positive_score=7`).

    - positive: the node scored the emotion >= `min_positive_score`;
    - negative: the node has a tag line without the emotion (an untagged node says nothing about
      its emotions, so it is never a negative) or, when `max_negative_score` is set, with the
      emotion scored at most that ("absent or low", the reference's words); and its text names the
      emotion at most `max_negative_mentions` times (`count_mentions`);
    - never a stub node (`is_stub`: a name a relation points at, with no entity of its own);
    - both: the text (tag lines stripped) has at least `min_content_chars` characters after trimming;
    - at most `max_examples_per_emotion` per polarity per emotion, sampled deterministically from
      `seed`. Rows are ordered by emotion, polarity (positive first), node id.

    Raises ValueError (pydantic's) for an unknown setting or inconsistent values.
    """
    s = PairSettings.overridden(settings, **overrides)
    min_positive_score, max_negative_mentions = s.min_positive_score, s.max_negative_mentions
    min_content_chars, max_negative_score = s.min_content_chars, s.max_negative_score
    max_examples_per_emotion, seed = s.max_examples_per_emotion, s.seed
    texts = [str(t).strip() for t in graph.nodes["text"].tolist()]
    ids = graph.nodes["node_id"].tolist()
    all_tags = graph.tags()
    if "is_stub" in graph.nodes.columns:  # a stub is only a name some relation points at: never an example
        stubs = graph.nodes["is_stub"].tolist()
        all_tags = [{} if stub else tags for stub, tags in zip(stubs, all_tags, strict=True)]
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
                positives.append({"emotion": emotion, "polarity": "positive", "text": text,
                                  "node_id": node_id})
            elif tags and _absent_or_low(tags, emotion, max_negative_score) \
                    and count_mentions(text, emotion) <= max_negative_mentions:
                negatives.append({"emotion": emotion, "polarity": "negative", "text": text,
                                  "node_id": node_id})
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
