"""LeWorld model assets: the system trained in three phases (with and without memory reads, over seeds) and
its evaluation against the baselines with the multi-seed memory verdict.

The science lives in `carl_assets.leworld` (architecture, training, comparison, evaluation); these assets
take their declared upstreams as handles, call it, write safetensors / DuckDB and report metadata. Sizes
default to what fits about a minute on a 2-core CPU.
"""

import json
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import torch
from dagster_duckdb import DuckDBResource
from pydantic import Field

from carl_assets.defs.common import library_config, materialized, table_preview
from carl_assets.defs.leworld_data import DATASET_FILE, GROUP, load_memory_bits, load_split
from carl_assets.defs.pools import TRAINING_POOL
from carl_assets.defs.resources import ArtifactStore, write_tables
from carl_assets.handles import AssetHandle
from carl_assets.leworld.architecture import LeWorldSystem, count_params, load_system, save_system
from carl_assets.leworld.comparison import (
    VARIANTS,
    Replicate,
    evaluate_replicates,
    memory_verdict,
    train_replicates,
    verdict_sentence,
)
from carl_assets.leworld.data import SPLITS
from carl_assets.leworld.evaluation import EvaluationSettings, evaluate
from carl_assets.leworld.models import component_configs
from carl_assets.leworld.sizes import ArchitectureSettings
from carl_assets.leworld.training import LeWorldTrainingSettings, TrainingConfig, training_config
from carl_assets.plotting import line_plot
from carl_assets.storage import content_hash

PHASE_LOSS = {1: ("slm_loss", "blm_loss"), 2: ("total_loss",),
              3: ("loss_with_info", "loss_without_info", "next_state_loss_with_info")}
REPLICATES_DIR, REPLICATES_FILE = "replicates", "replicates.json"


class LeWorldModelConfig(dg.Config, LeWorldTrainingSettings, ArchitectureSettings):
    """leworld_model: the three training phases (`LeWorldTrainingSettings`), the architecture's sizes
    (`ArchitectureSettings`), each defined once in the library, and the replicates over seeds."""

    seeds: int = Field(default=3, description="replicates per variant, seeds seed..seed+seeds-1, for the "
                       "memory verdict (1: only the primary model)")
    train_without_memory: bool = Field(
        default=True,
        description="also train the same architecture with memory reads off (the fair no-memory baseline), "
        "once per seed",
    )


class LeWorldEvaluationConfig(dg.Config, EvaluationSettings):
    """leworld_evaluation: the rollout horizon (defined once, in `carl_assets.leworld.evaluation`)."""


def _loss_series(metrics: pd.DataFrame, names: list[tuple[int | None, str]], offsets: dict[int, int]
                 ) -> dict[str, tuple[list[float], list[float]]]:
    """(running epoch, value) per named metric, of one phase or (None) of every phase."""
    out = {}
    for phase, name in names:
        rows = metrics[(metrics["metric"] == name) & ((metrics["phase"] == phase) if phase else True)]
        if len(rows):
            label = f"phase {phase} {name}" if phase else name
            epochs = [e + offsets[p] for p, e in zip(rows["phase"], rows["epoch"], strict=True)]
            out[label] = (epochs, rows["value"].tolist())
    return out


def loss_plots(metrics: pd.DataFrame) -> dict[str, bytes]:
    """Each phase's losses against a running epoch count, phase boundaries marked: the prediction
    losses (MSE scale) in one plot, phase 1's address cross-entropy in another."""
    offsets, boundaries = {}, {}
    start = 0
    for phase in sorted(metrics["phase"].unique()):
        offsets[phase] = start
        start += int(metrics.loc[metrics["phase"] == phase, "epoch"].max())
        boundaries[f"end of phase {phase}"] = start + 0.5
    prediction = [(p, n) for p, names in PHASE_LOSS.items() for n in names if n != "slm_loss"]
    prediction.append((None, "val_one_step_mse"))
    return {
        "loss_plot": line_plot(_loss_series(metrics, prediction, offsets),
                               "LeWorld prediction losses per phase and epoch", "epoch (all phases)", "MSE",
                               vlines=boundaries),
        "slm_loss_plot": line_plot(_loss_series(metrics, [(1, "slm_loss")], offsets),
                                   "Phase 1: SLM address cross-entropy", "epoch", "cross-entropy"),
    }


