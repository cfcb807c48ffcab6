"""Projections of new text on the readout vectors: the reference's generalisation check ("apply them to
held-out conversation data and eyeball the projections").

Each text is read as the vectors were trained (same layers, token reduction, BOS rule and token limit)
and dotted with every unit vector. Raw projections are hard to eyeball, so each is also placed on the
scale the training data sets: `calibrated` = (projection - mean projection of the training negatives)
/ (mean of the positives - mean of the negatives): 0 reads like a typical negative, 1 like a typical
positive.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from carl_assets.steering.manifest import SteeringVectors
from carl_assets.steering.residual import ResidualReader
from carl_assets.steering.tokens import bos_to_skip, encode_texts, pad_token_id, padded_batch, token_limit
from carl_assets.steering.training import ReadoutConfig

PROJECTION_COLUMNS = ["text_index", "text", "emotion", "layer", "projection", "calibrated"]


def read_text_file(path: str | os.PathLike[str]) -> list[str]:
    """The texts of a user's held-out file: one text per non-empty line (surrounding spaces trimmed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"held-out text file {path} does not exist")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"held-out text file {path} has no non-empty lines")
    return texts


def project_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    vectors: SteeringVectors,
    texts: Sequence[str],
    read: ReadoutConfig,
) -> pd.DataFrame:
    """One row per (text, emotion, layer): the projection of the text's reduced residual stream on the
    emotion's unit vector, and its calibrated value (NaN without training stats). `read`: the texts per
    forward pass, token limit and BOS rule the texts are read with (its `batch_size`, `max_length`,
    `exclude_bos`: pass the readout's own config to read them as the vectors were trained); the layers
    and the token reduction are the vectors'. Raises ValueError for an empty text."""
    if not texts:
        return pd.DataFrame(columns=PROJECTION_COLUMNS)
    if any(not str(t) for t in texts):
        raise ValueError("empty text: nothing to project")
    skip = bos_to_skip(tokenizer, read.exclude_bos)
    reader = ResidualReader(model, vectors.layers, vectors.reduction, skip_leading_token_id=skip)
    encoded, _ = encode_texts(tokenizer, [str(t) for t in texts], token_limit(model, read.max_length))
    stacked = vectors.as_tensor().double()  # [E, L, H]
    out = np.zeros((len(texts), len(vectors.concepts), len(vectors.layers)))
    pad_id = pad_token_id(tokenizer)
    for start in range(0, len(texts), read.batch_size):
        rows = list(range(start, min(start + read.batch_size, len(texts))))
        acts = reader(*padded_batch([encoded[i] for i in rows], pad_id)).to("cpu", torch.float64)  # [b, L, H]
        out[rows] = torch.einsum("blh,elh->bel", acts, stacked).numpy()
    positive, negative = _class_means(vectors)
    span = positive - negative
    with np.errstate(divide="ignore", invalid="ignore"):
        calibrated = np.where(np.abs(span) > 0, (out - negative) / span, np.nan)
    index = pd.MultiIndex.from_product(
        [range(len(texts)), vectors.concepts, vectors.layers], names=["text_index", "emotion", "layer"]
    )
    frame = pd.DataFrame({"projection": out.reshape(-1), "calibrated": calibrated.reshape(-1)}, index=index)
    frame = frame.reset_index()
    frame.insert(1, "text", frame["text_index"].map(lambda i: str(texts[i])))
    return frame[PROJECTION_COLUMNS]


def _class_means(vectors: SteeringVectors) -> tuple[np.ndarray, np.ndarray]:
    """`[E, L]` mean training projections of positives and negatives (NaN where unknown)."""
    shape = (len(vectors.concepts), len(vectors.layers))
    stats = vectors.stats
    if stats is None or "mean_projection_positive" not in stats.columns:
        return np.full(shape, np.nan), np.full(shape, np.nan)
    table = stats.set_index(["emotion", "layer"])
    keys = pd.MultiIndex.from_product([vectors.concepts, vectors.layers])
    pos = table["mean_projection_positive"].reindex(keys).to_numpy(dtype=float).reshape(shape)
    neg = table["mean_projection_negative"].reindex(keys).to_numpy(dtype=float).reshape(shape)
    return pos, neg
