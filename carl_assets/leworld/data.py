"""Synthetic state-transition sequences whose dynamics depend on memory, generated all at once.

Reference semantics (`StateTransitionDataset`): per sequence, characteristics c ~ N(0, I_char), n_relevant
regions (easy 1, medium 2, hard 3) with start ~ U{0..num_words-256} and length ~ U{16..128}, x_0 ~ N(0, I),
and for t >= 1

    x_t = 0.8 x_{t-1} + 0.15 s + 0.05 c̃ + ε_t,   ε_t ~ N(0, 0.1² I)

where s is the region's mean bits mapped to [-1, 1] and tiled to state_dim, c̃ the tiled characteristics.
In the reference the time loop is re-run for every region, each run overwriting x_1.. with fresh noise, so
only the *last* region drives the dynamics (`mix="last"`, the default, same distribution as the reference);
`mix="mean"` uses the mean of all regions' s instead, so every relevant region matters.

No loop per sequence or per step: region means come from one `embedding_bag` over the regions' words,
and the linear
recurrence has the closed form

    x_t = a^t x_0 + b (1 - a^t) / (1 - a) + Σ_{k=1..t} a^{t-k} ε_k,   a = 0.8,  b = 0.15 s + 0.05 c̃,

i.e. one batched matrix product of a fixed [T, T+1] kernel with (x_0, b, ε_1, …, ε_{T-1}).

Cues (`cue`). In the reference (`cue="none"`) the relevant regions are drawn independently of everything a
model sees, so no SLM can know where to read and memory cannot help beyond chance. `cue="characteristics"`
writes each region's start address into the *signs* of the characteristics (region r owns dims
[r·B, (r+1)·B), bit j of the address's top B bits is the sign of dim r·B + j, low bit first), keeping
their magnitudes: every dim stays N(0, 1), the draws and the dynamics' formula are unchanged, but the
address is now a linear read-out of the characteristics. B = min(address bits, char_dim // n_relevant):
with 65,536 words and char_dim 32 that is the full 16-bit address for 1 or 2 regions, the top 10 bits
(the start within 64 words) for 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from carl_assets.runtime import torch_threads
from carl_assets.settings import Settings

DIFFICULTY = {"easy": 1, "medium": 2, "hard": 3}
MAX_RELEVANT = 3
DECAY, MEMORY_GAIN, CHAR_GAIN, NOISE_STD = 0.8, 0.15, 0.05, 0.1
MIN_LENGTH, MAX_LENGTH, START_MARGIN = 16, 128, 256
CUES = ("none", "characteristics")
TENSOR_KEYS = ("states", "characteristics", "relevant_starts", "relevant_ends", "n_relevant")
SPLITS = ("train", "validation")
MIXES = ("last", "mean")


class DatasetSettings(Settings):
    """The splits' sizes and the dynamics' difficulty, mix and cue (the leworld_dataset asset's config
    inherits this class, so each is defined here only; `generate_splits` draws them). Raises ValueError
    (pydantic's ValidationError) for an unknown difficulty, mix or cue."""

    num_train: int = Field(default=512, description="training sequences")
    num_validation: int = Field(default=128, description="validation sequences (all evaluation is on these)")
    seq_length: int = Field(default=20, description="time steps per sequence")
    state_dim: int = Field(default=64, description="size of the state vector")
    char_dim: int = Field(default=32, description="size of a sequence's fixed characteristics vector")
    difficulty: str = Field(
        default="medium", description="'easy', 'medium' or 'hard': 1, 2 or 3 relevant memory regions")
    mix: str = Field(
        default="last",
        description="'last': the reference (the last relevant region drives the dynamics); 'mean': every "
        "region does",
    )
    cue: str = Field(
        default="none",
        description="'none': the reference (regions drawn independently of anything a model sees, so memory "
        "cannot matter); 'characteristics': the characteristics' signs spell each region's start address in "
        "binary (magnitudes unchanged), so an SLM can find the region and memory can matter",
    )
    seed: int = Field(default=0, description="seed of the draws (train uses 2·seed, validation 2·seed + 1)")

    # Plain strings checked here rather than Literals: the error names the value and the choices.
    @field_validator("difficulty", "mix", "cue")
    @classmethod
    def _known_choice(cls, value: Any, info: Any) -> Any:
        choices = {"difficulty": tuple(DIFFICULTY), "mix": MIXES, "cue": CUES}[info.field_name]
        if value not in choices:
            raise ValueError(f"unknown {info.field_name} {value!r}: use one of {choices}")
        return value


def n_relevant_for(difficulty: str | int) -> int:
    if isinstance(difficulty, int):
        if not 1 <= difficulty <= MAX_RELEVANT:
            raise ValueError(f"difficulty must have 1..3 relevant regions, got {difficulty}")
        return difficulty
    if difficulty not in DIFFICULTY:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTY)} or 1..3, got {difficulty!r}")
    return DIFFICULTY[difficulty]