def replicate_dir(variant: str, seed: int) -> str:
    """Where a replicate is saved inside a leworld_model version, e.g. 'replicates/no_memory_seed1'."""
    return f"{REPLICATES_DIR}/{variant}_seed{seed}"


def _system_factory(config: LeWorldModelConfig, bits: torch.Tensor, state_dim: int, char_dim: int
                    ) -> Callable[[int, bool], LeWorldSystem]:
    """make_system(seed, memory_reads): a freshly initialised system holding the memory's bits."""
    configs = component_configs(library_config(config, ArchitectureSettings), bits.shape[0], bits.shape[1],
                                state_dim, char_dim)

    def make_system(seed: int, memory_reads: bool) -> LeWorldSystem:
        torch.manual_seed(seed)  # parameter initialisation
        system = LeWorldSystem(*configs, memory_reads=memory_reads)
        with torch.no_grad():
            system.memory.memory.copy_(bits)
        return system

    return make_system


def _check_model_config(config: LeWorldModelConfig) -> None:
    if config.seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {config.seeds}")


def _memory_of_dataset(leworld_dataset: AssetHandle, leworld_memory: AssetHandle) -> torch.Tensor:
    """The memory's bits, refused when the dataset's dynamics were computed from another memory."""
    bits = load_memory_bits(leworld_memory)
    recorded = json.loads(leworld_dataset.file(DATASET_FILE).read_text()).get("memory_hash")
    if recorded != content_hash(bits):
        raise ValueError("leworld_memory changed after leworld_dataset was generated: materialize "
                         "leworld_dataset again")
    return bits


def _save_model(artifacts: ArtifactStore, replicates: list[Replicate], training: TrainingConfig,
                seconds: float) -> Path:
    """The primary system at the top of a new leworld_model version, every replicate under replicates/
    with a manifest; returns the version's folder. The training time is the run's, not the model's: it is
    recorded in the version's `_version.json` (`train_seconds`), which the data version leaves out."""
    with artifacts.write_version("leworld_model") as (tmp, version):
        save_system(replicates[0].system, tmp, extra={"training": training.record(), "variant": "memory"})
        for rep in replicates:
            save_system(rep.system, tmp / replicate_dir(rep.variant, rep.seed),
                        extra={"variant": rep.variant, "seed": rep.seed})
        manifest = [{"variant": r.variant, "seed": r.seed, "path": replicate_dir(r.variant, r.seed)}
                    for r in replicates]
        (tmp / REPLICATES_FILE).write_text(json.dumps(manifest, indent=2))
    artifacts.record("leworld_model", version, train_seconds=round(seconds, 2))
    return artifacts.path("leworld_model", version)


MODEL_SOUND = dg.AssetCheckSpec("leworld_model_is_sound", asset="leworld_model", blocking=True,
                                description="Every logged metric is finite and the checkpoint reloads.")


def model_sound(metrics: pd.DataFrame, folder: Path) -> dg.AssetCheckResult:
    """The model check: every value of `metrics` finite, and the saved primary system reloads with
    parameters."""
    finite = bool(np.isfinite(metrics["value"].to_numpy()).all())
    params = count_params(load_system(folder))
    return dg.AssetCheckResult(check_name=MODEL_SOUND.name, passed=finite and params > 0,
                               metadata={"finite_metrics": finite, "parameters": params})


