"""LeWorld's two kinds of model: the small model (SLM) that picks what to read (`AddressHead`: high byte, low
byte, range length) and the big model (BLM) that routes the SLMs' reads (`Router`), predicts the next
state and asks for information (the info query and its gate)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from carl_assets.leworld.data import DatasetSettings
from carl_assets.leworld.memory import BYTE, MemoryConfig
from carl_assets.leworld.sizes import DEFAULT_SIZES, ArchitectureSettings

_DATA = DatasetSettings()  # the state and characteristics sizes' defaults are the dataset's
INFO_GATE_BIAS = 2.0  # initial logit of sending the info query: ask by default until phase 3 learns otherwise


@dataclass
class SLMConfig:
    """Sizes of a small model."""

    state_dim: int = _DATA.state_dim
    char_dim: int = _DATA.char_dim
    d_model: int = DEFAULT_SIZES.slm_d_model


@dataclass
class BLMConfig:
    """Sizes of the big model and how many SLMs it routes."""

    state_dim: int = _DATA.state_dim
    d_model: int = DEFAULT_SIZES.blm_d_model
    n_slms: int = DEFAULT_SIZES.n_slms
    info_dim: int = DEFAULT_SIZES.info_dim
    init_temperature: float = 1.0


def component_configs(sizes: ArchitectureSettings, num_words: int, word_size: int, state_dim: int,
                      char_dim: int) -> tuple[MemoryConfig, SLMConfig, BLMConfig]:
    """The memory, SLM and BLM configs of `sizes` for a memory of `num_words` × `word_size` bits and data
    of `state_dim`-sized states and `char_dim`-sized characteristics (ValueError from `MemoryConfig`
    outside two address bytes)."""
    return (
        MemoryConfig(num_words, word_size, sizes.max_read_range, sizes.encoding_dim),
        SLMConfig(state_dim, char_dim, sizes.slm_d_model),
        BLMConfig(state_dim, sizes.blm_d_model, sizes.n_slms, sizes.info_dim),
    )


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


def slm_features(
    past_state: torch.Tensor, current_state: torch.Tensor, characteristics: torch.Tensor
) -> torch.Tensor:
    """What an SLM sees: past, current, their difference (the recent change) and the characteristics."""
    return torch.cat([past_state, current_state, current_state - past_state, characteristics], dim=-1)


class SmallLeWorldModel(nn.Module):
    """Where to read: address logits and hard choices, a hidden state and a confidence."""

    def __init__(self, config: SLMConfig, memory_config: MemoryConfig):
        super().__init__()
        self.config = config
        d_in = 3 * config.state_dim + config.char_dim
        self.input = nn.Linear(d_in, config.d_model)
        self.body = nn.Sequential(
            nn.LayerNorm(config.d_model), nn.GELU(), nn.Linear(config.d_model, config.d_model), nn.GELU()
        )
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

    def from_features(
        self, features: torch.Tensor, modulation: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        h = self.input(features)
        if modulation is not None:  # the BLM's info request from the previous step
            h = h + modulation
        hidden = self.body(h)
        out = self.address_head(hidden)
        out["hidden"] = hidden
        out["confidence"] = torch.sigmoid(self.confidence_head(hidden)).squeeze(-1)
        return out


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
    """Routes the SLMs' reads, predicts the next state (residually) and forms the info query and its gate."""

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
