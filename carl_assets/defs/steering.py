"""The steering group: amygdala readout vectors (seed step 2) from the emotion pairs and the base model."""

import json
import math

import dagster as dg
import numpy as np
import pandas as pd
import torch
from dagster_duckdb import DuckDBResource
from pydantic import Field

from carl_assets.defs.common import materialized, table_preview
from carl_assets.defs.resources import ArtifactStore, read_table, write_tables
from carl_assets.models.loading import load_model_and_tokenizer
from carl_assets.plotting import figure_png, plt
from carl_assets.steering import (
    MANIFEST_FILE,
    VECTORS_FILE,
    readout_problems,
    save_readout,
    train_steering_vectors,
)


class SteeringConfig(dg.Config):
    layers: list[int] = Field(
        default=[],
        description="residual-stream indices (i = after decoder block i-1, 0 = embeddings, before the final "
        "norm); empty = four layers spread by depth, round(L * [0.25, 0.5, 0.75, 1.0])",
    )
    reduction: str = Field(
        default="mean",
        description="'mean' (mask-weighted mean over real tokens) or 'last' (last real token). Mean is the "
        "default: a readout projects every token, and on the small offline model the last token (mostly "
        "'.') carries no emotion signal (held-out AUC ~0.47 vs ~0.74 for mean on the sample graph).",
    )
    min_pairs_per_polarity: int = Field(
        default=10, description="emotions with fewer positive or negative pairs are skipped (and listed)"
    )
    batch_size: int = Field(default=32, description="texts per forward pass")
    heldout_fraction: float = Field(default=0.2, description="share of each emotion's pairs held out for the AUC")
    max_heldout_per_polarity: int = Field(default=64, description="cap on held-out texts per emotion and polarity")
    seed: int = Field(default=0, description="seed of the deterministic held-out split")
    max_length: int = Field(default=512, description="texts are truncated to this many tokens")


def _auc_plot(stats: pd.DataFrame) -> bytes:
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


