"""The steering group: amygdala readout vectors (the reference's step 2) from the emotion pairs and the base
model. The asset reads its declared inputs (emotion_training_pairs, memory_graph, base_model), trains the
readout with `carl_assets.steering`, writes the readout folder and its tables, and judges what it wrote with
two blocking check specs (vectors_finite_unit_norm, manifest_matches_tensors)."""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import pandas as pd
import torch
from dagster_duckdb import DuckDBResource
from pydantic import Field

from carl_assets.carl.run_config import Placement
from carl_assets.defs.common import library_config, materialized, table_preview
from carl_assets.defs.resources import ArtifactStore, write_tables
from carl_assets.defs.steering_checks import MANIFEST_AGREES, UNIT_NORM, readout_checks
from carl_assets.handles import AssetHandle, Checkpoint
from carl_assets.models.defaults import resolve_placement, resolve_threads
from carl_assets.models.device import dtype_name
from carl_assets.models.loading import load_model_and_tokenizer
from carl_assets.runtime import torch_threads
from carl_assets.steering import (
    VECTORS_FILE,
    VLLM_ENV,
    ReadoutConfig,
    SteeringVectors,
    default_layers,
    find_decoder_blocks,
    save_readout,
    train_steering_vectors,
)
from carl_assets.steering.crosstalk import cosine_matrix, cross_talk, tag_cooccurrence
from carl_assets.steering.layers import LayerSweep, sweep_layers
from carl_assets.steering.plots import auc_plot, auc_vs_depth_plot, cross_talk_plot
from carl_assets.steering.projection import PROJECTION_COLUMNS, project_texts, read_text_file
from carl_assets.steering.readout import empty_readout
from carl_assets.steering.selection import select_emotions

# 'depth': the configured layers (or four spread by depth); 'auto': a sweep of every layer.
LayerSelection = Literal["depth", "auto"]


class SteeringConfig(dg.Config, ReadoutConfig, Placement):
    """steering_vectors: which emotions, how layers are chosen, the transfer and projection checks;
    `ReadoutConfig`: the layers, how texts are reduced and split (the library's settings, defined there);
    `Placement`: where and how precisely the forward passes run (activations are averaged in fp32 whatever
    the model's precision)."""

    min_pairs_per_polarity: int = Field(
        default=10, description="emotions with fewer positive or negative pairs are skipped (and listed)"
    )
    layer_selection: LayerSelection = Field(
        default="depth",
        description="'depth': `layers`, or four layers spread by depth when empty; 'auto': sweep every layer "
        "1..L on a subsample of the pairs and keep the `auto_k` with the best held-out AUC (ignores "
        "`layers`)",
    )
    auto_k: int = Field(default=4, description="layers kept by layer_selection 'auto'")
    sweep_max_per_group: int = Field(
        default=48,
        description="layer sweep subsample: pairs per emotion and polarity (one text ranking shared)")
    sweep_max_texts: int = Field(
        default=512, description="layer sweep subsample: at most this many unique texts")
    top_n_emotions: int = Field(
        default=0,
        description="data-driven selection: keep the N emotions with the most positive pairs (0 = all)")
    emotions: list[str] = Field(
        default=[], description="curated selection: emotions always kept when the data has them (with "
        "top_n_emotions: the union; neither: every emotion)")
    transfer_train_kind: str = Field(
        default="journal",
        description="generalisation check: a direction from pairs of nodes of this kind only...")
    transfer_test_kind: str = Field(
        default="reflection",
        description="...scored (transfer_auc) on nodes of this kind; either empty = off")
    heldout_text_file: str = Field(
        default="", description="a text file (one text per line) to project on the vectors: table "
        "steering_heldout_projections (raw and calibrated: 0 = typical negative, 1 = typical positive)")
    cooccurrence_min_score: int = Field(
        default=8, description="cross-talk: a node counts as having an emotion when scored at least this")


STATS_COLUMNS = ["emotion", "layer", "n_positive", "n_negative", "raw_norm", "heldout_auc"]
SWEEP_COLUMNS = ["layer", "mean_auc", "emotions", "rank", "chosen"]
CROSS_TALK_COLUMNS = ["layer", "emotion_a", "emotion_b", "cosine", "cooccurrence"]


