"""LeWorld architecture: an addressable bit memory, small models that pick what to read, a big model
that predicts the next state from what they read.

The reference's training script imports these names from a `leworld_architecture` module that was never
published; they are designed here from how the reference's trainers, dataset and evaluator use them:

- `ArtificialMemory`: `num_words` words (at most 65,536, addressed by a high and a low byte) of
  `word_size` bits in a buffer `memory`, plus a learnable encoder of what is read.
  `read(starts, ends)` returns the bits (`[B, max_read_range, word_size]`), their encoding
  (`[B, encoding_dim]`) and the mask of valid words (`[B, max_read_range]`).
- `SmallLeWorldModel` (SLM): from (past state, current state, characteristics) logits over the high
  byte, the low byte and the range length; a hidden state, a confidence and hard start/end addresses.
- `BigLeWorldModel` (BLM): a router (sigmoid gates with a temperature that anneals) choosing which
  SLM reads to use, an info-request head (a query that modulates the SLMs at the next step), the
  info-request decision (`info_gate`: the probability of sending that query at all) and a prediction of
  the next state.
- `LeWorldSystem`: one step (`forward`, with its losses) and `multi_step_forward` over a sequence.
  `memory_reads=False` builds the same architecture with every read's encoding zero, in training and at
  test time alike: the fair no-memory baseline (it keeps the SLMs' hidden states, the router and the info
  loop; only what memory holds is withheld).

Info-request decisions (`info_policy` of `multi_step_forward`): "always" sends the query every step (the
reference); "greedy" (default) sends it when the gate's probability exceeds 1/2 (the gate starts at
sigmoid(2) ≈ 0.88, so an untrained gate behaves as "always"); "sample" draws each decision and returns
their log-probabilities, which phase 3's REINFORCE term trains.

Gradients through discrete choices use straight-through estimators: the router's hard gates take the
gradient of their sigmoid probabilities, and a read's encoding is scaled by p/p.detach() (value 1) where
p is the probability the SLM gave to the address it chose, so the prediction loss reaches the logits.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from carl_assets.leworld.memory import BYTE, ArtificialMemory, MemoryConfig
from carl_assets.leworld.models import (
    INFO_GATE_BIAS,
    AddressHead,
    BigLeWorldModel,
    BLMConfig,
    Router,
    SLMConfig,
    SmallLeWorldModel,
    slm_features,
)

__all__ = [
    "BYTE",
    "CHECKPOINT_CONFIG",
    "CHECKPOINT_WEIGHTS",
    "INFO_GATE_BIAS",
    "INFO_POLICIES",
    "AddressHead",
    "ArtificialMemory",
    "BLMConfig",
    "BigLeWorldModel",
    "LeWorldSystem",
    "LossWeights",
    "MemoryConfig",
    "Router",
    "SLMConfig",
    "SmallLeWorldModel",
    "count_params",
    "load_system",
    "save_system",
    "slm_features",
]

INFO_POLICIES = ("always", "greedy", "sample")


@dataclass
class LossWeights:
    """Weights of the auxiliary losses (the reference's `TrainingConfig.lambda_*`)."""

    balance: float = 0.01
    diversity: float = 0.001
    entropy: float = 0.01


def count_params(module: nn.Module, name: str = "", verbose: bool = False) -> int:
    """Number of trainable parameters (printed when `verbose`, as the reference's helper did)."""
    n = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if verbose:
        print(f"{name or type(module).__name__}: {n:,} parameters")
    return n


@dataclass
class _StepTrace:
    """What `multi_step_forward` keeps of each step."""

    predictions: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)
    highs: list[list[torch.Tensor]] = field(default_factory=list)
    decisions: list[torch.Tensor] = field(default_factory=list)
    log_probs: list[torch.Tensor] = field(default_factory=list)

    def add(self, out: dict[str, Any]) -> None:
        self.predictions.append(out["next_state"])
        self.masks.append(out["mask"])
        self.probs.append(out["route_probs"])
        self.highs.append([o["start_logits_high"] for o in out["slm_outputs"]])


