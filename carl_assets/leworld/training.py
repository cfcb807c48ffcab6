"""The reference's three training phases, with its losses and optimiser groups.

Phase 1 pre-trains the parts apart: the SLMs by cross-entropy on the high byte, low byte and range of
the known relevant regions (SLM i → region i); the BLM (with the memory encoder) by next-state MSE from
oracle reads of those regions. Phase 2 trains everything end to end on `multi_step_forward`'s total loss
(AdamW over all parameters, cosine warm restarts, router temperature annealed every step). Phase 3 is the
paired-branch refinement with the reference's four learning-rate groups: branch A runs with the info-request
loop, branch B without it, and the improvement of A over B is the information utility.

The reference's utility term, loss_A − λ·(loss_B − loss_A).detach(), has no gradient: it shifts the loss
by a constant and trains nothing (`info_utility="reference"`, kept as a documented option). The default
(`info_utility="reinforce"`) gives it one: branch A *samples* each step's decision to send the info query
(the BLM's `info_gate`, a Bernoulli policy), each sequence's improvement (its MSE without the loop minus
its MSE with the sampled decisions) is the reward, and the term is REINFORCE with a batch-mean baseline,

    L_info = −λ · mean_i( Â_i · Σ_t log π(a_{i,t}) ),   Â = (r − mean r) / (std r + ε),

so decisions that beat the batch's average improvement become more likely. The reward is detached (the
prediction weights learn only from loss_A); standardising it keeps the term's scale independent of how
small MSE differences are.

A system built with `memory_reads=False` trains with the same steps (phase 1's BLM sees zero oracle
reads): the trained no-memory baseline.

Differences from the reference, all about speed or bookkeeping: batches are index slices of tensors instead of
a per-item DataLoader; phase 1's BLM step runs all time steps as one batch (the same mean of per-step
MSEs); branch B of phase 3 runs without a graph (its loss is only used detached); the phase-2 scheduler
is stepped (fractional epochs), which the reference set up but never called.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import optim

from carl_assets.leworld.architecture import LeWorldSystem
from carl_assets.leworld.data import SequenceBatch, iterate_batches
from carl_assets.leworld.training_settings import (
    INFO_UTILITIES,
    REFERENCE_EPOCHS,
    InfoUtility,
    LeWorldTrainingSettings,
    TrainingConfig,
    training_config,
)
from carl_assets.runtime import torch_threads

__all__ = [
    "INFO_UTILITIES", "REFERENCE_EPOCHS", "InfoUtility", "LeWorldTrainingSettings", "Phase1Trainer",
    "Phase2Trainer", "Phase3Trainer", "TrainingConfig", "one_step_mse", "train_system", "training_config",
]


class Phase1Trainer:
    def __init__(self, system: LeWorldSystem, config: TrainingConfig):
        self.system, self.config = system, config
        self.slm_optimizer = optim.AdamW(
            system.slms.parameters(), lr=config.phase1_lr, weight_decay=config.weight_decay
        )
        self.blm_params = list(system.blm.parameters()) + list(system.memory.parameters())
        self.blm_optimizer = optim.AdamW(
            self.blm_params, lr=config.phase1_lr, weight_decay=config.weight_decay
        )

    def train_slms_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Cross-entropy of SLM i's address logits against relevant region i (padding slots: address 0,
        length 1, as in the reference)."""
        self.slm_optimizer.zero_grad()
        states, chars = batch["states"], batch["characteristics"]
        max_range = self.system.memory.config.max_read_range
        total = None
        for i, slm in enumerate(self.system.slms):
            out = slm(states[:, 0], states[:, 1], chars)
            target = batch["relevant_starts"][:, i].long()
            half = slm.address_head.half_space
            addr_loss = F.cross_entropy(out["start_logits_high"], target // half) + F.cross_entropy(
                out["start_logits_low"], target % half
            )
            tgt_range = (batch["relevant_ends"][:, i] - batch["relevant_starts"][:, i]).clamp(
                1, max_range
            ) - 1
            loss = addr_loss + 0.5 * F.cross_entropy(out["range_logits"], tgt_range.long())
            total = loss if total is None else total + loss
        total = total / len(self.system.slms)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.system.slms.parameters(), self.config.grad_clip)
        self.slm_optimizer.step()
        return {"slm_loss": total.item()}

    def train_blm_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Next-state MSE from oracle reads of the known regions, all time steps in one batch."""
        self.blm_optimizer.zero_grad()
        states = batch["states"]
        b, t_len, d = states.shape
        steps = t_len - 1
        system = self.system
        reads = []
        fake = []
        for i in range(len(system.slms)):
            _, encoded, _ = system.memory.read(batch["relevant_starts"][:, i], batch["relevant_ends"][:, i])
            if not system.memory_reads:  # the no-memory baseline learns from the same steps without contents
                encoded = torch.zeros_like(encoded)
            reads.append(encoded.repeat_interleave(steps, dim=0))
            fake.append(
                {
                    "hidden": torch.zeros(b * steps, system.slm_config.d_model),
                    "confidence": torch.ones(b * steps),
                }
            )
        past_index = torch.clamp(torch.arange(steps) - 1, min=0)
        past = states[:, past_index].reshape(-1, d)
        current = states[:, :-1].reshape(-1, d)
        target = states[:, 1:].reshape(-1, d)
        out = system.blm(past, current, fake, reads)
        loss = F.mse_loss(out["next_state"], target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.blm_params, self.config.grad_clip)
        self.blm_optimizer.step()
        return {"blm_loss": loss.item()}


class Phase2Trainer:
    def __init__(self, system: LeWorldSystem, config: TrainingConfig):
        self.system, self.config = system, config
        self.optimizer = optim.AdamW(
            system.parameters(), lr=config.phase2_lr, weight_decay=config.weight_decay
        )
        self.scheduler = optim.lr_scheduler.CosineAnnealingWarmRestarts(
            self.optimizer, T_0=max(1, config.phase2_epochs // 3), T_mult=2
        )
        self.global_step = 0

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.optimizer.zero_grad()
        out = self.system.multi_step_forward(batch["states"], batch["characteristics"])
        loss = out["total_loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.system.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.global_step += 1
        temperature = self.system.blm.router.anneal_temperature(
            self.global_step, self.config.temp_anneal_rate, self.config.temp_min
        )
        return {
            "total_loss": loss.item(),
            "next_state_loss": out["next_state_loss"].item(),
            "temperature": temperature,
        }


class Phase3Trainer:
    def __init__(self, system: LeWorldSystem, config: TrainingConfig):
        self.system, self.config = system, config
        info = [
            *system.blm.info_request.parameters(),
            *system.blm.info_gate.parameters(),
            *system.info_to_slm.parameters(),
        ]
        info_ids = {id(p) for p in info}
        other_blm = [p for p in system.blm.parameters() if id(p) not in info_ids]
        lr = config.phase3_lr
        self.optimizer = optim.AdamW(
            [
                {"params": info, "lr": lr},
                {"params": list(system.slms.parameters()), "lr": lr * 0.1},
                {"params": other_blm, "lr": lr * 0.1},
                {"params": list(system.memory.parameters()), "lr": lr * 0.01},
            ],
            weight_decay=config.weight_decay,
        )

    def objective(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Phase 3's loss for a batch (not yet backpropagated) and its step metrics."""
        states, chars = batch["states"], batch["characteristics"]
        reinforce = self.config.info_utility == "reinforce"
        policy = "sample" if reinforce else "always"
        with_info = self.system.multi_step_forward(states, chars, info_policy=policy, generator=generator)
        loss_with = with_info["total_loss"]
        with torch.no_grad():  # branch B: no info request between steps; only its value is used
            without = self.system.multi_step_forward(states, chars, use_info=False)
        loss_without = without["next_state_loss"]
        metrics: dict[str, float] = {}
        if reinforce:
            # Per-sequence reward: how much the sampled decisions beat the branch without the loop.
            reward = (without["sequence_mse"] - with_info["sequence_mse"]).detach()
            improvement = reward.mean()
            advantage = (reward - reward.mean()) / (reward.std(unbiased=False) + 1e-8)
            utility = -self.config.lambda_info_util * (advantage * with_info["info_log_prob"]).mean()
            total = loss_with + utility
            metrics["info_utility_loss"] = utility.item()
            metrics["info_sent_rate"] = (
                with_info["info_sent"].mean().item() if with_info["info_sent"].numel() else 0.0
            )
        else:
            # The reference's form: a detached improvement, so this term changes the loss's value, not its
            # gradient.
            improvement = (loss_without - loss_with).detach()
            total = loss_with - self.config.lambda_info_util * improvement
        return total, metrics | {
            "total_loss": total.item(),
            "loss_with_info": loss_with.item(),
            "loss_without_info": loss_without.item(),
            "improvement": improvement.item(),
            # Like for like: the reference compares A's total loss (with the auxiliary terms) to B's
            # next-state loss; this is A's next-state loss alone.
            "next_state_loss_with_info": with_info["next_state_loss"].item(),
        }

    def train_step(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, float]:
        self.optimizer.zero_grad()
        total, metrics = self.objective(batch, generator)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.system.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return metrics


