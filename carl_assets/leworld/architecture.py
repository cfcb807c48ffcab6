"""LeWorld architecture: an addressable bit memory, small models that pick what to read, a big model
that predicts the next state from what they read.

The training seed imports these names from a `leworld_architecture` module that was never published;
they are designed here from how the seed's trainers, dataset and evaluator use them:

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
seed); "greedy" (default) sends it when the gate's probability exceeds 1/2 (the gate starts at
sigmoid(2) ≈ 0.88, so an untrained gate behaves as "always"); "sample" draws each decision and returns
their log-probabilities, which phase 3's REINFORCE term trains.

Gradients through discrete choices use straight-through estimators: the router's hard gates take the
gradient of their sigmoid probabilities, and a read's encoding is scaled by p/p.detach() (value 1) where
p is the probability the SLM gave to the address it chose, so the prediction loss reaches the logits.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

BYTE = 256  # the low byte of an address; the high byte has ceil(num_words / 256) values
INFO_GATE_BIAS = 2.0  # initial logit of sending the info query: ask by default until phase 3 learns otherwise
INFO_POLICIES = ("always", "greedy", "sample")


@dataclass
class MemoryConfig:
    num_words: int = 65536
    word_size: int = 32
    max_read_range: int = 128
    encoding_dim: int = 64

    def __post_init__(self) -> None:
        if not 1024 <= self.num_words <= BYTE * BYTE:
            raise ValueError(f"num_words must lie in [1024, 65536] (two address bytes), got {self.num_words}")
        if self.word_size < 1 or self.max_read_range < 1:
            raise ValueError("word_size and max_read_range must be positive")


@dataclass
class SLMConfig:
    state_dim: int = 64
    char_dim: int = 32
    d_model: int = 128


@dataclass
class BLMConfig:
    state_dim: int = 64
    d_model: int = 128
    n_slms: int = 3
    info_dim: int = 16
    init_temperature: float = 1.0


@dataclass
class LossWeights:
    """Weights of the auxiliary losses (the seed's `TrainingConfig.lambda_*`)."""

    balance: float = 0.01
    diversity: float = 0.001
    entropy: float = 0.01


def count_params(module: nn.Module, name: str = "", verbose: bool = False) -> int:
    """Number of trainable parameters (printed when `verbose`, as the seed's helper did)."""
    n = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if verbose:
        print(f"{name or type(module).__name__}: {n:,} parameters")
    return n


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.LayerNorm(d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


class ArtificialMemory(nn.Module):
    """Bits in a buffer (not trained by gradient: populators write them) and a learnable read encoder."""

    def __init__(self, config: MemoryConfig):
        super().__init__()
        self.config = config
        self.register_buffer("memory", torch.zeros(config.num_words, config.word_size))
        # The encoder sees the signed mean of the bits read and the fill fraction of the range.
        self.encoder = _mlp(config.word_size + 1, config.encoding_dim, config.encoding_dim)
        self.register_buffer("_offsets", torch.arange(config.max_read_range), persistent=False)

    def _prefix(self) -> torch.Tensor:
        """Prefix sums of the bits (float64, exact), recomputed only when the buffer changed."""
        key = (self.memory.data_ptr(), self.memory._version)
        if getattr(self, "_prefix_key", None) != key:
            cumulative = torch.cumsum(self.memory.detach().to(torch.float64), dim=0)
            zero = torch.zeros(1, self.config.word_size, dtype=torch.float64)
            self._prefix_cache = torch.cat([zero, cumulative])
            self._prefix_key = key
        return self._prefix_cache

    def _span(self, starts: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = starts.long().clamp(0, self.config.num_words - 1)
        ends = torch.minimum(ends.long(), starts + self.config.max_read_range).clamp(max=self.config.num_words)
        return starts, torch.maximum(ends, starts)

    def encode_range(self, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """The encoding of words [start, end) (clipped as in `read`) from prefix sums, without gathering
        the bits: what the system uses at every step."""
        starts, ends = self._span(starts, ends)
        prefix = self._prefix()
        count = (ends - starts).to(torch.float64)[:, None]
        mean = (prefix[ends] - prefix[starts]) / count.clamp(min=1.0)
        return self._encode(mean.to(self.memory.dtype), count.to(self.memory.dtype))

    def _encode(self, mean_bits: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        nonempty = (count > 0).to(mean_bits.dtype)
        features = torch.cat([(mean_bits * 2.0 - 1.0) * nonempty, count / self.config.max_read_range], dim=-1)
        return self.encoder(features) * nonempty

    def read(self, starts: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Read words [start, end) (at most `max_read_range`, clipped at the end of memory).

        Returns (bits `[B, R, W]` zero outside the mask, encoded `[B, E]`, mask `[B, R]` bool).
        An empty range (end <= start) encodes to exactly zero.
        """
        cfg = self.config
        starts, ends = self._span(starts, ends)
        positions = starts[:, None] + self._offsets[None, :]
        mask = positions < ends[:, None]
        bits = self.memory[positions.clamp(max=cfg.num_words - 1)] * mask[..., None]
        count = mask.sum(dim=1, keepdim=True).to(bits.dtype)
        return bits, self._encode(bits.sum(dim=1) / count.clamp(min=1.0), count), mask


# ---------------------------------------------------------------------------------------------
# Small model: where to read
# ---------------------------------------------------------------------------------------------


class AddressHead(nn.Module):
    """Logits over the high byte, the low byte and the range length (1..max_read_range), from one fused
    linear layer; hard choices by argmax."""

    half_space = BYTE

    def __init__(self, d_model: int, memory_config: MemoryConfig):
        super().__init__()
        self.num_words = memory_config.num_words
        self.high_space = math.ceil(memory_config.num_words / BYTE)
        self.sizes = [self.high_space, BYTE, memory_config.max_read_range]
        self.logits = nn.Linear(d_model, sum(self.sizes))

    def forward(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        high, low, rng = self.logits(hidden).split(self.sizes, dim=-1)
        (top_hi, hi), (top_lo, lo), (top_ln, ln) = high.max(-1), low.max(-1), rng.max(-1)
        start = (hi * BYTE + lo).clamp(max=self.num_words - 1)
        end = (start + ln + 1).clamp(max=self.num_words)
        # log-probability of the chosen address (max logit − logsumexp per part): the straight-through
        # path by which the prediction loss reaches the address logits.
        log_chosen = (top_hi + top_lo + top_ln) - (
            torch.logsumexp(high, -1) + torch.logsumexp(low, -1) + torch.logsumexp(rng, -1)
        )
        return {
            "start_logits_high": high,
            "start_logits_low": low,
            "range_logits": rng,
            "start_addr": start,
            "end_addr": end,
            "chosen_prob": log_chosen.exp(),
            "chosen_log_prob": log_chosen,
        }


def slm_features(past_state: torch.Tensor, current_state: torch.Tensor, characteristics: torch.Tensor) -> torch.Tensor:
    """What an SLM sees: past, current, their difference (the recent change) and the characteristics."""
    return torch.cat([past_state, current_state, current_state - past_state, characteristics], dim=-1)


class SmallLeWorldModel(nn.Module):
    def __init__(self, config: SLMConfig, memory_config: MemoryConfig):
        super().__init__()
        self.config = config
        d_in = 3 * config.state_dim + config.char_dim
        self.input = nn.Linear(d_in, config.d_model)
        self.body = nn.Sequential(nn.LayerNorm(config.d_model), nn.GELU(), nn.Linear(config.d_model, config.d_model), nn.GELU())
        self.address_head = AddressHead(config.d_model, memory_config)
        self.confidence_head = nn.Linear(config.d_model, 1)

    def forward(
        self,
        past_state: torch.Tensor,
        current_state: torch.Tensor,
        characteristics: torch.Tensor,
        modulation: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        return self.from_features(slm_features(past_state, current_state, characteristics), modulation)

    def from_features(self, features: torch.Tensor, modulation: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = self.input(features)
        if modulation is not None:  # the BLM's info request from the previous step
            h = h + modulation
        hidden = self.body(h)
        out = self.address_head(hidden)
        out["hidden"] = hidden
        out["confidence"] = torch.sigmoid(self.confidence_head(hidden)).squeeze(-1)
        return out


# ---------------------------------------------------------------------------------------------
# Big model: route, predict, ask
# ---------------------------------------------------------------------------------------------


class Router(nn.Module):
    """Independent sigmoid gates per SLM at a temperature; hard 0/1 gates, straight-through gradient."""

    def __init__(self, state_dim: int, slm_dim: int, init_temperature: float):
        super().__init__()
        self.init_temperature = float(init_temperature)
        self.register_buffer("temperature", torch.tensor(float(init_temperature)))
        self.score = nn.Linear(2 * state_dim + slm_dim + 1, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.constant_(self.score.bias, 1.0)  # start with every SLM switched on

    def forward(
        self, past: torch.Tensor, current: torch.Tensor, hiddens: torch.Tensor, confidences: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hiddens.shape[1]
        states = torch.cat([past, current], dim=-1)[:, None, :].expand(-1, n, -1)
        logits = self.score(torch.cat([states, hiddens, confidences[..., None]], dim=-1)).squeeze(-1)
        probs = torch.sigmoid(logits / self.temperature)
        hard = (probs > 0.5).to(probs.dtype)
        return probs, hard + probs - probs.detach()

    @torch.no_grad()
    def anneal_temperature(self, step: int, rate: float, minimum: float) -> float:
        value = max(minimum, self.init_temperature * math.exp(-rate * step))
        self.temperature.fill_(value)
        return value


class BigLeWorldModel(nn.Module):
    def __init__(self, config: BLMConfig, slm_config: SLMConfig, memory_config: MemoryConfig):
        super().__init__()
        self.config = config
        self.slm_dim = slm_config.d_model
        self.router = Router(config.state_dim, slm_config.d_model, config.init_temperature)
        per_slot = slm_config.d_model + memory_config.encoding_dim + 1
        # Slot-specific projection: the BLM knows which SLM a read came from.
        self.read_proj = nn.Linear(config.n_slms * per_slot, config.d_model)
        self.trunk = nn.Sequential(
            nn.Linear(3 * config.state_dim + config.d_model, config.d_model),
            nn.LayerNorm(config.d_model),
            nn.GELU(),
            nn.Linear(config.d_model, config.d_model),
            nn.GELU(),
        )
        self.head = nn.Linear(config.d_model, config.state_dim)
        # A linear path from the same inputs: the state dynamics are close to linear, which an MLP alone
        # learns slowly.
        self.skip = nn.Linear(3 * config.state_dim + config.d_model, config.state_dim)
        self.info_request = nn.Sequential(nn.Linear(config.d_model, config.info_dim), nn.Tanh())
        # The decision to send that query at all (a Bernoulli policy): trained only by phase 3's REINFORCE.
        with torch.random.fork_rng(devices=[]):  # fully re-initialised below: leave the global RNG's stream
            self.info_gate = nn.Linear(config.d_model, 1)  # (the other modules' initialisation) unchanged
        nn.init.zeros_(self.info_gate.weight)
        nn.init.constant_(self.info_gate.bias, INFO_GATE_BIAS)

    def forward(
        self,
        past_state: torch.Tensor,
        current_state: torch.Tensor,
        slm_outputs: list[dict[str, torch.Tensor]],
        reads: list[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        hiddens = torch.stack([o["hidden"] for o in slm_outputs], dim=1)  # [B, n, H]
        confidences = torch.stack([o["confidence"].to(hiddens.dtype) for o in slm_outputs], dim=1)
        route_probs, mask = self.router(past_state, current_state, hiddens, confidences)
        slots = torch.cat([hiddens, torch.stack(reads, dim=1), confidences[..., None]], dim=-1)
        context = self.read_proj((slots * mask[..., None]).flatten(1))
        inputs = torch.cat([past_state, current_state, current_state - past_state, context], dim=-1)
        h = self.trunk(inputs)
        # Residual prediction: the next state is the current one plus a learned change.
        return {
            "next_state": current_state + self.head(h) + self.skip(inputs),
            "info_query": self.info_request(h),
            "info_logit": self.info_gate(h).squeeze(-1),
            "mask": mask,
            "route_probs": route_probs,
        }


# ---------------------------------------------------------------------------------------------
# The system
# ---------------------------------------------------------------------------------------------


class LeWorldSystem(nn.Module):
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
        self.info_to_slm = nn.Linear(self.blm_config.info_dim, self.blm_config.n_slms * self.slm_config.d_model)

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
            pick = [(oracle[0][:, i], oracle[1][:, i]) if i < oracle[0].shape[1] else (zeros, zeros) for i in range(n)]
            encoded = self.memory.encode_range(torch.cat([a for a, _ in pick]), torch.cat([b for _, b in pick]))
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
            slm.from_features(features, None if modulation is None else modulation[:, i]) for i, slm in enumerate(self.slms)
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
        self, predicted: torch.Tensor, target: torch.Tensor, route_probs: torch.Tensor, high_logits: list[torch.Tensor]
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
        overlaps = [(dists[i] * dists[j]).sum(-1).mean() for i in range(len(dists)) for j in range(i + 1, len(dists))]
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
        `use_info=False` is the seed's branch B (no info request between steps). The losses are the
        mean over steps of `forward`'s losses, computed once on the stacked steps.

        `info_policy` decides, after each step, whether its query is sent to the next one (see the module
        docstring; `generator` draws the "sample" decisions). Also returned: `sequence_mse` (`[B]`, each
        sequence's next-state MSE over steps and dims), `info_sent` (`[B, steps-1]`, the decisions that
        reached a next step) and `info_log_prob` (`[B]`, their summed log-probability; differentiable
        with "sample").
        """
        if info_policy not in INFO_POLICIES:
            raise ValueError(f"info_policy must be one of {INFO_POLICIES}, got {info_policy!r}")
        steps = states.shape[1] - 1 if n_steps is None else min(n_steps, states.shape[1] - 1)
        past = current = states[:, 0]
        info, sent = None, None
        predictions, masks, probs, highs, decisions, log_probs = [], [], [], [], [], []
        for t in range(steps):
            if not rollout:
                past, current = states[:, max(0, t - 1)], states[:, t]
            out = self(past, current, characteristics, None, info if use_info else None, ablate_memory, oracle, sent)
            info = out["info_query"]
            if use_info and t < steps - 1:  # the last step's decision reaches no step: not taken
                sent, log_prob = self._info_decision(out["info_logit"], info_policy, generator)
                decisions.append(sent)
                log_probs.append(log_prob)
            predictions.append(out["next_state"])
            masks.append(out["mask"])
            probs.append(out["route_probs"])
            highs.append([o["start_logits_high"] for o in out["slm_outputs"]])
            if rollout:
                past, current = current, out["next_state"]
        predicted = torch.stack(predictions)  # [steps, B, D]
        target = states[:, 1 : steps + 1].transpose(0, 1)
        batch = states.shape[0]
        losses = self.loss_terms(
            predicted,
            target,
            torch.stack(probs),
            [torch.stack(per_slm) for per_slm in zip(*highs, strict=True)],
        )
        return {
            "predictions": predicted.transpose(0, 1),
            "masks": torch.stack(masks, dim=1),
            "losses": losses,
            "total_loss": losses["total_loss"],
            "next_state_loss": losses["next_state_loss"],
            "sequence_mse": (predicted - target).pow(2).mean(dim=(0, 2)),
            "info_sent": torch.stack(decisions, dim=1) if decisions else states.new_zeros(batch, 0),
            "info_log_prob": torch.stack(log_probs, dim=1).sum(1) if log_probs else states.new_zeros(batch),
        }

    @staticmethod
    def _info_decision(logit: torch.Tensor, policy: str, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
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
    (directory / CHECKPOINT_CONFIG).write_text(json.dumps({"configs": system.configs(), **(extra or {})}, indent=2))
    return directory


def load_system(directory: str | Path) -> LeWorldSystem:
    directory = Path(directory)
    spec = json.loads((directory / CHECKPOINT_CONFIG).read_text())
    system = LeWorldSystem.from_configs(spec["configs"])
    system.load_state_dict(load_file(str(directory / CHECKPOINT_WEIGHTS)))
    return system
