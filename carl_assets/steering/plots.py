"""Figures of a steering readout (PNG bytes for Dagster metadata): held-out AUC per emotion and layer, AUC
against depth, and the vectors' cross-talk beside the tags' co-occurrence. No Dagster import."""

from __future__ import annotations

import numpy as np
import pandas as pd

from carl_assets.plotting import figure_png, line_plot, plt
from carl_assets.steering.layers import LayerSweep


def auc_plot(stats: pd.DataFrame) -> bytes:
    """Held-out AUC per emotion (rows) and layer (columns), with the mean over emotions as the last row."""
    grid = stats.pivot(index="emotion", columns="layer", values="heldout_auc")
    grid.loc["mean"] = grid.mean(axis=0)
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * grid.shape[1], 0.8 + 0.28 * grid.shape[0]))
    image = ax.imshow(grid.to_numpy(dtype=float), cmap="RdBu_r", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), list(grid.index))
    for (i, j), value in np.ndenumerate(grid.to_numpy(dtype=float)):
        ax.text(j, i, "" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.axhline(grid.shape[0] - 1.5, color="black", linewidth=0.8)
    ax.set_xlabel("layer (residual index)")
    ax.set_title("held-out AUC of the projection (0.5 = chance)")
    fig.colorbar(image, ax=ax, fraction=0.05)
    return figure_png(fig)


def auc_vs_depth_plot(stats: pd.DataFrame, n_blocks: int, sweep: LayerSweep | None) -> bytes:
    """Mean AUC over emotions against depth: held-out (all pairs), transfer to an unseen kind, and the
    sweep's subsample over every layer when `auto` ran."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    if sweep is not None:
        by = sweep.by_layer.sort_values("layer")
        series["held-out AUC, sweep subsample (all layers)"] = (by["layer"].tolist(), by["mean_auc"].tolist())
    by_layer = stats.groupby("layer").mean(numeric_only=True).sort_index()
    series["held-out AUC, all pairs"] = (by_layer.index.tolist(), by_layer["heldout_auc"].tolist())
    if "transfer_auc" in by_layer and by_layer["transfer_auc"].notna().any():
        series["transfer AUC (unseen node kind)"] = (by_layer.index.tolist(),
                                                     by_layer["transfer_auc"].tolist())
    chosen = sweep.chosen if sweep else []
    marks = {"chosen" if i == 0 else f"chosen {i}": float(x) for i, x in enumerate(chosen)}
    return line_plot(series, f"AUC against depth ({n_blocks} blocks; 0.5 = chance)", "layer (residual index)",
                     "mean AUC over emotions", vlines=marks, hlines={"chance": 0.5})


def cross_talk_plot(cos: np.ndarray, co: np.ndarray, concepts: list[str], layer: int) -> bytes:
    """Cosine of the vectors at `layer` beside the tags' co-occurrence, and one against the other."""
    fig, axes = plt.subplots(1, 3, figsize=(15.0, 4.6))
    for ax, grid, title in ((axes[0], cos, f"cosine between vectors, layer {layer}"),
                            (axes[1], co, "tag co-occurrence (phi)")):
        image = ax.imshow(grid, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
        ax.set_xticks(range(len(concepts)), concepts, rotation=90, fontsize=7)
        ax.set_yticks(range(len(concepts)), concepts, fontsize=7)
        ax.set_title(title)
        fig.colorbar(image, ax=ax, fraction=0.046)
    upper = np.triu_indices(len(concepts), k=1)
    axes[2].scatter(co[upper], cos[upper], s=10)
    axes[2].set_xlabel("tag co-occurrence (phi)")
    axes[2].set_ylabel("cosine between vectors")
    axes[2].set_title("each emotion pair")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)
