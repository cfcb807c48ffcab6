"""Evaluation of a trained LeWorld system against two baselines, so that the value of memory shows.

Systems compared on the same sequences:
- `leworld`: the trained system.
- `persistence`: predict the current state (in a rollout: the last known state, states[:, 0]).
- `memory_ablated`: the same trained system with every memory read's encoding zeroed.
- `oracle_reads`: the same trained system, its SLM i reading the dataset's relevant region i instead of
  its own choice: a reference for what memory could add if the SLMs found the right regions.
- any `trained_baselines` given (e.g. `trained_without_memory`: the same architecture trained with
  `memory_reads=False`, the fair test of memory; see `carl_assets.leworld.comparison`).

Metrics, as in the reference's `Evaluator.prediction_accuracy`: `mse`/`mae` of an `n_steps` rollout from the
first state (errors at horizons 1..n_steps), `step_mses` per horizon, routing entropy of the mean SLM usage
and the usage per SLM; plus `one_step_mse`, the teacher-forced error over every step of the sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field

from carl_assets.leworld.architecture import LeWorldSystem
from carl_assets.leworld.data import SequenceBatch, iterate_batches
from carl_assets.runtime import torch_threads
from carl_assets.settings import Settings

SYSTEMS = ("leworld", "persistence", "memory_ablated", "oracle_reads")


class EvaluationSettings(Settings):
    """The evaluation's setting a user picks (the leworld_evaluation asset's config inherits this class);
    the functions below take `n_steps` with its default, `HORIZON`."""

    n_steps: int = Field(default=5, description="rollout horizon, as in the reference's evaluator")


HORIZON = EvaluationSettings().n_steps


@dataclass
class EvaluationResult:
    summary: pd.DataFrame  # one row per system
    steps: pd.DataFrame  # system, step (horizon), mse
    metrics: dict[str, Any] = field(default_factory=dict)  # the trained system's reference-style metrics


def evaluate(
    system: LeWorldSystem,
    data: SequenceBatch,
    n_steps: int = HORIZON,
    batch_size: int = 256,
    num_threads: int | None = 1,
    trained_baselines: dict[str, LeWorldSystem] | None = None,
) -> EvaluationResult:
    """The table of module docstring's systems (in that order, then `trained_baselines`' names)."""
    clash = set(trained_baselines or {}) & set(SYSTEMS)
    if clash:
        raise ValueError(f"trained_baselines may not reuse the built-in system names {sorted(clash)}")
    with torch_threads(num_threads), torch.no_grad():
        return _evaluate(system, data, n_steps, batch_size, trained_baselines or {})


def _evaluate(
    system: LeWorldSystem,
    data: SequenceBatch,
    n_steps: int,
    batch_size: int,
    baselines: dict[str, LeWorldSystem],
) -> EvaluationResult:
    """`evaluate` inside its thread limit and no-grad: errors, then the summary table, then the metrics."""
    horizon = min(n_steps, data.states.shape[1] - 1)
    rollouts, one_step, all_masks = _builtin_errors(system, data, horizon, batch_size)
    usage = all_masks.mean(dim=(0, 1))
    routing_entropy = float(-(usage * torch.log(usage + 1e-8)).sum()) + 0.0  # + 0.0: no "-0.0"
    for name, other in baselines.items():
        rollouts[name], one_step[name] = _errors(other, data, horizon, batch_size)
    summary, step_rows = _summary(rollouts, one_step, usage, routing_entropy)
    metrics = _metrics(summary, step_rows, usage, routing_entropy, baselines)
    return EvaluationResult(summary=summary, steps=pd.DataFrame(step_rows), metrics=metrics)


def _builtin_errors(
    system: LeWorldSystem, data: SequenceBatch, horizon: int, batch_size: int
) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]], torch.Tensor]:
    """Per-batch rollout and teacher-forced errors of the `SYSTEMS`, and the routing masks
    `[N, horizon, n_slms]`."""
    was_training = system.training
    system.eval()
    rollouts: dict[str, list[torch.Tensor]] = {name: [] for name in SYSTEMS}
    one_step: dict[str, list[torch.Tensor]] = {name: [] for name in SYSTEMS}
    masks = []
    for batch in iterate_batches(data, batch_size, shuffle=False):
        states, chars = batch["states"], batch["characteristics"]
        out = system.multi_step_forward(states, chars, horizon, rollout=True)
        ablated = system.multi_step_forward(states, chars, horizon, rollout=True, ablate_memory=True)
        truth = states[:, 1 : horizon + 1]
        rollouts["leworld"].append(out["predictions"] - truth)
        rollouts["memory_ablated"].append(ablated["predictions"] - truth)
        rollouts["persistence"].append(states[:, :1].expand_as(truth) - truth)
        masks.append(out["masks"])
        oracle = (batch["relevant_starts"], batch["relevant_ends"])
        rollouts["oracle_reads"].append(
            system.multi_step_forward(states, chars, horizon, rollout=True, oracle=oracle)["predictions"]
            - truth
        )
        for name, kwargs in (
            ("leworld", {}),
            ("memory_ablated", {"ablate_memory": True}),
            ("oracle_reads", {"oracle": oracle}),
        ):
            one_step[name].append(
                system.multi_step_forward(states, chars, **kwargs)["predictions"] - states[:, 1:]
            )
        one_step["persistence"].append(states[:, :-1] - states[:, 1:])
    system.train(was_training)
    return rollouts, one_step, torch.cat(masks)


def _summary(
    rollouts: dict[str, list[torch.Tensor]],
    one_step: dict[str, list[torch.Tensor]],
    usage: torch.Tensor,
    routing_entropy: float,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """One row per system (errors, routing for the trained one, whether it beats each) and one per
    (system, step)."""
    rows, step_rows = [], []
    for name in rollouts:
        err = torch.cat(rollouts[name])
        step_mse = err.pow(2).mean(dim=(0, 2))
        rows.append(
            {
                "system": name,
                "mse": float(err.pow(2).mean()),
                "mae": float(err.abs().mean()),
                "one_step_mse": float(torch.cat(one_step[name]).pow(2).mean()),
            }
        )
        step_rows += [{"system": name, "step": t + 1, "mse": float(v)} for t, v in enumerate(step_mse)]
    summary = pd.DataFrame(rows)
    model = summary.set_index("system").loc["leworld"]
    summary["routing_entropy"] = [
        routing_entropy if s == "leworld" else float("nan") for s in summary["system"]
    ]
    summary["slm_usage"] = [
        ",".join(f"{u:.4f}" for u in usage.tolist()) if s == "leworld" else "" for s in summary["system"]
    ]
    # Whether the trained system beats each system (honest for both baselines; False for itself).
    summary["leworld_beats"] = [bool(model["mse"] < r) for r in summary["mse"]]
    summary["leworld_beats_one_step"] = [bool(model["one_step_mse"] < r) for r in summary["one_step_mse"]]
    return summary, step_rows


def _metrics(
    summary: pd.DataFrame,
    step_rows: list[dict[str, Any]],
    usage: torch.Tensor,
    routing_entropy: float,
    baselines: dict[str, LeWorldSystem],
) -> dict[str, Any]:
    """The trained system's reference-style metrics, and how it compares with each baseline."""
    by = summary.set_index("system")
    model = by.loc["leworld"]
    metrics = {
        "mse": float(model["mse"]),
        "mae": float(model["mae"]),
        "one_step_mse": float(model["one_step_mse"]),
        "step_mses": [r["mse"] for r in step_rows if r["system"] == "leworld"],
        "routing_entropy": routing_entropy,
        "slm_usage": usage.tolist(),
        "persistence_mse": float(by.loc["persistence", "mse"]),
        "memory_ablated_mse": float(by.loc["memory_ablated", "mse"]),
        "oracle_reads_mse": float(by.loc["oracle_reads", "mse"]),
        "beats_persistence": bool(by.loc["persistence", "leworld_beats"]),
        "beats_memory_ablated": bool(by.loc["memory_ablated", "leworld_beats"]),
        "beats_memory_ablated_one_step": bool(by.loc["memory_ablated", "leworld_beats_one_step"]),
    }
    for name in baselines:
        metrics[f"{name}_mse"] = float(by.loc[name, "mse"])
        metrics[f"beats_{name}"] = bool(by.loc[name, "leworld_beats"])
    return metrics