@dg.asset(
    pool=TRAINING_POOL,
    group_name=GROUP,
    kinds={"pytorch", "safetensors", "duckdb"},
    check_specs=[MODEL_SOUND],
    description="The LeWorld system trained in the reference's three phases (pre-training apart, end to end, "
    "info-request refinement), and for the memory verdict the same architecture trained with and without "
    "memory reads over several seeds; the primary checkpoint (with memory, the first seed) as safetensors + "
    "config.json at the top, every replicate under replicates/, per-epoch metrics in `leworld_metrics`.",
)
def leworld_model(context: dg.AssetExecutionContext, config: LeWorldModelConfig, leworld_dataset: AssetHandle,
                  leworld_memory: AssetHandle, artifacts: ArtifactStore, duckdb: DuckDBResource
                  ) -> dg.MaterializeResult:
    _check_model_config(config)
    bits = _memory_of_dataset(leworld_dataset, leworld_memory)
    train, validation = (load_split(leworld_dataset, split) for split in SPLITS)
    make_system = _system_factory(config, bits, train.states.shape[2], train.characteristics.shape[1])
    training = training_config(library_config(config, LeWorldTrainingSettings), train)
    seeds = [config.seed + k for k in range(config.seeds)]
    variants = VARIANTS if config.train_without_memory else ("memory",)
    started = time.perf_counter()
    replicates = train_replicates(make_system, train, validation, training, seeds, variants,
                                  log=context.log.info)
    seconds = time.perf_counter() - started
    primary = replicates[0]  # memory, first seed: the model downstream users load
    folder = _save_model(artifacts, replicates, training, seconds)
    metrics = pd.concat([r.metrics.assign(variant=r.variant, seed=r.seed) for r in replicates],
                        ignore_index=True)
    write_tables(duckdb, {"leworld_metrics": metrics})
    last = primary.metrics.groupby(["phase", "metric"])["value"].last()
    final = {f"phase{p}_{m}": float(v) for (p, m), v in last.items()
             if m in PHASE_LOSS.get(p, ()) or m == "val_one_step_mse"}
    return materialized(folder, config=config, check_results=[model_sound(metrics, folder)], metadata={
        "parameters": count_params(primary.system), "train_seconds": round(seconds, 2),
        "replicates": len(replicates), "seeds": seeds, "variants": list(variants), **final,
        "path": str(folder), "metrics_rows": len(metrics),
    }, plots=loss_plots(primary.metrics))


def load_replicates(leworld_model: AssetHandle) -> list[Replicate]:
    """Every replicate a leworld_model version saved (manifest order: the primary first)."""
    manifest = json.loads(leworld_model.file(REPLICATES_FILE).read_text())
    return [Replicate(m["variant"], int(m["seed"]), load_system(leworld_model.file(m["path"])))
            for m in manifest]


def _verdict(per_seed: pd.DataFrame) -> tuple[str, dict[str, object], pd.DataFrame | None]:
    """The memory verdict over seeds (sentence, metadata, table), or why there is none."""
    if set(per_seed["variant"]) != set(VARIANTS):
        verdict = ("undetermined: leworld_model was trained without the no-memory baseline "
                   "(train_without_memory=false)")
        return verdict, {"memory_verdict": verdict, "memory_helps": False}, None
    verdicts = memory_verdict(per_seed)
    by_metric = verdicts.set_index("metric", drop=False)
    headline = by_metric.loc["mse"]
    verdict = verdict_sentence(headline)
    return verdict, {
        "memory_verdict": verdict,
        "memory_verdict_one_step": verdict_sentence(by_metric.loc["one_step_mse"]),
        "memory_helps": bool(headline["verdict"] == "memory helps"),
        "with_memory_mse_mean": float(headline["memory_mean"]),
        "with_memory_mse_std": float(headline["memory_std"]),
        "without_memory_mse_mean": float(headline["no_memory_mean"]),
        "without_memory_mse_std": float(headline["no_memory_std"]),
        "memory_gap": float(headline["gap"]), "twice_spread": float(headline["twice_spread"]),
        "verdict_seeds": int(headline["seeds"]), "verdict_table": table_preview(verdicts),
    }, verdicts