def tile_index(dim: int, width: int) -> torch.Tensor:
    """Indices that tile a `width` vector to `dim` entries (the reference's
    `.repeat(ceil(dim/width))[:dim]`)."""
    return torch.arange(dim) % width


def region_means(memory_bits: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Mean bits of memory[start:end] for every (start, end) at once, `[..., word_size]` (0 if empty).

    One `embedding_bag(mode="mean")` over the concatenated word indices of all regions: it reads only
    the words in the regions (no prefix sum over the whole memory), and a sum of 0/1 bits divided by the
    length rounds exactly as the reference's `.mean(dim=0)` does."""
    flat_starts, lengths = starts.reshape(-1).long(), (ends - starts).reshape(-1).long().clamp(min=0)
    offsets = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    # Word index of every position: start of its region + position within the region.
    words = torch.arange(total) - torch.repeat_interleave(offsets - flat_starts, lengths, output_size=total)
    means = F.embedding_bag(words, memory_bits.to(torch.float32), offsets, mode="mean")
    return means.view(*starts.shape, memory_bits.shape[1])


def transition_drive(
    memory_bits: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, state_dim: int, mix: str
) -> torch.Tensor:
    """s: `[N, state_dim]`, the memory term of the dynamics."""
    seeds = (region_means(memory_bits, starts, ends) * 2 - 1)[
        ..., tile_index(state_dim, memory_bits.shape[1])
    ]
    if mix == "last":
        return seeds[:, -1]
    if mix == "mean":
        return seeds.mean(dim=1)
    raise ValueError(f"mix must be 'last' (seed) or 'mean', got {mix!r}")


def address_bits(num_words: int) -> int:
    """Bits of the largest address (16 for 65,536 words)."""
    return max(1, (num_words - 1).bit_length())


def cue_bits(num_words: int, char_dim: int, n_relevant: int) -> int:
    """B, the address bits each region's cue carries (see the module docstring)."""
    bits = min(address_bits(num_words), char_dim // n_relevant)
    if bits < 1:
        raise ValueError(
            f"cue='characteristics' needs char_dim >= n_relevant ({n_relevant}) to spell any address bit, "
            f"got char_dim={char_dim}"
        )
    return bits


def cue_addresses(characteristics: torch.Tensor, starts: torch.Tensor, num_words: int) -> torch.Tensor:
    """Characteristics whose signs spell the top B bits of each region's start (magnitudes kept)."""
    n, n_rel = starts.shape
    bits = cue_bits(num_words, characteristics.shape[1], n_rel)
    code = starts.long() >> (address_bits(num_words) - bits)  # [N, n_rel]: the address's top bits
    digits = (code[..., None] >> torch.arange(bits)) & 1  # [N, n_rel, B], low bit first
    signs = (digits * 2 - 1).reshape(n, n_rel * bits).to(characteristics.dtype)
    cued = characteristics.clone()
    cued[:, : n_rel * bits] = characteristics[:, : n_rel * bits].abs() * signs
    return cued


def decode_cue(characteristics: torch.Tensor, n_relevant: int, num_words: int) -> torch.Tensor:
    """The inverse read-out: `[N, n_relevant]` addresses (the cued top bits, the rest zero)."""
    bits = cue_bits(num_words, characteristics.shape[1], n_relevant)
    digits = (characteristics[:, : n_relevant * bits] > 0).long().view(-1, n_relevant, bits)
    code = (digits << torch.arange(bits)).sum(-1)
    return code << (address_bits(num_words) - bits)


def recurrence_kernel(steps: int, decay: float = DECAY) -> torch.Tensor:
    """The `[T, T+1]` matrix K with states[t] = K[t] · (x_0, drive, ε_1, …, ε_{T-1}):
    K[t, 0] = a^t, K[t, 1] = Σ_{j<t} a^j, K[t, 1+k] = a^{t-k} for 1 <= k <= t (else 0)."""
    t = torch.arange(steps, dtype=torch.float64)
    powers = decay**t
    gain = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.float64), powers[:-1]]), 0)
    lag = t[:, None] - t[None, 1:]  # t - k for k = 1..T-1
    noise_part = torch.where(lag >= 0, decay ** lag.clamp(min=0), torch.zeros((), dtype=torch.float64))
    return torch.cat([powers[:, None], gain[:, None], noise_part], dim=1).to(torch.float32)


