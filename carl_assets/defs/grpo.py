"""grpo_checkpoint: TRL's GRPOTrainer from the SFT checkpoint on the prompts held out of SFT, with the
model's reward (CARL for the offline model); the policy the next dream cycle starts from."""

import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource
from datasets import Dataset, load_from_disk

from carl_assets.carl.training import StepLogger, train_grpo
from carl_assets.defs.checkpoints import (
    record_provenance,
    resume_dir,
    run_metadata,
    say_resuming,
    weights_check,
    weights_check_spec,
    weights_files,
)
from carl_assets.defs.common import config_values, materialized, table_preview
from carl_assets.defs.pools import TRAINING_POOL
from carl_assets.defs.resources import ArtifactStore, write_tables
from carl_assets.defs.training_config import GRPOCheckpointConfig
from carl_assets.handles import Checkpoint, DatasetVersion
from carl_assets.models.loading import load_model_and_tokenizer
from carl_assets.plotting import line_plot

GRPO_COMPLETION_COLUMNS = [
    "step",
    "index",
    "group",
    "completion",
    "reward",
    "multiscale",
    "cloud_quality",
    "discontinuity",
    "phi_mean",
]
GRPO_REWARD_COLUMNS = [
    "step",
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "multiscale",
    "cloud_quality",
    "discontinuity",
    "phi_mean",
    "loss",
    "completion_mean_length",
    "entropy",
]
SPREAD_CHECK = dg.AssetCheckSpec(
    "grpo_reward_spread",
    asset="grpo_checkpoint",
    blocking=True,
    description="GRPO had a signal: the mean over steps of TRL's frac_reward_zero_std (groups whose "
    "completions all scored alike, so their advantages are zero) is below max_frac_reward_zero_std",
)


def grpo_step_table(history: list[dict[str, Any]]) -> pd.DataFrame:
    """One `grpo_rewards` row per logged step that has a reward (TRL's log names, CARL's components)."""
    rows = [
        {
            "step": int(r["step"]),
            "reward": r.get("reward"),
            "reward_std": r.get("reward_std"),
            "frac_reward_zero_std": r.get("frac_reward_zero_std"),
            **{k: r.get(f"carl/{k}") for k in ("multiscale", "cloud_quality", "discontinuity", "phi_mean")},
            "loss": r.get("loss"),
            "completion_mean_length": r.get("completions/mean_length"),
            "entropy": r.get("entropy"),
        }
        for r in history
        if r.get("reward") is not None
    ]
    table = pd.DataFrame(rows, columns=GRPO_REWARD_COLUMNS)
    for column in GRPO_REWARD_COLUMNS[1:]:
        table[column] = pd.to_numeric(table[column], errors="coerce")
    return table


def grpo_prompts(context: dg.AssetExecutionContext, dataset: DatasetVersion) -> Dataset:
    """The prompts sft_dataset held out of SFT; for an external dataset (none held out) its SFT prompts."""
    if dataset.grpo_prompts_dir.exists():
        return load_from_disk(str(dataset.grpo_prompts_dir))
    context.log.warning("sft_dataset has no held-out grpo_prompts: GRPO uses the SFT prompts")
    return load_from_disk(str(dataset.dataset_dir))


def spread_check(steps: pd.DataFrame, outcome: Any, bound: float) -> dg.AssetCheckResult:
    """grpo_reward_spread: the mean share of groups without reward spread is below `bound`."""
    zero_std = float(steps["frac_reward_zero_std"].mean()) if len(steps) else 1.0
    return dg.AssetCheckResult(
        check_name=SPREAD_CHECK.name,
        passed=bool(zero_std < bound),
        metadata={
            "mean_frac_reward_zero_std": zero_std,
            "bound": bound,
            "mean_within_group_reward_std": outcome.mean_step_reward_std,
            "steps": len(steps),
        },
    )


def _metadata(
    path: Path,
    version: str,
    start: str,
    steps: pd.DataFrame,
    completions: pd.DataFrame,
    outcome: Any,
    prompts: int,
    run: Any,
) -> dict[str, Any]:
    return {
        "path": dg.MetadataValue.path(str(path)),
        "version": version,
        "started_from": start,
        "steps": outcome.steps,
        "completions_scored": len(completions),
        "reward_first": float(steps["reward"].iloc[0]) if len(steps) else None,
        "reward_last": float(steps["reward"].iloc[-1]) if len(steps) else None,
        "reward_std": outcome.reward_std,
        "mean_step_reward_std": outcome.mean_step_reward_std,
        "rewards_vary": bool(outcome.reward_std > 0),
        "prompts": prompts,
        "mean_frac_reward_zero_std": float(steps["frac_reward_zero_std"].mean()) if len(steps) else 1.0,
        "resumed_from_step": outcome.resumed_from_step,
        "train_seconds": round(outcome.seconds, 2),
        **run_metadata(run),
        "rewards": table_preview(steps, rows=20),
    }