BEATS_PERSISTENCE = dg.AssetCheckSpec(
    "leworld_beats_persistence", asset="leworld_evaluation",
    description="The trained system beats predicting the current state on validation MSE.")


def beats_persistence(summary: pd.DataFrame) -> dg.AssetCheckResult:
    """The evaluation check: the `leworld` row's MSE below the `persistence` row's."""
    by_system = summary.set_index("system")
    model, baseline = float(by_system.loc["leworld", "mse"]), float(by_system.loc["persistence", "mse"])
    return dg.AssetCheckResult(check_name=BEATS_PERSISTENCE.name, passed=model < baseline,
                               metadata={"leworld_mse": model, "persistence_mse": baseline})


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "duckdb"},
    check_specs=[BEATS_PERSISTENCE],
    description="Validation MSE/MAE (rollout from the first state, per horizon and one-step), routing "
    "entropy and SLM usage of the trained system against predicting the current state, the same system with "
    "its memory reads zeroed, the same architecture trained without memory reads, and (reference) reads of "
    "the true relevant regions; the memory verdict over seeds (mean ± std with memory vs trained without, "
    "the gap, twice the spread). Tables `leworld_evaluation`, `leworld_evaluation_steps`, "
    "`leworld_evaluation_seeds`, `leworld_memory_verdict`.",
)
def leworld_evaluation(context: dg.AssetExecutionContext, config: LeWorldEvaluationConfig,
                       leworld_model: AssetHandle, leworld_dataset: AssetHandle, duckdb: DuckDBResource
                       ) -> dg.MaterializeResult:
    system = load_system(leworld_model.file())
    validation = load_split(leworld_dataset, "validation")
    replicates = load_replicates(leworld_model)
    # The fair baseline beside the primary model: the no-memory replicate of the same seed.
    same_seed = [r.system for r in replicates if r.variant == "no_memory" and r.seed == replicates[0].seed]
    baseline = {"trained_without_memory": same_seed[0]} if same_seed else {}
    result = evaluate(system, validation, n_steps=config.n_steps, trained_baselines=baseline)
    per_seed = evaluate_replicates(replicates, validation, config.n_steps)
    verdict, verdict_meta, verdicts = _verdict(per_seed)
    m = result.metrics
    gain = 100 * (m["memory_ablated_mse"] - m["mse"]) / m["memory_ablated_mse"]
    zeroed = (
        f"zeroing the trained system's reads at test time: rollout MSE {m['mse']:.4f} -> "
        f"{m['memory_ablated_mse']:.4f} ({gain:+.1f}%, not a fair baseline); reading the true relevant "
        f"regions instead: {m['oracle_reads_mse']:.4f}"
    )
    write_tables(duckdb, {"leworld_evaluation": result.summary, "leworld_evaluation_steps": result.steps,
                          "leworld_evaluation_seeds": per_seed,
                          **({"leworld_memory_verdict": verdicts} if verdicts is not None else {})})
    context.log.info(verdict)
    context.log.info(zeroed)
    by_system = result.steps.groupby("system")
    plot = line_plot({name: (g["step"].tolist(), g["mse"].tolist()) for name, g in by_system},
                     "Validation MSE per rollout step", "step (horizon)", "MSE")
    checks = [beats_persistence(result.summary)]
    return materialized(result.summary, per_seed, config=config, check_results=checks, metadata={
        **{key: m[key] for key in ("mse", "mae", "one_step_mse", "persistence_mse", "memory_ablated_mse",
                                   "oracle_reads_mse", "beats_persistence", "beats_memory_ablated")},
        **verdict_meta, "memory_zeroed_at_test": zeroed,
        "routing_entropy": m["routing_entropy"], "slm_usage": m["slm_usage"],
        "summary": table_preview(result.summary), "per_seed": table_preview(per_seed, rows=20),
    }, plots={"step_mse_plot": plot})
