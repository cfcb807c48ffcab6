"""agent_evaluation: the coherence-gated agent step on held-out memory tasks for the SFT and GRPO
checkpoints, and the amygdala readout of each turn."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
from dagster_duckdb import DuckDBResource

from carl_assets.carl.agent import evaluate_agent, summarise_evaluation
from carl_assets.defs.common import materialized, table_preview
from carl_assets.defs.resources import write_tables
from carl_assets.defs.training_config import AgentEvaluationConfig
from carl_assets.handles import Checkpoint, DatasetVersion, Readout
from carl_assets.models.defaults import resolve_placement, resolve_threads
from carl_assets.models.loading import load_model_and_tokenizer
from carl_assets.plotting import figure_png, line_plot, plt
from carl_assets.runtime import torch_threads
from carl_assets.steering import SteeringVectors, load_readout
from carl_assets.steering.readout import SERVING_READ, readout_projections, readout_skipped

READOUT_TABLE_COLUMNS = ["checkpoint", "task_id", "emotion", "layer", "projection"]
SHORT_NAMES = {"sft_checkpoint": "sft", "grpo_checkpoint": "grpo"}


def readout_table(
    vectors: SteeringVectors,
    checkpoints: Mapping[str, Path],
    results: pd.DataFrame,
    tasks: pd.DataFrame,
    placement: tuple[Any, Any] = (None, None),
) -> tuple[pd.DataFrame, str]:
    """The amygdala readout of each agent turn (prompt and response, as served), per checkpoint (name ->
    folder), task, emotion and readout layer: what a vLLM readout would report while the agent answers.
    With a skipped (empty) readout: no rows, and the reason it was skipped."""
    if readout_skipped(vectors):
        return pd.DataFrame(
            columns=READOUT_TABLE_COLUMNS
        ), f"steering_vectors was skipped: {readout_skipped(vectors)}"
    observation = dict(zip(tasks["task_id"], tasks["observation"], strict=True))
    frames = []
    for name, part in results.groupby("checkpoint", sort=False):
        model, tokenizer = load_model_and_tokenizer(
            checkpoints[str(name)], device=placement[0], dtype=placement[1]
        )
        texts = [
            f"{observation.get(t, '')}\n\n{i}\n{r}"
            for t, i, r in zip(part["task_id"], part["instruction"], part["raw_response"], strict=True)
        ]
        projections = readout_projections(model, tokenizer, texts, vectors, SERVING_READ)
        projections["checkpoint"] = name
        projections["task_id"] = part["task_id"].to_numpy()[projections["text_index"].to_numpy()]
        frames.append(projections.drop(columns=["text_index"]))
    return pd.concat(frames, ignore_index=True)[READOUT_TABLE_COLUMNS], ""


def readout_heatmap(readout: pd.DataFrame) -> bytes:
    """Mean projection per emotion (rows) for each checkpoint (columns) at the deepest readout layer."""
    deepest = readout[readout["layer"] == readout["layer"].max()]
    grid = deepest.pivot_table(index="emotion", columns="checkpoint", values="projection", aggfunc="mean")
    fig, ax = plt.subplots(figsize=(4.2, 0.6 + 0.3 * len(grid)))
    bound = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
    image = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), list(grid.columns))
    ax.set_yticks(range(grid.shape[0]), list(grid.index))
    ax.set_title(f"readout: mean projection, layer {int(deepest['layer'].max())}")
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    return figure_png(fig)


def evaluate_checkpoints(
    context: dg.AssetExecutionContext,
    checkpoints: Mapping[str, Path],
    tasks: pd.DataFrame,
    config: AgentEvaluationConfig,
    placement: tuple[Any, Any],
    offline: bool,
) -> tuple[list[pd.DataFrame], list[dict[str, Any]]]:
    """(one evaluation table per checkpoint, tagged with its name; one summary per checkpoint)."""
    frames, summaries = [], []
    for name, folder in checkpoints.items():
        model, tokenizer = load_model_and_tokenizer(folder, device=placement[0], dtype=placement[1])
        evaluation = evaluate_agent(
            model,
            tokenizer,
            tasks,
            gate_threshold=config.gate_threshold,
            max_new_tokens=config.max_new_tokens,
            sampling=config.sampling(offline),
        )
        evaluation.insert(0, "checkpoint", name)
        frames.append(evaluation)
        summaries.append({"checkpoint": name, **summarise_evaluation(evaluation)})
        context.log.info(f"{name}: {summaries[-1]}")
    return frames, summaries


def held_out_tasks(dataset: DatasetVersion, config: AgentEvaluationConfig) -> pd.DataFrame:
    """sft_dataset's `agent_tasks` (at most max_tasks). Raises ValueError when there are none."""
    tasks = dataset.read("agent_tasks")
    if config.max_tasks:
        tasks = tasks.head(config.max_tasks)
    if tasks.empty:
        raise ValueError("agent_tasks is empty: give sft_dataset some holdout_tasks")
    return tasks


