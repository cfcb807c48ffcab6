"""crystallization_events: one row per SFT run (appended across runs) and its per-step training log; the
blocking sft_crystallized check holds GRPO back when SFT never crystallized."""

import json
from typing import Any

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource

from carl_assets.carl.training import TRAINING_LOG_FILE
from carl_assets.defs.checkpoints import accuracy_plot
from carl_assets.defs.common import materialized, table_preview
from carl_assets.defs.pools import LEDGER_POOL
from carl_assets.defs.resources import append_rows
from carl_assets.defs.training_config import CrystallizationConfig
from carl_assets.handles import Checkpoint

STEP_COLUMNS = [
    "run_id",
    "step",
    "loss",
    "mean_token_accuracy",
    "entropy",
    "learning_rate",
    "grad_norm",
    "num_tokens",
]
# The event's columns that name the SFT run, not what it did: its run id, its version folder (time + run
# id), the start's version folder, when it finished and how long it took. The table shows them; the data
# version leaves them out (of the start, only which asset it was), so an identical rerun is not new.
RUN_COLUMNS = ["run_id", "checkpoint_version", "started_from", "finished_at", "train_seconds"]


def started_from_asset(started_from: str) -> str:
    """The asset of a start named '<asset>@<version>' (a start outside the store is kept whole)."""
    return started_from.split("@", 1)[0]


def event_row(log: dict[str, Any]) -> pd.DataFrame:
    """The `crystallization_events` row of one SFT run, from its training log."""
    return pd.DataFrame(
        [
            {
                "run_id": str(log.get("run_id") or "unknown"),
                "checkpoint_version": str(log.get("version", "")),
                "started_from": str(log.get("started_from", "")),
                "dream_cycle": log.get("dream_cycle"),
                "finished_at": str(log.get("finished_at", "")),
                "triggered": bool(log["triggered"]),
                "crystallized": bool(log["crystallized"]),
                "trigger_step": int(log["trigger_step"]),
                "window_values": json.dumps([float(v) for v in log["window_values"]]),
                "peak_entropy": float(log["peak_entropy"]),
                "peak_entropy_step": int(log["peak_entropy_step"]),
                "threshold": float(log["threshold"]),
                "max_steps": int(log["max_steps"]),
                "steps": int(log["steps"]),
                "final_accuracy": log.get("final_accuracy"),
                "train_seconds": float(log["seconds"]),
            }
        ]
    )


def step_rows(log: dict[str, Any]) -> pd.DataFrame:
    """The run's `training_log` rows (one per logged step; missing values as NaN)."""
    run_id = str(log.get("run_id") or "unknown")
    steps = pd.DataFrame(
        [
            {"run_id": run_id, "step": int(r["step"]), **{c: r.get(c) for c in STEP_COLUMNS[2:]}}
            for r in log["log_history"]
        ],
        columns=STEP_COLUMNS,
    )
    for column in steps.columns[1:]:
        steps[column] = pd.to_numeric(steps[column], errors="coerce")
    return steps


def crystallized_check(log: dict[str, Any], config: CrystallizationConfig) -> dg.AssetCheckResult:
    """sft_crystallized: passed when the gate fired; else why, and what to change (an error that blocks
    GRPO, or a warning when require_crystallization is off)."""
    crystallized = bool(log["crystallized"])
    final = log.get("final_accuracy")
    why = (
        f"crystallized at step {int(log['trigger_step'])} of {int(log['max_steps'])}"
        if crystallized
        else f"SFT ran {int(log['steps'])} of {int(log['max_steps'])} steps and the gate never fired "
        f"(3 of 5 logged token accuracies >= {float(log['threshold']):.2f}; last accuracy "
        f"{'n/a' if final is None else f'{float(final):.3f}'}): raise sft_checkpoint.max_steps or its "
        "learning rate, or set crystallization_events.require_crystallization: false to let GRPO run anyway"
    )
    return dg.AssetCheckResult(
        check_name="sft_crystallized",
        passed=crystallized,
        description=why,
        severity=dg.AssetCheckSeverity.ERROR
        if config.require_crystallization
        else dg.AssetCheckSeverity.WARN,
        metadata={
            "trigger_step": int(log["trigger_step"]),
            "max_steps": int(log["max_steps"]),
            "checkpoint_version": str(log.get("version", "")),
            "require_crystallization": config.require_crystallization,
        },
    )


@dg.asset(
    group_name="training",
    ins={"sft_checkpoint": dg.AssetIn()},
    kinds={"duckdb"},
    pool=LEDGER_POOL,
    check_specs=[
        dg.AssetCheckSpec(
            "sft_crystallized",
            asset="crystallization_events",
            blocking=True,
            description="SFT crystallized (the gate fired before max steps); blocks GRPO "
            "unless require_crystallization is off",
        )
    ],
    description="One row per SFT run in DuckDB `crystallization_events` (appended across runs: triggered, "
    "trigger step, the gate window's values, peak entropy and its step, threshold, max steps), and the "
    "per-step `training_log` (accuracy, entropy, loss) of each run. Its blocking sft_crystallized check "
    "holds GRPO back when SFT never crystallized.",
)
def crystallization_events(
    context: dg.AssetExecutionContext,
    config: CrystallizationConfig,
    duckdb: DuckDBResource,
    sft_checkpoint: Checkpoint,
) -> dg.MaterializeResult:
    log = json.loads(sft_checkpoint.file(TRAINING_LOG_FILE).read_text())
    event, steps = event_row(log), step_rows(log)
    # Ledgers kept across runs (this asset's own tables): read and written back in one connection.
    events = append_rows(duckdb, "crystallization_events", event, key="run_id")
    training_log = append_rows(duckdb, "training_log", steps, key="run_id")
    context.log.info(f"{len(events)} SFT runs recorded; this one crystallized={log['crystallized']}")
    return materialized(
        event.drop(columns=RUN_COLUMNS),
        started_from_asset(str(event["started_from"].iloc[0])),
        steps.drop(columns=["run_id"]),
        config=config,
        check_results=[crystallized_check(log, config)],
        tables={"crystallization_events": events, "training_log": training_log},
        metadata={
            "runs": len(events),
            "crystallized_runs": int(events["crystallized"].astype(bool).sum()),
            "this_run_crystallized": bool(log["crystallized"]),
            "trigger_step": int(log["trigger_step"]),
            "training_log_rows": len(training_log),
            "events": table_preview(events.tail(10)),
        },
        plots={"accuracy_curve": accuracy_plot(log)},
    )