@torch.no_grad()
def one_step_mse(system: LeWorldSystem, data: SequenceBatch, batch_size: int = 256) -> float:
    """Teacher-forced next-state MSE over every step (the validation number logged per epoch)."""
    was_training = system.training
    system.eval()
    total, count = 0.0, 0
    for batch in iterate_batches(data, batch_size, shuffle=False):
        out = system.multi_step_forward(batch["states"], batch["characteristics"])
        total += out["next_state_loss"].item() * len(batch["states"])
        count += len(batch["states"])
    system.train(was_training)
    return total / max(1, count)


def _epoch(
    rows: list[dict[str, Any]],
    phase: int,
    epoch: int,
    sums: dict[str, float],
    n: int,
    started: float,
    extra: dict[str, float],
) -> None:
    values = {name: value / max(1, n) for name, value in sums.items()} | extra
    values["seconds"] = time.perf_counter() - started
    rows.extend(
        {"phase": phase, "epoch": epoch, "metric": name, "value": float(v)} for name, v in values.items()
    )


def train_system(
    system: LeWorldSystem,
    train: SequenceBatch,
    validation: SequenceBatch | None,
    config: TrainingConfig,
    log: Callable[[str], None] | None = None,
    phases: tuple[int, ...] = (1, 2, 3),
    num_threads: int | None = 1,
) -> pd.DataFrame:
    """Run the phases in order; one row per (phase, epoch, metric) in long format.

    Each epoch logs the mean of the step metrics, the validation one-step MSE (when given) and seconds.
    """
    with torch_threads(num_threads):
        return _train(system, train, validation, config, log, phases)