def evolve(x0: torch.Tensor, drive: torch.Tensor, noise: torch.Tensor, decay: float = DECAY) -> torch.Tensor:
    """Closed form of x_t = decay·x_{t-1} + drive + noise_t for all sequences and steps at once: one
    batched matrix product. x0 `[N, D]`, drive `[N, D]`, noise `[N, T-1, D]` → states `[N, T, D]`."""
    kernel = recurrence_kernel(noise.shape[1] + 1, decay).to(noise.dtype)
    inputs = torch.cat([x0[:, None, :], drive[:, None, :], noise], dim=1)
    return torch.matmul(kernel, inputs).contiguous()


@dataclass
class SequenceBatch:
    """All sequences of a split as tensors (`relevant_*` padded to 3 with zeros, as the reference's items)."""

    states: torch.Tensor  # [N, T, state_dim]
    characteristics: torch.Tensor  # [N, char_dim]
    relevant_starts: torch.Tensor  # [N, 3] int64
    relevant_ends: torch.Tensor  # [N, 3] int64
    n_relevant: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return self.states.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key).contiguous() for key in TENSOR_KEYS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> SequenceBatch:
        return cls(**{key: tensors[key] for key in TENSOR_KEYS})

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reference's batch dict for these rows."""
        return {key: getattr(self, key)[index] for key in TENSOR_KEYS}


def generate_sequences(
    memory_bits: torch.Tensor,
    num_sequences: int,
    seq_length: int,
    state_dim: int,
    char_dim: int,
    difficulty: str | int,
    generator: torch.Generator | int | None = 0,
    mix: str | None = None,
    num_threads: int | None = 1,
    cue: str | None = None,
) -> SequenceBatch:
    """Every sequence of a dataset at once; the same `generator` seed gives the same tensors. `mix` and
    `cue`: see `DatasetSettings` (None: its default, the reference's "last" and "none").

    `cue="characteristics"` makes the characteristics' signs spell the regions' addresses (the same
    draws otherwise: states, starts and lengths are those of `cue="none"` with the same generator, except
    that the characteristics' term of the dynamics follows the cued characteristics)."""
    defaults = DatasetSettings.model_fields
    mix = defaults["mix"].default if mix is None else mix
    cue = defaults["cue"].default if cue is None else cue
    if cue not in CUES:
        raise ValueError(f"cue must be one of {CUES}, got {cue!r}")
    with torch_threads(num_threads):
        return _generate(
            memory_bits, num_sequences, seq_length, state_dim, char_dim, difficulty, generator, mix, cue
        )


