"""The steering group: amygdala readout vectors (seed step 2) from the emotion pairs and the base model."""

import json
import math
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import torch
from dagster_duckdb import DuckDBResource
from pydantic import Field

from carl_assets.defs.common import materialized, table_preview
from carl_assets.defs.resources import ArtifactStore, read_table, write_tables
from carl_assets.models.defaults import is_offline_model, resolve_placement
from carl_assets.models.device import dtype_name
from carl_assets.models.loading import load_model_and_tokenizer
from carl_assets.plotting import figure_png, line_plot, plt
from carl_assets.steering import (
    MANIFEST_FILE,
    VECTORS_FILE,
    VLLM_ENV,
    default_layers,
    find_decoder_blocks,
    readout_problems,
    save_readout,
    train_steering_vectors,
)
from carl_assets.steering.crosstalk import cosine_matrix, cross_talk, tag_cooccurrence
from carl_assets.steering.layers import LayerSweep, sweep_layers
from carl_assets.steering.projection import PROJECTION_COLUMNS, project_texts, read_text_file
from carl_assets.steering.readout import empty_readout
from carl_assets.steering.selection import select_emotions

LAYER_SELECTIONS = ("depth", "auto")


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
    max_length: int = Field(
        default=512, description="texts are truncated to this many tokens (and to the model's position table); "
        "the number cut is reported as truncated_texts")
    layer_selection: str = Field(
        default="depth",
        description="'depth': `layers`, or four layers spread by depth when empty; 'auto': sweep every layer "
        "1..L on a subsample of the pairs and keep the `auto_k` with the best held-out AUC (ignores `layers`)",
    )
    auto_k: int = Field(default=4, description="layers kept by layer_selection 'auto'")
    sweep_max_per_group: int = Field(
        default=48, description="layer sweep subsample: pairs per emotion and polarity (one text ranking shared)")
    sweep_max_texts: int = Field(default=512, description="layer sweep subsample: at most this many unique texts")
    top_n_emotions: int = Field(
        default=0, description="data-driven selection: keep the N emotions with the most positive pairs (0 = all)")
    emotions: list[str] = Field(
        default=[], description="curated selection: emotions always kept when the data has them (with "
        "top_n_emotions: the union; neither: every emotion)")
    exclude_bos: bool = Field(
        default=True, description="leave a leading BOS token out of the 'mean' reduction (its large activation "
        "adds a length-dependent direction on real models)")
    transfer_train_kind: str = Field(
        default="journal", description="generalisation check: a direction from pairs of nodes of this kind only...")
    transfer_test_kind: str = Field(
        default="reflection", description="...scored (transfer_auc) on nodes of this kind; either empty = off")
    heldout_text_file: str = Field(
        default="", description="a text file (one text per line) to project on the vectors: table "
        "steering_heldout_projections (raw and calibrated: 0 = typical negative, 1 = typical positive)")
    cooccurrence_min_score: int = Field(
        default=8, description="cross-talk: a node counts as having an emotion when scored at least this")
    device: str = Field(default="auto", description="where the forward passes run: 'auto' (CUDA, then MPS, then "
                        "CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    dtype: str = Field(default="auto", description="model precision for the forward passes: 'auto' (fp32 for the "
                       "offline model; bf16 on a CUDA device that supports it for a real one), 'bf16', 'fp16' "
                       "or 'fp32' (activations are averaged in fp32 either way)")


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


def _auc_vs_depth_plot(stats: pd.DataFrame, n_blocks: int, sweep: LayerSweep | None) -> bytes:
    """Mean AUC over emotions against depth: held-out (all pairs), transfer to an unseen kind, and the
    sweep's subsample over every layer when `auto` ran."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    if sweep is not None:
        by = sweep.by_layer.sort_values("layer")
        series["held-out AUC, sweep subsample (all layers)"] = (by["layer"].tolist(), by["mean_auc"].tolist())
    by_layer = stats.groupby("layer").mean(numeric_only=True).sort_index()
    series["held-out AUC, all pairs"] = (by_layer.index.tolist(), by_layer["heldout_auc"].tolist())
    if "transfer_auc" in by_layer and by_layer["transfer_auc"].notna().any():
        series["transfer AUC (unseen node kind)"] = (by_layer.index.tolist(), by_layer["transfer_auc"].tolist())
    marks = {"chosen" if i == 0 else f"chosen {i}": float(x) for i, x in enumerate(sweep.chosen)} if sweep else {}
    return line_plot(series, f"AUC against depth ({n_blocks} blocks; 0.5 = chance)", "layer (residual index)",
                     "mean AUC over emotions", vlines=marks, hlines={"chance": 0.5})


def _cross_talk_plot(cos: np.ndarray, co: np.ndarray, concepts: list[str], layer: int) -> bytes:
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


def _select(pairs: pd.DataFrame, config: SteeringConfig, context: dg.AssetExecutionContext
            ) -> tuple[pd.DataFrame, dict[str, dict[str, int]], dict[str, Any], str]:
    """Emotions with enough pairs, then the configured selection (top N by positive pairs, curated); the
    last item is why nothing is left ("" when something is)."""
    counts = pairs.groupby(["emotion", "polarity"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=["positive", "negative"], fill_value=0)
    enough = (counts["positive"] >= config.min_pairs_per_polarity) & (counts["negative"] >= config.min_pairs_per_polarity)
    skipped = {e: {"positive": int(r.positive), "negative": int(r.negative)} for e, r in counts[~enough].iterrows()}
    if skipped:
        context.log.warning(f"skipping {len(skipped)} emotions with < {config.min_pairs_per_polarity} pairs: {skipped}")
    positives = {str(e): int(counts.at[e, "positive"]) for e in counts.index[enough]}
    if not positives:
        return pairs.iloc[:0], skipped, {}, _no_pairs_reason(pairs, skipped, config, context)
    kept, why, missing = select_emotions(positives, config.top_n_emotions, config.emotions)
    if missing:
        context.log.warning(f"curated emotions without enough pairs in the data: {missing}")
    selection = {"why": why, "missing_curated": missing,
                 "not_selected": sorted(set(positives) - set(kept))}
    return pairs[pairs["emotion"].isin(kept)], skipped, selection, ""


def _no_pairs_reason(pairs: pd.DataFrame, skipped: dict[str, dict[str, int]], config: SteeringConfig,
                     context: dg.AssetExecutionContext) -> str:
    """Why no emotion can be trained: the pairs' own reason when there are none, else the counts."""
    if pairs.empty:
        event = context.instance.get_latest_materialization_event(dg.AssetKey("emotion_training_pairs"))
        meta = event.asset_materialization.metadata if event and event.asset_materialization else {}
        reason = meta["empty_reason"].value if "empty_reason" in meta else ""
        return f"emotion_training_pairs is empty: {reason or 'no node gave a pair'}"
    return (f"no emotion has at least steering_vectors.min_pairs_per_polarity = {config.min_pairs_per_polarity} "
            f"pairs of each polarity (counts: {skipped}); lower min_pairs_per_polarity, or tag more nodes")


def _skip(context: dg.AssetExecutionContext, config: SteeringConfig, duckdb: DuckDBResource,
          artifacts: ArtifactStore, reason: str, skipped: dict[str, dict[str, int]]) -> dg.MaterializeResult:
    """No usable pairs: an explicit empty readout (zero concepts, `skipped_reason` in the manifest) and
    empty tables, so the checks and the readers downstream skip with the reason instead of failing."""
    context.log.warning(f"steering vectors skipped: {reason}")
    with artifacts.write_dir("steering_vectors") as tmp:
        save_readout(empty_readout(reason, reduction=config.reduction), tmp,
                     extra={"skipped": skipped, "min_pairs_per_polarity": config.min_pairs_per_polarity})
    stats = pd.DataFrame(columns=["emotion", "layer", "n_positive", "n_negative", "raw_norm", "heldout_auc"])
    write_tables(duckdb, {"steering_vector_stats": stats,
                          "steering_layer_sweep": pd.DataFrame(columns=["layer", "mean_auc", "emotions", "rank",
                                                                        "chosen"]),
                          "steering_cross_talk": pd.DataFrame(columns=["layer", "emotion_a", "emotion_b", "cosine",
                                                                       "cooccurrence"]),
                          "steering_heldout_projections": pd.DataFrame(columns=PROJECTION_COLUMNS)})
    folder = artifacts.path("steering_vectors")
    return materialized(reason, skipped, config=config, metadata={
        "path": dg.MetadataValue.path(str(folder)), "concepts": 0, "skipped_reason": reason,
        "skipped_emotions": dg.MetadataValue.json(skipped)})


@dg.asset(
    group_name="steering",
    deps=["emotion_training_pairs", "base_model"],
    kinds={"pytorch", "safetensors", "duckdb"},
    description="Amygdala readout vectors (CAA): per emotion and layer, mean(positive) - mean(negative) of the "
    "residual stream, unit length; artifacts/steering_vectors/vectors.safetensors (layer_<idx>.vectors, "
    "[n_concepts, hidden] float32) + manifest.json for a vLLM readout; tables steering_vector_stats "
    "(pair counts, raw norm, held-out AUC and transfer AUC to an unseen node kind per emotion and layer), "
    "steering_layer_sweep (layer 'auto'), steering_cross_talk (cosine vs tag co-occurrence), "
    "steering_heldout_projections (a user's text file).",
)
def steering_vectors(context: dg.AssetExecutionContext, config: SteeringConfig, duckdb: DuckDBResource,
                     artifacts: ArtifactStore) -> dg.MaterializeResult:
    if config.layer_selection not in LAYER_SELECTIONS:
        raise ValueError(f"layer_selection must be one of {list(LAYER_SELECTIONS)}, not {config.layer_selection!r}")
    pairs, skipped, selection, reason = _select(read_table(duckdb, "emotion_training_pairs"), config, context)
    if reason:
        return _skip(context, config, duckdb, artifacts, reason, skipped)
    # memory_nodes is upstream of the pairs: it gives each pair's node kind and the tags' co-occurrence.
    nodes = read_table(duckdb, "memory_nodes")
    pairs = pairs.merge(nodes[["node_id", "kind"]], on="node_id", how="left").fillna({"kind": "unknown"})
    transfer = (config.transfer_train_kind, config.transfer_test_kind)
    transfer_on = all(transfer) and set(transfer) <= set(pairs["kind"])
    if all(transfer) and not transfer_on:
        context.log.warning(f"transfer check off: the pairs have no nodes of kind {set(transfer) - set(pairs['kind'])}")

    model_dir = artifacts.require("base_model")
    device, dtype = resolve_placement(config.device, config.dtype, is_offline_model(model_dir))
    model, tokenizer = load_model_and_tokenizer(model_dir, device=device, dtype=dtype)
    n_blocks = len(find_decoder_blocks(model))
    context.log.info(f"{len(pairs)} pairs over {pairs['emotion'].nunique()} emotions, "
                     f"{pairs['text'].nunique()} unique texts")

    def progress(done: int, total: int) -> None:
        if done == total or done % (config.batch_size * 10) == 0:
            context.log.info(f"forward passes: {done}/{total} unique texts")

    common = {"batch_size": config.batch_size, "reduction": config.reduction, "seed": config.seed,
              "max_length": config.max_length, "exclude_bos": config.exclude_bos}
    sweep, precomputed = None, None
    with torch.inference_mode():
        if config.layer_selection == "auto":
            sweep = sweep_layers(model, tokenizer, pairs, k=config.auto_k, max_per_group=config.sweep_max_per_group,
                                 max_texts=config.sweep_max_texts, **common)
            layers, precomputed = sweep.chosen, sweep.precomputed(sweep.chosen)
            context.log.info(f"layer sweep on {sweep.subsample_texts} texts: chosen {layers}")
        else:
            layers = config.layers or default_layers(n_blocks)
        vectors = train_steering_vectors(
            model, tokenizer, pairs, layers=layers, heldout_fraction=config.heldout_fraction,
            max_heldout_per_polarity=config.max_heldout_per_polarity, on_zero_norm="drop",
            model_name=str(model_dir), progress=progress, transfer=transfer if transfer_on else None,
            precomputed=precomputed, **common,
        )
        texts = read_text_file(config.heldout_text_file) if config.heldout_text_file else []
        projections = project_texts(model, tokenizer, vectors, texts, batch_size=config.batch_size,
                                    max_length=config.max_length, exclude_bos=config.exclude_bos)
    stats = vectors.stats.copy()
    tags = [json.loads(t) for t in nodes["tags_json"]]
    cross, relation = cross_talk(vectors, tags, config.cooccurrence_min_score)
    sweep_table = sweep.by_layer.assign(chosen=sweep.by_layer["layer"].isin(sweep.chosen)) if sweep else \
        pd.DataFrame(columns=["layer", "mean_auc", "emotions", "rank", "chosen"])
    with artifacts.write_dir("steering_vectors") as tmp:
        save_readout(vectors, tmp, extra={"skipped": skipped, "min_pairs_per_polarity": config.min_pairs_per_polarity,
                                          "selection": selection, "layer_selection": config.layer_selection})
    write_tables(duckdb, {"steering_vector_stats": stats, "steering_layer_sweep": sweep_table,
                          "steering_cross_talk": cross,
                          "steering_heldout_projections": projections.reindex(columns=PROJECTION_COLUMNS)})
    folder = artifacts.path("steering_vectors")

    by_layer = stats.groupby("layer").mean(numeric_only=True)
    best_layer = int(by_layer["heldout_auc"].idxmax()) if by_layer["heldout_auc"].notna().any() else vectors.layers[-1]

    def rounded(series: pd.Series) -> dict[str, float | None]:
        return {str(k): (None if math.isnan(v) else round(float(v), 4)) for k, v in series.items()}

    metadata: dict[str, Any] = {
        "path": dg.MetadataValue.path(str(folder)),
        "concepts": len(vectors.concepts),
        "layers": dg.MetadataValue.json(vectors.layers),
        "layer_selection": config.layer_selection,
        "device": str(device),
        "dtype": dtype_name(dtype),
        "hidden_size": vectors.hidden_size,
        "shape_per_layer": f"[{len(vectors.concepts)}, {vectors.hidden_size}]",
        "token_reduction": vectors.reduction,
        "bos_excluded": vectors.bos_excluded,
        "max_tokens": vectors.max_tokens if vectors.max_tokens is not None else -1,
        "truncated_texts": vectors.truncated_texts,
        "unique_texts": int(pairs["text"].nunique()),
        "pairs": len(pairs),
        "skipped_emotions": dg.MetadataValue.json(skipped),
        "emotion_selection": dg.MetadataValue.json(selection),
        "dropped_zero_norm": dg.MetadataValue.json(vectors.dropped),
        "mean_heldout_auc_by_layer": dg.MetadataValue.json(rounded(by_layer["heldout_auc"])),
        "best_layer": best_layer,
        "cross_talk_by_layer": table_preview(relation.round(4), rows=len(relation)),
        "vllm_env": dg.MetadataValue.md("\n".join(
            ["```bash"] + [f"export {k}={folder / v}" for k, v in VLLM_ENV.items()] + ["```"])),
        "stats": table_preview(stats.round(4), rows=len(stats)),
    }
    if transfer_on:
        metadata["transfer"] = f"{transfer[0]} -> {transfer[1]}"
        metadata["mean_transfer_auc_by_layer"] = dg.MetadataValue.json(rounded(by_layer["transfer_auc"]))
    if sweep is not None:
        metadata["layer_sweep"] = table_preview(sweep_table.round(4), rows=len(sweep_table))
        metadata["sweep_subsample_texts"] = sweep.subsample_texts
    if len(projections):
        top = projections[projections["layer"] == best_layer].sort_values("calibrated", ascending=False)
        metadata["heldout_projections_top"] = table_preview(
            top.groupby("text_index").head(3).sort_values(["text_index", "calibrated"], ascending=[True, False])
            .round(3), rows=30)
        metadata["heldout_texts"] = len(texts)
    names = list(vectors.concepts)
    plots = {
        "auc_by_layer": _auc_plot(stats),
        "auc_vs_depth": _auc_vs_depth_plot(stats, n_blocks, sweep),
        "cross_talk": _cross_talk_plot(cosine_matrix(vectors, best_layer),
                                       tag_cooccurrence(tags, names, config.cooccurrence_min_score), names,
                                       best_layer),
    }
    return materialized(folder / VECTORS_FILE, stats, config=config, metadata=metadata, plots=plots)


@dg.asset_check(asset=steering_vectors, blocking=True,
                description="Every vector finite and of unit norm (float32, one row per concept).")
def vectors_finite_unit_norm(artifacts: ArtifactStore) -> dg.AssetCheckResult:
    from safetensors.torch import load_file

    tensors = load_file(str(artifacts.require("steering_vectors", VECTORS_FILE)))
    skipped = _skipped_reason(artifacts)
    worst, finite = 0.0, True
    for t in tensors.values():
        finite = finite and bool(torch.isfinite(t).all())
        if finite and t.numel():
            worst = max(worst, float((t.double().norm(dim=-1) - 1).abs().max()))
    metadata = {"tensors": len(tensors), "finite": finite, "max_abs_norm_error": worst}
    if skipped and not tensors:  # an explicit empty readout: nothing to check, and it says why
        return dg.AssetCheckResult(passed=True, description=f"skipped: {skipped}",
                                   metadata={**metadata, "skipped_reason": skipped})
    problems = [text for bad, text in (
        (not tensors, "vectors.safetensors holds no tensor and the manifest gives no skipped_reason"),
        (not finite, "some vectors are not finite"),
        (worst > 1e-4, f"rows are not unit norm (max |norm - 1| = {worst:.2e})")) if bad]
    return dg.AssetCheckResult(passed=not problems, metadata=metadata, description=(
        "; ".join(problems) + ": rematerialize steering_vectors" if problems else f"{len(tensors)} layers, unit rows"))


def _skipped_reason(artifacts: ArtifactStore) -> str:
    """The `skipped_reason` of the current readout's manifest ("" for a readout with emotions)."""
    manifest = artifacts.require("steering_vectors", MANIFEST_FILE)
    return str(json.loads(manifest.read_text()).get("skipped_reason", ""))


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
    skipped = str(manifest.get("skipped_reason", ""))
    description = "; ".join(problems) + ": rematerialize steering_vectors" if problems else (
        f"skipped: {skipped}" if skipped else f"{len(concepts)} concepts agree with the tensors and the stats")
    return dg.AssetCheckResult(
        passed=not problems, description=description,
        metadata={"problems": dg.MetadataValue.json(problems), "concepts": len(concepts),
                  "layers": dg.MetadataValue.json(manifest.get("layers", [])),
                  **({"skipped_reason": skipped} if skipped else {})},
    )