def _metadata(
    tasks: pd.DataFrame,
    results: pd.DataFrame,
    summaries: list[dict[str, Any]],
    readout: pd.DataFrame,
    skipped: str,
    placement: tuple[Any, Any],
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "tasks": len(tasks),
        "summary": table_preview(pd.DataFrame(summaries)),
        "preview": table_preview(
            results[["checkpoint", "instruction", "expected", "response", "confidence", "phi_mean", "reward"]]
        ),
    }
    for summary in summaries:
        short = SHORT_NAMES[summary["checkpoint"]]
        for key in ("act_rate", "mean_reward", "mean_phi", "exact_match_rate"):
            metadata[f"{short}_{key}"] = summary[key]
    metadata["readout_rows"] = len(readout)
    if skipped:
        metadata["readout_skipped_reason"] = skipped
    metadata.update({"device": str(placement[0]), "dtype": str(placement[1]).removeprefix("torch.")})
    return metadata


@dg.asset(
    group_name="evaluation",
    ins={
        "grpo_checkpoint": dg.AssetIn(),
        "sft_checkpoint": dg.AssetIn(),
        "sft_dataset": dg.AssetIn(),
        "steering_vectors": dg.AssetIn(),
        "base_model": dg.AssetIn(),
    },
    kinds={"duckdb"},
    description="The reference's coherence-gated agent step on held-out memory tasks, for the SFT and GRPO "
    "checkpoints: response or abstain, phi mean, confidence, CARL reward; and the amygdala readout of each "
    "turn (residual stream projected on the steering vectors, as a vLLM readout does when serving). DuckDB "
    "`agent_evaluation` (one row per task and checkpoint), `agent_evaluation_summary` (act rate, mean "
    "reward) and `agent_readout` (per checkpoint, task, emotion and layer).",
)
def agent_evaluation(
    context: dg.AssetExecutionContext,
    config: AgentEvaluationConfig,
    duckdb: DuckDBResource,
    grpo_checkpoint: Checkpoint,
    sft_checkpoint: Checkpoint,
    sft_dataset: DatasetVersion,
    steering_vectors: Readout,
    base_model: Checkpoint,
) -> dg.MaterializeResult:
    tasks = held_out_tasks(sft_dataset, config)
    offline = base_model.is_offline
    placement = resolve_placement(config.device, config.dtype, offline)
    checkpoints = {"sft_checkpoint": sft_checkpoint.file(), "grpo_checkpoint": grpo_checkpoint.file()}
    with torch_threads(resolve_threads(config.threads, offline)):
        frames, summaries = evaluate_checkpoints(context, checkpoints, tasks, config, placement, offline)
        results = pd.concat(frames, ignore_index=True)
        readout, skipped = readout_table(
            load_readout(steering_vectors.file()), checkpoints, results, tasks, placement
        )
    if skipped:
        context.log.warning(f"agent readout skipped: {skipped}")
    tables = {
        "agent_evaluation": results,
        "agent_evaluation_summary": pd.DataFrame(summaries),
        "agent_readout": readout,
    }
    write_tables(duckdb, tables)
    plot = line_plot(
        {SHORT_NAMES[str(f["checkpoint"].iloc[0])]: (list(range(len(f))), f["phi_mean"]) for f in frames},
        title="agent: phi mean per held-out task",
        xlabel="task",
        ylabel="phi mean",
        hlines={f"gate threshold {config.gate_threshold:.4f}": config.gate_threshold},
    )
    plots = {"phi_per_task": plot, **({"readout_heatmap": readout_heatmap(readout)} if len(readout) else {})}
    return materialized(
        results.drop(columns=["raw_response"]),
        readout,
        config=config,
        tables=tables,
        plots=plots,
        metadata=_metadata(tasks, results, summaries, readout, skipped, placement),
    )