def _select(pairs: pd.DataFrame, config: SteeringConfig, context: dg.AssetExecutionContext
            ) -> tuple[pd.DataFrame, dict[str, dict[str, int]], dict[str, Any], str]:
    """Emotions with enough pairs, then the configured selection (top N by positive pairs, curated); the
    last item is why nothing is left ("" when something is)."""
    counts = pairs.groupby(["emotion", "polarity"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=["positive", "negative"], fill_value=0)
    least = config.min_pairs_per_polarity
    enough = (counts["positive"] >= least) & (counts["negative"] >= least)
    skipped = {e: {"positive": int(r.positive), "negative": int(r.negative)}
               for e, r in counts[~enough].iterrows()}
    if skipped:
        context.log.warning(f"skipping {len(skipped)} emotions with < {least} pairs: {skipped}")
    positives = {str(e): int(counts.at[e, "positive"]) for e in counts.index[enough]}
    if not positives:
        return pairs.iloc[:0], skipped, {}, _no_pairs_reason(pairs, skipped, config, context)
    kept, why, missing = select_emotions(positives, config.top_n_emotions, config.emotions)
    if missing:
        context.log.warning(f"curated emotions without enough pairs in the data: {missing}")
    selection = {"why": why, "missing_curated": missing,
                 "not_selected": sorted(set(positives) - set(kept))}
    return pairs[pairs["emotion"].isin(kept)], skipped, selection, ""


def _pairs_empty_reason(context: dg.AssetExecutionContext) -> str:
    """The `empty_reason` emotion_training_pairs recorded: in its materialization of this run when it made
    one (an overlapping run may have made a later one, as with artifact versions), else in its latest."""
    records = context.instance.fetch_materializations(dg.AssetKey("emotion_training_pairs"), limit=20).records
    ours = [r for r in records if r.run_id == context.run_id]
    record = (ours or records or [None])[0]
    materialization = record.asset_materialization if record is not None else None
    meta = materialization.metadata if materialization is not None else {}
    return str(meta["empty_reason"].value) if "empty_reason" in meta else ""


def _no_pairs_reason(pairs: pd.DataFrame, skipped: dict[str, dict[str, int]], config: SteeringConfig,
                     context: dg.AssetExecutionContext) -> str:
    """Why no emotion can be trained: the pairs' own reason when there are none, else the counts."""
    if pairs.empty:
        return f"emotion_training_pairs is empty: {_pairs_empty_reason(context) or 'no node gave a pair'}"
    return (f"no emotion has at least steering_vectors.min_pairs_per_polarity = "
            f"{config.min_pairs_per_polarity} pairs of each polarity (counts: {skipped}); lower "
            "min_pairs_per_polarity, or tag more nodes")


def _write(artifacts: ArtifactStore, duckdb: DuckDBResource, readout: SteeringVectors, extra: dict[str, Any],
           tables: dict[str, pd.DataFrame]) -> Path:
    """The readout in a new steering_vectors version (its manifest gains `extra`) and the four tables
    (missing ones written empty); returns the version's folder."""
    with artifacts.write_version("steering_vectors") as (tmp, version):
        save_readout(readout, tmp, extra=extra)
    empty = {"steering_vector_stats": STATS_COLUMNS, "steering_layer_sweep": SWEEP_COLUMNS,
             "steering_cross_talk": CROSS_TALK_COLUMNS, "steering_heldout_projections": PROJECTION_COLUMNS}
    write_tables(duckdb, {name: tables.get(name, pd.DataFrame(columns=columns))
                          for name, columns in empty.items()})
    return artifacts.path("steering_vectors", version)


def _skip(context: dg.AssetExecutionContext, config: SteeringConfig, duckdb: DuckDBResource,
          artifacts: ArtifactStore, reason: str, skipped: dict[str, dict[str, int]]) -> dg.MaterializeResult:
    """No usable pairs: an explicit empty readout (zero concepts, `skipped_reason` in the manifest) and
    empty tables, so the checks and the readers downstream skip with the reason instead of failing."""
    context.log.warning(f"steering vectors skipped: {reason}")
    folder = _write(artifacts, duckdb, empty_readout(reason, reduction=config.reduction),
                    {"skipped": skipped, "min_pairs_per_polarity": config.min_pairs_per_polarity}, {})
    checks = readout_checks(folder, pd.DataFrame(columns=STATS_COLUMNS))
    return materialized(reason, skipped, config=config, check_results=checks, metadata={
        "path": dg.MetadataValue.path(str(folder)), "concepts": 0, "skipped_reason": reason,
        "skipped_emotions": dg.MetadataValue.json(skipped)})


def _with_kinds(pairs: pd.DataFrame, nodes: pd.DataFrame, config: SteeringConfig,
                context: dg.AssetExecutionContext) -> tuple[pd.DataFrame, tuple[str, str] | None]:
    """The pairs with their node's kind, and the transfer check's (train kind, test kind) when the pairs
    have nodes of both (None: off)."""
    pairs = pairs.merge(nodes[["node_id", "kind"]], on="node_id", how="left").fillna({"kind": "unknown"})
    transfer = (config.transfer_train_kind, config.transfer_test_kind)
    if not all(transfer):
        return pairs, None
    if not set(transfer) <= set(pairs["kind"]):
        missing = set(transfer) - set(pairs["kind"])
        context.log.warning(f"transfer check off: the pairs have no nodes of kind {missing}")
        return pairs, None
    return pairs, transfer


@dataclass
class _Forward:
    """What the forward passes over the base model produced."""

    vectors: SteeringVectors
    sweep: LayerSweep | None
    projections: pd.DataFrame
    texts: list[str]
    n_blocks: int
    placement: dict[str, Any]  # device, dtype, threads


def _train(model: torch.nn.Module, tokenizer: Any, pairs: pd.DataFrame, readout: ReadoutConfig,
           layers: list[int], transfer: tuple[str, str] | None,
           precomputed: dict[str, torch.Tensor] | None, model_name: str, context: dg.AssetExecutionContext
           ) -> SteeringVectors:
    """The library's readout training with this asset's settings (one call, so its signature is met here)."""

    def progress(done: int, total: int) -> None:
        if done == total or done % (readout.batch_size * 10) == 0:
            context.log.info(f"forward passes: {done}/{total} unique texts")

    return train_steering_vectors(
        model, tokenizer, pairs, readout, layers=layers, on_zero_norm="drop", model_name=model_name,
        progress=progress, transfer=transfer, precomputed=precomputed,
    )


def _forward(context: dg.AssetExecutionContext, config: SteeringConfig, pairs: pd.DataFrame,
             base_model: Checkpoint, transfer: tuple[str, str] | None) -> _Forward:
    """Load the base model, choose the layers (the sweep, for 'auto'), train the readout and project the
    user's held-out texts on it."""
    model_dir = base_model.file()
    device, dtype = resolve_placement(config.device, config.dtype, base_model.is_offline)
    threads = resolve_threads(config.threads, base_model.is_offline)
    model, tokenizer = load_model_and_tokenizer(model_dir, device=device, dtype=dtype)
    n_blocks = len(find_decoder_blocks(model))
    context.log.info(f"{len(pairs)} pairs over {pairs['emotion'].nunique()} emotions, "
                     f"{pairs['text'].nunique()} unique texts")
    readout = library_config(config, ReadoutConfig)
    sweep, precomputed = None, None
    with torch.inference_mode(), torch_threads(threads):
        if config.layer_selection == "auto":
            sweep = sweep_layers(model, tokenizer, pairs, readout, k=config.auto_k,
                                 max_per_group=config.sweep_max_per_group, max_texts=config.sweep_max_texts)
            layers, precomputed = sweep.chosen, sweep.precomputed(sweep.chosen)
            context.log.info(f"layer sweep on {sweep.subsample_texts} texts: chosen {layers}")
        else:
            layers = readout.layers or default_layers(n_blocks)
        vectors = _train(model, tokenizer, pairs, readout, layers, transfer, precomputed, str(model_dir),
                         context)
        texts = read_text_file(config.heldout_text_file) if config.heldout_text_file else []
        projections = project_texts(model, tokenizer, vectors, texts, readout)
    placement = {"device": str(device), "dtype": dtype_name(dtype), "threads": threads}
    return _Forward(vectors, sweep, projections, texts, n_blocks, placement)


def _rounded(series: pd.Series) -> dict[str, float | None]:
    return {str(k): (None if math.isnan(v) else round(float(v), 4)) for k, v in series.items()}


def _readout_metadata(vectors: SteeringVectors, folder: Path, config: SteeringConfig,
                      placement: dict[str, Any], pairs: pd.DataFrame, skipped: dict[str, dict[str, int]],
                      selection: dict[str, Any]) -> dict[str, Any]:
    """What was trained and how: the readout's shape, settings and inputs, and how to serve it (vLLM)."""
    return {
        "path": dg.MetadataValue.path(str(folder)),
        "concepts": len(vectors.concepts),
        "layers": dg.MetadataValue.json(vectors.layers),
        "layer_selection": config.layer_selection,
        **placement,
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
        "vllm_env": dg.MetadataValue.md("\n".join(
            ["```bash"] + [f"export {k}={folder / v}" for k, v in VLLM_ENV.items()] + ["```"])),
    }


def _quality_metadata(run: _Forward, stats: pd.DataFrame, best_layer: int, relation: pd.DataFrame,
                      sweep_table: pd.DataFrame, transfer: tuple[str, str] | None) -> dict[str, Any]:
    """How well it reads: AUC by layer (held out; transferred to an unseen kind), the cross-talk, the
    layer sweep and the top projections of the user's held-out texts (each when there is one)."""
    by_layer = stats.groupby("layer").mean(numeric_only=True)
    metadata: dict[str, Any] = {
        "mean_heldout_auc_by_layer": dg.MetadataValue.json(_rounded(by_layer["heldout_auc"])),
        "best_layer": best_layer,
        "cross_talk_by_layer": table_preview(relation.round(4), rows=len(relation)),
        "stats": table_preview(stats.round(4), rows=len(stats)),
    }
    if transfer is not None:
        metadata["transfer"] = f"{transfer[0]} -> {transfer[1]}"
        metadata["mean_transfer_auc_by_layer"] = dg.MetadataValue.json(_rounded(by_layer["transfer_auc"]))
    if run.sweep is not None:
        metadata["layer_sweep"] = table_preview(sweep_table.round(4), rows=len(sweep_table))
        metadata["sweep_subsample_texts"] = run.sweep.subsample_texts
    if len(run.projections):
        at_best = run.projections[run.projections["layer"] == best_layer]
        top = at_best.sort_values("calibrated", ascending=False).groupby("text_index").head(3)
        metadata["heldout_projections_top"] = table_preview(
            top.sort_values(["text_index", "calibrated"], ascending=[True, False]).round(3), rows=30)
        metadata["heldout_texts"] = len(run.texts)
    return metadata


def _best_layer(stats: pd.DataFrame, vectors: SteeringVectors) -> int:
    """The layer of the highest mean held-out AUC over emotions (the deepest when no AUC is defined)."""
    by_layer = stats.groupby("layer").mean(numeric_only=True)
    auc = by_layer["heldout_auc"]
    return int(auc.idxmax()) if auc.notna().any() else vectors.layers[-1]


def _plots(run: _Forward, stats: pd.DataFrame, tags: list[dict[str, int]], best_layer: int, min_score: int
           ) -> dict[str, bytes]:
    names = list(run.vectors.concepts)
    return {
        "auc_by_layer": auc_plot(stats),
        "auc_vs_depth": auc_vs_depth_plot(stats, run.n_blocks, run.sweep),
        "cross_talk": cross_talk_plot(cosine_matrix(run.vectors, best_layer),
                                      tag_cooccurrence(tags, names, min_score), names, best_layer),
    }


@dg.asset(
    group_name="steering",
    kinds={"pytorch", "safetensors", "duckdb"},
    check_specs=[UNIT_NORM, MANIFEST_AGREES],
    description="Amygdala readout vectors (CAA): per emotion and layer, mean(positive) - mean(negative) of "
    "the residual stream, unit length; artifacts/steering_vectors/vectors.safetensors (layer_<idx>.vectors, "
    "[n_concepts, hidden] float32) + manifest.json for a vLLM readout; tables steering_vector_stats "
    "(pair counts, raw norm, held-out AUC and transfer AUC to an unseen node kind per emotion and layer), "
    "steering_layer_sweep (layer 'auto'), steering_cross_talk (cosine vs tag co-occurrence), "
    "steering_heldout_projections (a user's text file).",
)
def steering_vectors(context: dg.AssetExecutionContext, config: SteeringConfig,
                     emotion_training_pairs: AssetHandle, memory_graph: AssetHandle, base_model: Checkpoint,
                     duckdb: DuckDBResource, artifacts: ArtifactStore) -> dg.MaterializeResult:
    all_pairs = emotion_training_pairs.read("emotion_training_pairs")
    pairs, skipped, selection, reason = _select(all_pairs, config, context)
    if reason:
        return _skip(context, config, duckdb, artifacts, reason, skipped)
    # memory_graph (upstream of the pairs too) gives each pair's node kind and the tags' co-occurrence.
    nodes = memory_graph.read("memory_nodes")
    pairs, transfer = _with_kinds(pairs, nodes, config, context)
    run = _forward(context, config, pairs, base_model, transfer)
    stats = run.vectors.stats.copy()
    tags = [json.loads(t) for t in nodes["tags_json"]]
    cross, relation = cross_talk(run.vectors, tags, config.cooccurrence_min_score)
    sweep = run.sweep
    sweep_table = sweep.by_layer.assign(chosen=sweep.by_layer["layer"].isin(sweep.chosen)) if sweep else \
        pd.DataFrame(columns=SWEEP_COLUMNS)
    folder = _write(artifacts, duckdb, run.vectors, {
        "skipped": skipped, "min_pairs_per_polarity": config.min_pairs_per_polarity, "selection": selection,
        "layer_selection": config.layer_selection}, {
        "steering_vector_stats": stats, "steering_layer_sweep": sweep_table, "steering_cross_talk": cross,
        "steering_heldout_projections": run.projections.reindex(columns=PROJECTION_COLUMNS)})
    best_layer = _best_layer(stats, run.vectors)
    metadata = {**_readout_metadata(run.vectors, folder, config, run.placement, pairs, skipped, selection),
                **_quality_metadata(run, stats, best_layer, relation, sweep_table, transfer)}
    return materialized(folder / VECTORS_FILE, stats, config=config, metadata=metadata,
                        plots=_plots(run, stats, tags, best_layer, config.cooccurrence_min_score),
                        check_results=readout_checks(folder, stats))