def _reward_plot(steps: pd.DataFrame) -> bytes:
    return line_plot(
        {
            "mean CARL reward": (steps["step"], steps["reward"]),
            "reward std (within step)": (steps["step"], steps["reward_std"]),
            "phi mean": (steps["step"], steps["phi_mean"]),
        },
        title="GRPO on the CARL reward",
        xlabel="step",
        ylabel="value",
    )


@dg.asset(
    group_name="training",
    ins={"sft_checkpoint": dg.AssetIn(), "sft_dataset": dg.AssetIn(), "base_model": dg.AssetIn()},
    deps=["crystallization_events"],  # ordering only: its blocking sft_crystallized check holds GRPO back
    kinds={"pytorch", "safetensors", "duckdb"},
    pool=TRAINING_POOL,
    check_specs=[SPREAD_CHECK, weights_check_spec("grpo_checkpoint", "before the agent is evaluated")],
    description="TRL GRPOTrainer from the SFT checkpoint with the CARL composite reward (beta=0) on prompts "
    "held out of SFT (sft_dataset's grpo_prompts), once the sft_crystallized check passed; its blocking "
    "grpo_reward_spread check requires within-group reward spread. Each run a new version under "
    "artifacts/grpo_checkpoint (the policy the next dream cycle starts from); per-step reward and CARL "
    "components in DuckDB `grpo_rewards`, every scored completion in `grpo_completions`.",
)
def grpo_checkpoint(
    context: dg.AssetExecutionContext,
    config: GRPOCheckpointConfig,
    duckdb: DuckDBResource,
    artifacts: ArtifactStore,
    sft_checkpoint: Checkpoint,
    sft_dataset: DatasetVersion,
    base_model: Checkpoint,
) -> dg.MaterializeResult:
    device, dtype, weights_dtype = config.placement(base_model.is_offline)
    run = config.run_config(base_model.is_offline, device, dtype)
    model, tokenizer = load_model_and_tokenizer(sft_checkpoint.file(), device=device, dtype=weights_dtype)
    dataset = grpo_prompts(context, sft_dataset)
    start = f"sft_checkpoint@{sft_checkpoint.version}"
    context.log.info(
        f"GRPO from {start} on {len(dataset)} prompts for {run.max_steps} steps, "
        f"{run.num_generations} generations per prompt of {run.max_completion_length} tokens, "
        f"lr {run.learning_rate:.2e}, {run.dtype} on {run.device}"
    )
    parents = {"sft_checkpoint": sft_checkpoint.version, "sft_dataset": sft_dataset.version}
    logger = StepLogger(context.log.info, every=config.log_interval(), max_steps=run.max_steps, label="GRPO")
    resume = resume_dir(artifacts, "grpo_checkpoint", parents, config_values(config))
    say_resuming(context, resume)
    with artifacts.write_version("grpo_checkpoint", run_id=context.run.run_id, parents=parents) as (
        tmp,
        version,
    ):
        outcome = train_grpo(
            model,
            tokenizer,
            dataset,
            tmp,
            run,
            extra_callbacks=[logger],
            checkpoint_dir=resume,
            save_steps=config.checkpoint_every,
        )
        version_files = [p.name for p in weights_files(tmp)]
    shutil.rmtree(resume, ignore_errors=True)
    steps = grpo_step_table(outcome.log_history)
    completions = pd.DataFrame(outcome.completions, columns=GRPO_COMPLETION_COLUMNS)
    tables = {"grpo_rewards": steps, "grpo_completions": completions}
    write_tables(duckdb, tables)
    record_provenance(duckdb, "grpo_checkpoint", version, dataset, parents)
    path = artifacts.path("grpo_checkpoint", version)
    checks = [
        spread_check(steps, outcome, config.max_frac_reward_zero_std),
        weights_check("grpo_checkpoint", path),
    ]
    return materialized(
        version_files,
        *[path / n for n in version_files],
        config=config,
        uri=path,
        check_results=checks,
        tables=tables,
        metadata=_metadata(path, version, start, steps, completions, outcome, len(dataset), run),
        plots={"reward_curve": _reward_plot(steps)},
    )
