"""Scoring the readout directions: AUC, held-out and transfer separation, the per (emotion, layer) stats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores (Mann-Whitney U, ties count half); NaN if a side is empty."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    scores = np.concatenate([positive, negative])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(average, counts)
    u = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2.0
    return float(u / (len(positive) * len(negative)))


def separation(kept: torch.Tensor, direction: torch.Tensor, pos: list[int], neg: list[int], j: int) -> float:
    """AUC of the kept activations `kept[pos | neg, j]` (`[n_kept, n_layers, H]`) projected on `direction`
    (`[H]`, normalised here); NaN when a side is empty or the direction is zero."""
    norm = float(direction.norm())
    if not pos or not neg or norm == 0:
        return float("nan")
    d = (direction / norm).float()
    return auc((kept[pos, j] @ d).numpy(), (kept[neg, j] @ d).numpy())


@dataclass
class Directions:
    """The aggregated class means of every concept and layer (C concepts, L layers, H hidden).

    `base_n` `[C, polarity, split]` counts (split 0 train, 1 held out); `raw_norm`, `zero` `[C, L]`;
    `unit` `[C, L, H]` unit diff-of-means over all rows; `mean_projection` `[C, polarity, L]`;
    `train_diff` `[C, L, H]` over the training split; with a transfer check, `transfer_diff` `[C, L, H]`
    over the training kind's rows and `transfer_n` `[C, polarity]`."""

    base_n: torch.Tensor
    raw_norm: torch.Tensor
    zero: torch.Tensor
    unit: torch.Tensor
    mean_projection: torch.Tensor
    train_diff: torch.Tensor
    transfer_diff: torch.Tensor | None = None
    transfer_n: torch.Tensor | None = None


def concept_records(
    concept: str,
    k: int,
    layers: list[int],
    d: Directions,
    kept: torch.Tensor,
    held_of: dict[str, list[int]],
    test_of: dict[str, list[int]],
) -> list[dict[str, Any]]:
    """One stats row per layer for concept `k`: counts, raw norm, held-out AUC, calibration means and,
    with a transfer check, the transfer AUC. `held_of`/`test_of`: polarity -> slots in `kept`."""
    records = []
    for j, layer in enumerate(layers):
        record = {
            "emotion": concept,
            "layer": int(layer),
            "n_positive": int(d.base_n[k, 0].sum()),
            "n_negative": int(d.base_n[k, 1].sum()),
            "n_heldout_positive": int(d.base_n[k, 0, 1]),
            "n_heldout_negative": int(d.base_n[k, 1, 1]),
            "raw_norm": float(d.raw_norm[k, j]),
            "heldout_auc": separation(kept, d.train_diff[k, j], held_of["positive"], held_of["negative"], j),
            "zero_norm": bool(d.zero[k, j]),
            "mean_projection_positive": float(d.mean_projection[k, 0, j]),
            "mean_projection_negative": float(d.mean_projection[k, 1, j]),
        }
        if d.transfer_diff is not None and d.transfer_n is not None:
            record.update(
                {
                    "transfer_auc": separation(
                        kept, d.transfer_diff[k, j], test_of["positive"], test_of["negative"], j
                    )
                    if bool((d.transfer_n[k] > 0).all())
                    else float("nan"),
                    "n_transfer_train_positive": int(d.transfer_n[k, 0]),
                    "n_transfer_train_negative": int(d.transfer_n[k, 1]),
                    "n_transfer_test_positive": len(test_of["positive"]),
                    "n_transfer_test_negative": len(test_of["negative"]),
                }
            )
        records.append(record)
    return records