def _errors(
    system: LeWorldSystem, data: SequenceBatch, horizon: int, batch_size: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-batch prediction errors of a system: rollout (horizons 1..horizon) and teacher-forced."""
    was_training = system.training
    system.eval()
    rollout, one_step = [], []
    for batch in iterate_batches(data, batch_size, shuffle=False):
        states, chars = batch["states"], batch["characteristics"]
        rollout.append(
            system.multi_step_forward(states, chars, horizon, rollout=True)["predictions"]
            - states[:, 1 : horizon + 1]
        )
        one_step.append(system.multi_step_forward(states, chars)["predictions"] - states[:, 1:])
    system.train(was_training)
    return rollout, one_step


def model_errors(
    system: LeWorldSystem,
    data: SequenceBatch,
    n_steps: int = HORIZON,
    batch_size: int = 256,
    num_threads: int | None = 1,
) -> dict[str, float]:
    """The trained system's own errors only (the `leworld` row of `evaluate`, without its baselines):
    rollout `mse`/`mae` over horizons 1..n_steps and teacher-forced `one_step_mse`."""
    with torch_threads(num_threads), torch.no_grad():
        rollout, one_step = _errors(system, data, min(n_steps, data.states.shape[1] - 1), batch_size)
    err = torch.cat(rollout)
    return {
        "mse": float(err.pow(2).mean()),
        "mae": float(err.abs().mean()),
        "one_step_mse": float(torch.cat(one_step).pow(2).mean()),
    }


class Evaluator:
    """The reference's evaluator: metrics averaged over a DataLoader's batches, the prediction an `n_steps`
    rollout from each sequence's first state."""

    @staticmethod
    def prediction_accuracy(system: LeWorldSystem, dataloader: Any, n_steps: int = HORIZON) -> dict[str, Any]:
        was_training = system.training
        system.eval()
        total_mse = total_mae = 0.0
        step_mses = [0.0] * n_steps
        masks, n_batches = [], 0
        with torch.no_grad():
            for batch in dataloader:
                states, chars = batch["states"], batch["characteristics"]
                out = system.multi_step_forward(states, chars, n_steps, rollout=True)
                pred, truth = out["predictions"], states[:, 1 : n_steps + 1]
                steps = min(n_steps, pred.shape[1])
                total_mse += F.mse_loss(pred[:, :steps], truth[:, :steps]).item()
                total_mae += F.l1_loss(pred[:, :steps], truth[:, :steps]).item()
                for t in range(steps):
                    step_mses[t] += F.mse_loss(pred[:, t], truth[:, t]).item()
                masks.append(out["masks"])
                n_batches += 1
        system.train(was_training)
        usage = torch.cat(masks).mean(dim=(0, 1))
        return {
            "mse": total_mse / max(1, n_batches),
            "mae": total_mae / max(1, n_batches),
            "step_mses": [m / max(1, n_batches) for m in step_mses],
            "routing_entropy": -(usage * torch.log(usage + 1e-8)).sum().item() + 0.0,
            "slm_usage": usage.tolist(),
        }