def _generate(
    memory_bits, num_sequences, seq_length, state_dim, char_dim, difficulty, generator, mix, cue
) -> SequenceBatch:
    if isinstance(generator, torch.Generator):
        gen = generator
    else:
        gen = torch.Generator().manual_seed(0 if generator is None else int(generator))
    num_words = memory_bits.shape[0]
    if num_words < START_MARGIN + 1:
        raise ValueError(f"memory needs more than {START_MARGIN} words, has {num_words}")
    n_rel = n_relevant_for(difficulty)
    chars = torch.randn(num_sequences, char_dim, generator=gen)
    starts = torch.randint(0, num_words - START_MARGIN + 1, (num_sequences, n_rel), generator=gen)
    lengths = torch.randint(MIN_LENGTH, MAX_LENGTH + 1, (num_sequences, n_rel), generator=gen)
    x0 = torch.randn(num_sequences, state_dim, generator=gen)
    noise = torch.empty(num_sequences, max(seq_length - 1, 0), state_dim).normal_(
        0.0, NOISE_STD, generator=gen
    )
    if cue == "characteristics":
        chars = cue_addresses(chars, starts, num_words)
    drive = MEMORY_GAIN * transition_drive(memory_bits, starts, starts + lengths, state_dim, mix)
    drive += CHAR_GAIN * chars[:, tile_index(state_dim, char_dim)]
    states = evolve(x0, drive, noise)
    pad = torch.zeros(num_sequences, MAX_RELEVANT - n_rel, dtype=torch.long)
    return SequenceBatch(
        states=states,
        characteristics=chars,
        relevant_starts=torch.cat([starts, pad], dim=1),
        relevant_ends=torch.cat([starts + lengths, pad], dim=1),
        n_relevant=torch.full((num_sequences,), n_rel, dtype=torch.long),
    )


def generate_splits(memory_bits: torch.Tensor, settings: DatasetSettings) -> dict[str, SequenceBatch]:
    """The train and validation splits (`SPLITS`) of `settings`, drawn with seeds 2·seed and 2·seed + 1
    from the memory's bits `[num_words, word_size]`."""
    sizes = {"train": settings.num_train, "validation": settings.num_validation}
    return {
        split: generate_sequences(
            memory_bits, sizes[split], settings.seq_length, settings.state_dim, settings.char_dim,
            settings.difficulty, settings.seed * 2 + i, settings.mix, cue=settings.cue,
        )
        for i, split in enumerate(SPLITS)
    }


def iterate_batches(
    data: SequenceBatch, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = True
):
    """Yield the reference's batch dicts (a shuffled DataLoader without the per-item Python overhead)."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        yield data.batch(order[i : i + batch_size])


class StateTransitionDataset(torch.utils.data.Dataset):
    """The reference's dataset class, generated vectorised: `DataLoader(StateTransitionDataset(...))` yields
    the reference's batches (states, characteristics, relevant_starts/ends padded to 3, n_relevant).

    `seed=None` draws the generator's seed from torch's global RNG, so `torch.manual_seed` governs it as
    it governed the reference's loops. `mix`, `cue`: as `generate_sequences` (None: `DatasetSettings`'
    default)."""

    def __init__(
        self,
        num_sequences: int,
        seq_length: int,
        state_dim: int,
        char_dim: int,
        memory: torch.nn.Module,
        difficulty: str,
        seed: int | None = None,
        mix: str | None = None,
        cue: str | None = None,
    ):
        self.num_sequences, self.seq_length, self.state_dim, self.char_dim = (
            num_sequences,
            seq_length,
            state_dim,
            char_dim,
        )
        self.memory = memory
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        self.data = generate_sequences(
            memory.memory, num_sequences, seq_length, state_dim, char_dim, difficulty, seed, mix, cue=cue
        )

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor | int]:
        item = {key: getattr(self.data, key)[idx] for key in TENSOR_KEYS}
        item["n_relevant"] = int(item["n_relevant"])
        return item
