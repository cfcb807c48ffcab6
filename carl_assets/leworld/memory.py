"""LeWorld's artificial memory: `num_words` words (at most 65,536, addressed by a high and a low byte) of
`word_size` bits in a buffer, plus a learnable encoder of what is read (`read`, `encode_range`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from pydantic import Field, field_validator

from carl_assets.leworld.sizes import DEFAULT_SIZES
from carl_assets.settings import Settings

BYTE = 256  # the low byte of an address; the high byte has ceil(num_words / 256) values
POPULATORS = ("structured", "random", "experience")


class MemorySettings(Settings):
    """The memory's size and the populator that fills it (the leworld_memory asset's config inherits this
    class, so each is defined here only; `MemoryConfig` takes its size defaults from it). Raises ValueError
    (pydantic's ValidationError) for an unknown populator."""

    populator: str = Field(
        default="structured",
        description="how the memory is filled: 'structured' (the reference's four pattern quarters), "
        "'random' (fair coin bits) or 'experience' (the sentences of the memory graph's node texts, DuckDB "
        "memory_nodes)",
    )
    num_words: int = Field(default=65536, description="words of memory, 1,024..65,536 (two address bytes)")
    word_size: int = Field(default=32, description="bits per word")
    seed: int = Field(
        default=0, description="seed of the random bits / the context quarter / the text projection")

    @field_validator("populator")
    @classmethod
    def _known_populator(cls, value: Any) -> Any:
        if value not in POPULATORS:
            raise ValueError(f"unknown populator {value!r}: use structured, random or experience")
        return value


_DEFAULT_MEMORY = MemorySettings()


@dataclass
class MemoryConfig:
    """Size of the memory and of what a read encodes to; ValueError outside two address bytes."""

    num_words: int = _DEFAULT_MEMORY.num_words
    word_size: int = _DEFAULT_MEMORY.word_size
    max_read_range: int = DEFAULT_SIZES.max_read_range
    encoding_dim: int = DEFAULT_SIZES.encoding_dim

    def __post_init__(self) -> None:
        if not 1024 <= self.num_words <= BYTE * BYTE:
            raise ValueError(f"num_words must lie in [1024, 65536] (two address bytes), got {self.num_words}")
        if self.word_size < 1 or self.max_read_range < 1:
            raise ValueError("word_size and max_read_range must be positive")


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """Linear -> LayerNorm -> GELU -> Linear."""
    return nn.Sequential(
        nn.Linear(d_in, d_hidden), nn.LayerNorm(d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out)
    )


class ArtificialMemory(nn.Module):
    """Bits in a buffer (not trained by gradient: populators write them) and a learnable read encoder."""

    def __init__(self, config: MemoryConfig):
        super().__init__()
        self.config = config
        self.register_buffer("memory", torch.zeros(config.num_words, config.word_size))
        # The encoder sees the signed mean of the bits read and the fill fraction of the range.
        self.encoder = mlp(config.word_size + 1, config.encoding_dim, config.encoding_dim)
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
        ends = torch.minimum(ends.long(), starts + self.config.max_read_range).clamp(
            max=self.config.num_words
        )
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

    def read(
        self, starts: torch.Tensor, ends: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