def _train(system, train, validation, config, log, phases) -> pd.DataFrame:
    log = log or (lambda message: None)
    system.loss_weights = config.loss_weights()
    system.train()
    gen = torch.Generator().manual_seed(config.seed)
    rows: list[dict[str, Any]] = []

    def finish(phase: int, epoch: int, sums: dict[str, float], n: int, started: float) -> None:
        extra = {"val_one_step_mse": one_step_mse(system, validation)} if validation is not None else {}
        _epoch(rows, phase, epoch, sums, n, started, extra)
        log(
            f"phase {phase} epoch {epoch}: "
            + ", ".join(f"{k}={v / max(1, n):.4f}" for k, v in sums.items())
            + "".join(f", {k}={v:.4f}" for k, v in extra.items())
        )

    def run(
        phase: int,
        epochs: int,
        batch_size: int,
        step: Callable[[dict[str, torch.Tensor]], dict[str, float]],
        scheduler: Any = None,
    ) -> None:
        for epoch in range(epochs):
            started, sums, n = time.perf_counter(), {}, 0
            batches = list(iterate_batches(train, batch_size, gen))
            for i, batch in enumerate(batches):
                for name, value in step(batch).items():
                    sums[name] = sums.get(name, 0.0) + value
                n += 1
                if scheduler is not None:
                    scheduler.step(epoch + (i + 1) / len(batches))
            finish(phase, epoch + 1, sums, n, started)

    if 1 in phases:
        p1 = Phase1Trainer(system, config)
        run(
            1,
            config.phase1_epochs,
            config.phase1_batch_size,
            lambda b: p1.train_slms_step(b) | p1.train_blm_step(b),
        )
    if 2 in phases:
        p2 = Phase2Trainer(system, config)
        run(2, config.phase2_epochs, config.phase2_batch_size, p2.train_step, p2.scheduler)
    if 3 in phases:
        p3 = Phase3Trainer(system, config)
        run(3, config.phase3_epochs, config.phase3_batch_size, lambda b: p3.train_step(b, gen))
    system.eval()
    return pd.DataFrame(rows, columns=["phase", "epoch", "metric", "value"])
