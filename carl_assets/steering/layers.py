"""Layer selection (`layers: auto`): sweep every layer on a subsample of the pairs, keep the k best.

The reference's open question: which layers separate the emotions most cleanly. The answer is measured,
not assumed: each candidate layer gets the held-out AUC of its diff-of-means direction (mean over
emotions) on a deterministic subsample of the pairs, and the k layers with the highest score are kept.

Why it costs little: the subsample is drawn with one ranking of the texts shared by every emotion, so
the emotions' subsamples overlap and few unique texts run; and the sweep keeps its reduced activations,
which the full run at the chosen layers reuses instead of running those texts again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from carl_assets.steering.pairs import pairs_frame, stable_rank
from carl_assets.steering.residual import find_decoder_blocks
from carl_assets.steering.training import ReadoutConfig, ReadoutOptions, train_steering_vectors


@dataclass
class LayerSweep:
    """The sweep's result: per (emotion, layer) stats, the mean held-out AUC per layer, the chosen layers,
    and the reduced activations of the subsample's texts at every swept layer."""

    swept: list[int]
    chosen: list[int]
    stats: pd.DataFrame  # emotion, layer, heldout_auc, ... (train_steering_vectors' stats on the subsample)
    by_layer: pd.DataFrame  # layer, mean_auc, emotions (with an AUC), rank (1 = best)
    activations: dict[str, torch.Tensor]  # text -> [len(swept), hidden]
    subsample_pairs: int
    subsample_texts: int

    def precomputed(self, layers: Sequence[int]) -> dict[str, torch.Tensor]:
        """The kept activations at `layers` (in that order), for `train_steering_vectors(precomputed=...)`."""
        missing = [x for x in layers if x not in self.swept]
        if missing:
            raise ValueError(f"layers {missing} were not swept (swept: {self.swept})")
        columns = torch.as_tensor([self.swept.index(x) for x in layers])
        return {text: acts.index_select(0, columns) for text, acts in self.activations.items()}


def subsample_pairs(
    pairs: pd.DataFrame, max_per_group: int, seed: int = 0, max_texts: int | None = None
) -> pd.DataFrame:
    """At most `max_per_group` rows per (emotion, polarity), picked by one hash ranking of the texts
    shared by every emotion (so the picks overlap and few unique texts remain); halved until at most
    `max_texts` unique texts remain (never below 2 per group)."""
    if max_per_group < 2:
        raise ValueError(f"max_per_group must be at least 2 (a held-out split needs it), got {max_per_group}")
    frame = pairs.reset_index(drop=True)
    rank = frame["text"].map(lambda t: stable_rank(str(seed), "layer-sweep", str(t)))
    ordered = frame.assign(_rank=rank).sort_values(["_rank", "emotion", "polarity"], kind="stable")
    cap = max_per_group
    while True:
        picked = ordered.groupby(["emotion", "polarity"], sort=False).head(cap)
        if max_texts is None or picked["text"].nunique() <= max_texts or cap <= 2:
            return picked.drop(columns="_rank").sort_index().reset_index(drop=True)
        cap = max(2, cap // 2)


def rank_layers(stats: pd.DataFrame) -> pd.DataFrame:
    """Mean held-out AUC per layer over the emotions that have one; rank 1 = best (ties: the deeper
    layer first, the reference's prior that later layers hold more abstract features)."""
    by_layer = stats.groupby("layer").agg(
        mean_auc=("heldout_auc", "mean"), emotions=("heldout_auc", lambda x: int(x.notna().sum()))
    )
    by_layer = by_layer.reset_index()
    order = by_layer.sort_values(["mean_auc", "layer"], ascending=[False, False], na_position="last")
    by_layer["rank"] = 0
    by_layer.loc[order.index, "rank"] = range(1, len(order) + 1)
    return by_layer


def sweep_layers(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: pd.DataFrame | Sequence[Mapping[str, Any]],
    readout: ReadoutConfig | None = None,
    *,
    k: int,
    candidates: Sequence[int] | None = None,
    max_per_group: int,
    max_texts: int | None,
    heldout_fraction: float = 0.25,
    progress: Callable[[int, int], None] | None = None,
) -> LayerSweep:
    """Score every candidate layer (default 1..L, the residual stream after each block) by the mean
    held-out AUC over emotions on a subsample of the pairs, and choose the best `k` (sorted by index).

    Texts are read with `readout`'s batch size, reduction, token limit and BOS rule, and subsampled with
    its seed (default `ReadoutConfig()`); the sweep's own split of its subsample holds out
    `heldout_fraction` of each group, at most `max_per_group` (`readout`'s layers and held-out settings
    are not used). Raises ValueError for `k` below 1 or when no layer has a held-out AUC."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    readout = readout or ReadoutConfig()
    n_blocks = len(find_decoder_blocks(model))
    swept = sorted({int(x) for x in candidates}) if candidates else list(range(1, n_blocks + 1))
    frame = pairs_frame(pairs)
    sample = subsample_pairs(frame, max_per_group, seed=readout.seed, max_texts=max_texts)
    config = ReadoutOptions.model_validate({
        **dict(readout),
        "layers": swept,
        "heldout_fraction": heldout_fraction,
        "max_heldout_per_polarity": max_per_group,
        "on_zero_norm": "drop",
        "keep_activations": True,
    })
    result = train_steering_vectors(model, tokenizer, sample, config, progress=progress)
    assert result.stats is not None and result.activations is not None
    by_layer = rank_layers(result.stats)
    if by_layer["mean_auc"].isna().all():
        raise ValueError(
            "no layer has a held-out AUC on the subsample: raise max_per_group or heldout_fraction"
        )
    chosen = sorted(int(x) for x in by_layer.sort_values("rank")["layer"].head(min(k, len(swept))))
    return LayerSweep(
        swept=swept,
        chosen=chosen,
        stats=result.stats,
        by_layer=by_layer,
        activations=result.activations,
        subsample_pairs=len(sample),
        subsample_texts=int(sample["text"].nunique()),
    )