@dg.asset(
    group_name="steering",
    deps=["emotion_training_pairs", "base_model"],
    kinds={"pytorch", "safetensors", "duckdb"},
    description="Amygdala readout vectors (CAA): per emotion and layer, mean(positive) - mean(negative) of the "
    "residual stream, unit length; artifacts/steering_vectors/vectors.safetensors (layer_<idx>.vectors, "
    "[n_concepts, hidden] float32) + manifest.json for a vLLM readout; table steering_vector_stats "
    "(pair counts, raw norm, held-out AUC per emotion and layer).",
)
def steering_vectors(context: dg.AssetExecutionContext, config: SteeringConfig, duckdb: DuckDBResource,
                     artifacts: ArtifactStore) -> dg.MaterializeResult:
    pairs = read_table(duckdb, "emotion_training_pairs")
    counts = pairs.groupby(["emotion", "polarity"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=["positive", "negative"], fill_value=0)
    enough = (counts["positive"] >= config.min_pairs_per_polarity) & (counts["negative"] >= config.min_pairs_per_polarity)
    skipped = {e: {"positive": int(r.positive), "negative": int(r.negative)} for e, r in counts[~enough].iterrows()}
    kept = sorted(counts.index[enough])
    if not kept:
        raise ValueError(f"no emotion has at least {config.min_pairs_per_polarity} pairs of each polarity "
                         f"(counts: {counts.to_dict('index')})")
    if skipped:
        context.log.warning(f"skipping {len(skipped)} emotions with < {config.min_pairs_per_polarity} pairs: {skipped}")
    pairs = pairs[pairs["emotion"].isin(kept)]

    model_dir = artifacts.require("base_model")
    model, tokenizer = load_model_and_tokenizer(model_dir)
    context.log.info(f"{len(pairs)} pairs over {len(kept)} emotions, {pairs['text'].nunique()} unique texts")

    def progress(done: int, total: int) -> None:
        if done == total or done % (config.batch_size * 10) == 0:
            context.log.info(f"forward passes: {done}/{total} unique texts")

    with torch.inference_mode():
        vectors = train_steering_vectors(
            model, tokenizer, pairs, layers=config.layers or None, batch_size=config.batch_size,
            reduction=config.reduction, heldout_fraction=config.heldout_fraction,
            max_heldout_per_polarity=config.max_heldout_per_polarity, seed=config.seed,
            max_length=config.max_length, on_zero_norm="drop", model_name=str(model_dir), progress=progress,
        )
    stats = vectors.stats.copy()
    with artifacts.write_dir("steering_vectors") as tmp:
        save_readout(vectors, tmp, extra={"skipped": skipped, "min_pairs_per_polarity": config.min_pairs_per_polarity})
    write_tables(duckdb, {"steering_vector_stats": stats})
    folder = artifacts.path("steering_vectors")

    by_layer = stats.groupby("layer").agg(mean_auc=("heldout_auc", "mean"), mean_raw_norm=("raw_norm", "mean"))
    best_layer = int(by_layer["mean_auc"].idxmax()) if by_layer["mean_auc"].notna().any() else vectors.layers[-1]
    mean_auc = {str(k): (None if math.isnan(v) else round(float(v), 4)) for k, v in by_layer["mean_auc"].items()}
    return materialized(
        folder / VECTORS_FILE, stats, config=config,
        metadata={
            "path": dg.MetadataValue.path(str(folder)),
            "concepts": len(vectors.concepts),
            "layers": dg.MetadataValue.json(vectors.layers),
            "hidden_size": vectors.hidden_size,
            "shape_per_layer": f"[{len(vectors.concepts)}, {vectors.hidden_size}]",
            "token_reduction": vectors.reduction,
            "unique_texts": int(pairs["text"].nunique()),
            "pairs": len(pairs),
            "skipped_emotions": dg.MetadataValue.json(skipped),
            "dropped_zero_norm": dg.MetadataValue.json(vectors.dropped),
            "mean_heldout_auc_by_layer": dg.MetadataValue.json(mean_auc),
            "best_layer": best_layer,
            "stats": table_preview(stats.round(4), rows=len(stats)),
        },
        plots={"auc_by_layer": _auc_plot(stats)},
    )


@dg.asset_check(asset=steering_vectors, blocking=True,
                description="Every vector finite and of unit norm (float32, one row per concept).")
def vectors_finite_unit_norm(artifacts: ArtifactStore) -> dg.AssetCheckResult:
    from safetensors.torch import load_file

    tensors = load_file(str(artifacts.require("steering_vectors", VECTORS_FILE)))
    worst, finite = 0.0, True
    for t in tensors.values():
        finite = finite and bool(torch.isfinite(t).all())
        if finite and t.numel():
            worst = max(worst, float((t.double().norm(dim=-1) - 1).abs().max()))
    return dg.AssetCheckResult(
        passed=bool(tensors) and finite and worst <= 1e-4,
        metadata={"tensors": len(tensors), "finite": finite, "max_abs_norm_error": worst},
    )


@dg.asset_check(asset=steering_vectors, blocking=True,
                description="manifest.json and vectors.safetensors agree: keys = layers, shapes = "
                "[n_concepts, hidden], pair counts for exactly the concepts; stats table covers them.")
def manifest_matches_tensors(artifacts: ArtifactStore, duckdb: DuckDBResource) -> dg.AssetCheckResult:
    folder = artifacts.require("steering_vectors")
    problems = readout_problems(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text()) if (folder / MANIFEST_FILE).exists() else {}
    stats = read_table(duckdb, "steering_vector_stats")
    concepts = set(manifest.get("concepts", []))
    if not concepts <= set(stats["emotion"]):
        problems.append("steering_vector_stats lacks some manifest concepts")
    if not set(manifest.get("layers", [])) <= set(stats["layer"].astype(int)):
        problems.append("steering_vector_stats lacks some manifest layers")
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"problems": dg.MetadataValue.json(problems), "concepts": len(concepts),
                  "layers": dg.MetadataValue.json(manifest.get("layers", []))},
    )