class LeWorldSystem(nn.Module):
    """The memory, `n_slms` small models, the big model and the info query's path back to the SLMs."""

    def __init__(
        self,
        memory_config: MemoryConfig | None = None,
        slm_config: SLMConfig | None = None,
        blm_config: BLMConfig | None = None,
        loss_weights: LossWeights | None = None,
        memory_reads: bool = True,
    ):
        super().__init__()
        self.memory_reads = bool(memory_reads)
        self.memory_config = memory_config or MemoryConfig()
        self.slm_config = slm_config or SLMConfig()
        self.blm_config = blm_config or BLMConfig()
        self.loss_weights = loss_weights or LossWeights()
        if self.slm_config.state_dim != self.blm_config.state_dim:
            raise ValueError("SLMConfig.state_dim and BLMConfig.state_dim must agree")
        self.memory = ArtificialMemory(self.memory_config)
        self.slms = nn.ModuleList(
            SmallLeWorldModel(self.slm_config, self.memory_config) for _ in range(self.blm_config.n_slms)
        )
        self.blm = BigLeWorldModel(self.blm_config, self.slm_config, self.memory_config)
        self.info_to_slm = nn.Linear(
            self.blm_config.info_dim, self.blm_config.n_slms * self.slm_config.d_model
        )

    def configs(self) -> dict[str, Any]:
        return {
            "memory": asdict(self.memory_config),
            "slm": asdict(self.slm_config),
            "blm": asdict(self.blm_config),
            "loss_weights": asdict(self.loss_weights),
            "memory_reads": self.memory_reads,
        }

    @classmethod
    def from_configs(cls, configs: dict[str, Any]) -> LeWorldSystem:
        return cls(
            MemoryConfig(**configs["memory"]),
            SLMConfig(**configs["slm"]),
            BLMConfig(**configs["blm"]),
            LossWeights(**configs.get("loss_weights", {})),
            memory_reads=configs.get("memory_reads", True),
        )

    def read_for(
        self,
        slm_outputs: list[dict[str, torch.Tensor]],
        ablate_memory: bool = False,
        oracle: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Encoded reads of every SLM's chosen range at once; zeros when memory is ablated (this call) or
        the system has no memory reads (`memory_reads=False`, always).

        `oracle=(starts, ends)` (`[B, k]`, e.g. the dataset's relevant regions) makes SLM i read region i
        instead of its own choice (an empty read where i >= k): the reference for what memory could give."""
        n, batch = len(slm_outputs), slm_outputs[0]["start_addr"].shape[0]
        if oracle is not None:
            zeros = torch.zeros(batch, dtype=torch.long)
            pick = [
                (oracle[0][:, i], oracle[1][:, i]) if i < oracle[0].shape[1] else (zeros, zeros)
                for i in range(n)
            ]
            encoded = self.memory.encode_range(
                torch.cat([a for a, _ in pick]), torch.cat([b for _, b in pick])
            )
            if not self.memory_reads:
                encoded = torch.zeros_like(encoded)
            return list(encoded.view(n, batch, -1).unbind(0))
        starts = torch.cat([o["start_addr"] for o in slm_outputs])
        ends = torch.cat([o["end_addr"] for o in slm_outputs])
        encoded = self.memory.encode_range(starts, ends)
        if ablate_memory or not self.memory_reads:
            encoded = torch.zeros_like(encoded)
        log_chosen = torch.cat([o["chosen_log_prob"] for o in slm_outputs])
        encoded = encoded * torch.exp(log_chosen - log_chosen.detach())[:, None]  # value 1, gradient d log p
        return list(encoded.view(n, batch, -1).unbind(0))

    def forward(
        self,
        past_state: torch.Tensor,
        current_state: torch.Tensor,
        characteristics: torch.Tensor,
        next_state: torch.Tensor | None = None,
        info_query_prev: torch.Tensor | None = None,
        ablate_memory: bool = False,
        oracle: tuple[torch.Tensor, torch.Tensor] | None = None,
        info_sent: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """One step: SLMs pick ranges → memory read → BLM predicts. `losses` is empty without a target.

        `info_sent` (`[B]`, 0/1): which rows' previous query is sent; a row with 0 gets no modulation at
        all, exactly as with `info_query_prev=None`."""
        n = len(self.slms)
        modulation = None
        if info_query_prev is not None:
            modulation = self.info_to_slm(info_query_prev).view(-1, n, self.slm_config.d_model)
            if info_sent is not None:
                modulation = modulation * info_sent.to(modulation.dtype)[:, None, None]
        features = slm_features(past_state, current_state, characteristics)  # shared by every SLM
        slm_outputs = [
            slm.from_features(features, None if modulation is None else modulation[:, i])
            for i, slm in enumerate(self.slms)
        ]
        reads = self.read_for(slm_outputs, ablate_memory, oracle)
        out = self.blm(past_state, current_state, slm_outputs, reads)
        out["slm_outputs"] = slm_outputs
        out["losses"] = {}
        if next_state is not None:
            out["losses"] = self.losses(out, next_state)
            out["total_loss"] = out["losses"]["total_loss"]
        return out

    def losses(self, out: dict[str, Any], next_state: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step's losses (see `loss_terms`)."""
        highs = [o["start_logits_high"][None] for o in out["slm_outputs"]]
        return self.loss_terms(out["next_state"][None], next_state[None], out["route_probs"][None], highs)

    def loss_terms(
        self,
        predicted: torch.Tensor,
        target: torch.Tensor,
        route_probs: torch.Tensor,
        high_logits: list[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Losses averaged over steps, from tensors stacked as `[steps, B, ...]` (the mean of each
        step's losses, computed in one pass)."""
        w = self.loss_weights
        next_state_loss = F.mse_loss(predicted, target)
        # Balance: n·Σ share² − 1 per step (0 when every SLM is used equally), averaged over steps.
        usage = route_probs.mean(1)  # [steps, n]
        share = usage / usage.sum(-1, keepdim=True).clamp(min=1e-8)
        balance = (route_probs.shape[-1] * (share**2).sum(-1) - 1.0).mean()
        # Diversity: overlap of the SLMs' start distributions (high byte), pairwise.
        dists = [h.softmax(-1) for h in high_logits]
        overlaps = [
            (dists[i] * dists[j]).sum(-1).mean() for i in range(len(dists)) for j in range(i + 1, len(dists))
        ]
        diversity = torch.stack(overlaps).mean() if overlaps else next_state_loss.new_zeros(())
        # Entropy of each gate: low means decisive routing.
        p = route_probs.clamp(1e-6, 1 - 1e-6)
        entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
        total = next_state_loss + w.balance * balance + w.diversity * diversity + w.entropy * entropy
        return {
            "next_state_loss": next_state_loss,
            "balance_loss": balance,
            "diversity_loss": diversity,
            "entropy_loss": entropy,
            "total_loss": total,
        }

    def multi_step_forward(
        self,
        states: torch.Tensor,
        characteristics: torch.Tensor,
        n_steps: int | None = None,
        rollout: bool = False,
        use_info: bool = True,
        ablate_memory: bool = False,
        oracle: tuple[torch.Tensor, torch.Tensor] | None = None,
        info_policy: str = "greedy",
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """Predict states[:, 1 : n_steps + 1] step by step, passing the info query forward.

        Teacher forcing (default): step t sees the true states t-1 and t. `rollout=True`: from the true
        state 0, each prediction becomes the next step's current state (error at growing horizons).
        `use_info=False` is the reference's branch B (no info request between steps). The losses are the
        mean over steps of `forward`'s losses, computed once on the stacked steps.

        `info_policy` decides, after each step, whether its query is sent to the next one (see the module
        docstring; `generator` draws the "sample" decisions). Also returned: `sequence_mse` (`[B]`, each
        sequence's next-state MSE over steps and dims), `info_sent` (`[B, steps-1]`, the decisions that
        reached a next step) and `info_log_prob` (`[B]`, their summed log-probability; differentiable
        with "sample"). Raises ValueError for an unknown `info_policy`.
        """
        if info_policy not in INFO_POLICIES:
            raise ValueError(f"info_policy must be one of {INFO_POLICIES}, got {info_policy!r}")
        steps = states.shape[1] - 1 if n_steps is None else min(n_steps, states.shape[1] - 1)
        trace = _StepTrace()
        past = current = states[:, 0]
        info, sent = None, None
        for t in range(steps):
            if not rollout:
                past, current = states[:, max(0, t - 1)], states[:, t]
            out = self(
                past, current, characteristics, None, info if use_info else None, ablate_memory, oracle, sent
            )
            info = out["info_query"]
            if use_info and t < steps - 1:  # the last step's decision reaches no step: not taken
                sent, log_prob = self._info_decision(out["info_logit"], info_policy, generator)
                trace.decisions.append(sent)
                trace.log_probs.append(log_prob)
            trace.add(out)
            if rollout:
                past, current = current, out["next_state"]
        return self._sequence_result(states, steps, trace)

    def _sequence_result(self, states: torch.Tensor, steps: int, trace: _StepTrace) -> dict[str, Any]:
        """`multi_step_forward`'s outputs from the steps it traced (losses on the stacked steps)."""
        predicted = torch.stack(trace.predictions)  # [steps, B, D]
        target = states[:, 1 : steps + 1].transpose(0, 1)
        batch = states.shape[0]
        losses = self.loss_terms(
            predicted,
            target,
            torch.stack(trace.probs),
            [torch.stack(per_slm) for per_slm in zip(*trace.highs, strict=True)],
        )
        return {
            "predictions": predicted.transpose(0, 1),
            "masks": torch.stack(trace.masks, dim=1),
            "losses": losses,
            "total_loss": losses["total_loss"],
            "next_state_loss": losses["next_state_loss"],
            "sequence_mse": (predicted - target).pow(2).mean(dim=(0, 2)),
            "info_sent": torch.stack(trace.decisions, dim=1)
            if trace.decisions
            else states.new_zeros(batch, 0),
            "info_log_prob": torch.stack(trace.log_probs, dim=1).sum(1)
            if trace.log_probs
            else states.new_zeros(batch),
        }

    @staticmethod
    def _info_decision(
        logit: torch.Tensor, policy: str, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sent 0/1 `[B]`, log π(sent) `[B]`) under the policy; "always" sends with log-probability 0."""
        if policy == "always":
            return torch.ones_like(logit), torch.zeros_like(logit)
        if policy == "greedy":
            sent = (logit > 0).to(logit.dtype)
        else:
            sent = torch.bernoulli(torch.sigmoid(logit.detach()), generator=generator)
        # log σ(z) when sent, log σ(-z) when not: the Bernoulli log-likelihood, stable for any logit.
        return sent, -F.binary_cross_entropy_with_logits(logit, sent, reduction="none")


CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_CONFIG = "config.json"


def save_system(system: LeWorldSystem, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Weights (memory bits and router temperature included) as safetensors, configs as JSON: no pickle."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().clone() for name, t in system.state_dict().items()}
    save_file(tensors, str(directory / CHECKPOINT_WEIGHTS))
    (directory / CHECKPOINT_CONFIG).write_text(
        json.dumps({"configs": system.configs(), **(extra or {})}, indent=2)
    )
    return directory


def load_system(directory: str | Path) -> LeWorldSystem:
    """A system saved by `save_system`."""
    directory = Path(directory)
    spec = json.loads((directory / CHECKPOINT_CONFIG).read_text())
    system = LeWorldSystem.from_configs(spec["configs"])
    system.load_state_dict(load_file(str(directory / CHECKPOINT_WEIGHTS)))
    return system
