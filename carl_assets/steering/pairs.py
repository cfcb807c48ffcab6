"""The training pairs as a frame, and the deterministic splits drawn from them (held-out, transfer cap).

Splits rank rows by a SHA-256 hash of (random seed, group, text, ...), so they do not depend on row
order across runs or on Python's hash randomisation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

POLARITIES = ("positive", "negative")


def pairs_frame(pairs: pd.DataFrame | Iterable[Mapping[str, Any]], with_kind: bool = False) -> pd.DataFrame:
    """The pairs as a string frame with columns emotion, polarity, text (and kind when `with_kind`).

    Raises ValueError for a missing column, a polarity other than positive/negative, or an empty text."""
    frame = pairs if isinstance(pairs, pd.DataFrame) else pd.DataFrame(list(pairs))
    required = {"emotion", "polarity", "text"} | ({"kind"} if with_kind else set())
    missing = required - set(frame.columns)
    if missing:
        raise ValueError(f"pairs need columns {sorted(required)} (missing {sorted(missing)})")
    columns = ["emotion", "polarity", "text"] + (["kind"] if with_kind else [])
    frame = frame[columns].astype(str).reset_index(drop=True)
    bad = sorted(set(frame["polarity"]) - set(POLARITIES))
    if bad:
        raise ValueError(f"polarity must be 'positive' or 'negative', got {bad}")
    if (frame["text"].str.len() == 0).any():
        raise ValueError("pairs contain empty texts")
    return frame


def stable_rank(*parts: str) -> int:
    """A 64-bit rank of `parts` (SHA-256), the same on every machine and run."""
    return int.from_bytes(hashlib.sha256("\x00".join(parts).encode()).digest()[:8], "big")


def heldout_mask(frame: pd.DataFrame, fraction: float, max_per_group: int, seed: int) -> np.ndarray:
    """A deterministic held-out split per (emotion, polarity): the rows with the smallest hash of
    (seed, emotion, polarity, text, row-in-group), `floor(n * fraction)` of them (at most
    `max_per_group`), always leaving at least one training row."""
    held = np.zeros(len(frame), dtype=bool)
    if fraction <= 0:
        return held
    for (emotion, polarity), rows in frame.groupby(["emotion", "polarity"], sort=False).groups.items():
        rows = list(rows)
        n_held = min(int(len(rows) * fraction), max_per_group, len(rows) - 1)
        if n_held <= 0:
            continue
        ranked = sorted(
            rows, key=lambda r: stable_rank(str(seed), emotion, polarity, frame.at[r, "text"], str(r))
        )
        held[ranked[:n_held]] = True
    return held


def capped_rows(rows: np.ndarray, text_index: np.ndarray, max_texts: int, seed: int) -> np.ndarray:
    """`rows` (a boolean row mask) limited to the rows of at most `max_texts` of their texts (smallest
    hash first); `text_index[r]` is row r's unique-text index."""
    texts = sorted(set(text_index[rows].tolist()), key=lambda t: stable_rank(str(seed), "transfer", str(t)))
    if len(texts) <= max_texts:
        return rows
    allowed = np.zeros(int(text_index.max()) + 1, dtype=bool)
    allowed[texts[:max_texts]] = True
    return rows & allowed[text_index]
