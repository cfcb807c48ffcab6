"""Ways to fill the LeWorld memory with bits, vectorised over all words (no loop per word).

Same layouts as the reference's `MemoryPopulator`:
- `random_bits`: every bit a fair coin.
- `structured_patterns`: four quarters — dynamics (a cyclic one-hot: word i has bit i mod W set),
  context (fixed pseudo-random bits per word), history (the word's index within the quarter in binary,
  low 16 bits), associations (XOR of the dynamics and context words at the same offset).
- `from_experience`: feature vectors thresholded at their own median, one per word.

The reference seeded the context quarter with `torch.manual_seed(i)` once per word (i.i.d. fair bits that do
not depend on the global RNG); here one dedicated `torch.Generator` draws the whole quarter at once:
the same distribution, deterministic, the global RNG untouched, but not the same bits.
`text_experiences` turns texts (e.g. memory-graph nodes) into feature vectors for `from_experience`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from carl_assets.leworld.architecture import ArtificialMemory
from carl_assets.runtime import torch_threads

REGIONS = ("dynamics", "context", "history", "associations")


def _generator(seed: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


def random_bits(memory: ArtificialMemory, seed: int | torch.Generator | None = 0) -> None:
    with torch.no_grad():
        bits = torch.randint(0, 2, memory.memory.shape, generator=_generator(seed))
        memory.memory.copy_(bits.to(memory.memory.dtype))


def structured_bits(
    num_words: int, word_size: int, seed: int | torch.Generator | None = 0, num_threads: int | None = 1
) -> torch.Tensor:
    """The structured layout as a `[num_words, word_size]` float tensor of 0/1 (built in uint8: one
    conversion at the end instead of one per region)."""
    with torch_threads(num_threads):
        n, w = num_words, word_size
        quarter = n // 4
        bits = torch.zeros(n, w, dtype=torch.uint8)
        idx = torch.arange(quarter, dtype=torch.int32)
        # Dynamics: one bit set, cycling through the word.
        bits[:quarter].scatter_(1, (idx.long() % w)[:, None], 1)
        # Context: fixed pseudo-random fair bits.
        bits[quarter : 2 * quarter].random_(0, 2, generator=_generator(seed))
        # History: binary counter in the low min(W, 16) bits.
        nbits = min(w, 16)
        bits[2 * quarter : 3 * quarter, :nbits] = (
            idx[:, None] >> torch.arange(nbits, dtype=torch.int32)[None, :]
        ) & 1
        # Associations: XOR of the dynamics and context words at i mod quarter (the reference's indexing,
        # which wraps to the start for the n mod 4 words after the fourth quarter).
        torch.bitwise_xor(bits[:quarter], bits[quarter : 2 * quarter], out=bits[3 * quarter : 4 * quarter])
        rest = n - 4 * quarter
        if rest:
            bits[4 * quarter :] = bits[:rest] ^ bits[quarter : quarter + rest]
        return bits.to(torch.float32)


def structured_patterns(memory: ArtificialMemory, seed: int | torch.Generator | None = 0) -> None:
    with torch.no_grad():
        cfg = memory.config
        memory.memory.copy_(structured_bits(cfg.num_words, cfg.word_size, seed))


def region_of(addresses: torch.Tensor, num_words: int) -> torch.Tensor:
    """Index (0..3) of the structured-patterns quarter an address lies in."""
    return (addresses.long() // (num_words // 4)).clamp(max=3)


def experience_bits(experiences: torch.Tensor, word_size: int) -> torch.Tensor:
    """Each feature row → bits: feature > that row's median (over the first `word_size` features);
    rows shorter than a word are zero-padded after thresholding, as in the reference."""
    feats = experiences[:, :word_size].float()
    bits = torch.zeros(experiences.shape[0], word_size)
    if feats.shape[0]:
        median = feats.median(dim=1, keepdim=True).values
        bits[:, : feats.shape[1]] = (feats > median).float()
    return bits


def from_experience(memory: ArtificialMemory, experiences: torch.Tensor, tile: bool = False) -> int:
    """Write one word per experience row (the first `num_words`). With `tile`, repeat the rows until the
    whole memory is filled (otherwise the rest stays as it was, as in the reference). Returns the number of
    experience rows used."""
    cfg = memory.config
    with torch.no_grad():
        bits = experience_bits(experiences[: cfg.num_words], cfg.word_size)
        if bits.shape[0] == 0:
            raise ValueError("from_experience needs at least one experience row")
        used = bits.shape[0]
        if tile:
            bits = bits[torch.arange(cfg.num_words) % used]
        memory.memory[: bits.shape[0]] = bits.to(memory.memory.dtype)
        return used


_TOKEN = re.compile(r"[\w']+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def text_experiences(texts: Sequence[str], feature_dim: int, seed: int = 0) -> torch.Tensor:
    """One feature row per sentence of each text: the sum of fixed random Gaussian vectors of its words
    (a random projection of the bag of words), so that thresholding at the median gives SimHash-like
    bits where similar sentences get similar words of memory."""
    sentences = [s for text in texts for s in _SENTENCE.split(str(text)) if _TOKEN.search(s)]
    tokens = [[t.lower() for t in _TOKEN.findall(s)] for s in sentences]
    vocab = {tok: i for i, tok in enumerate(sorted({t for ts in tokens for t in ts}))}
    if not vocab:
        return torch.zeros(0, feature_dim)
    rows = torch.tensor([i for i, ts in enumerate(tokens) for _ in ts])
    cols = torch.tensor([vocab[t] for ts in tokens for t in ts])
    projection = torch.randn(len(vocab), feature_dim, generator=_generator(seed))
    features = torch.zeros(len(sentences), feature_dim)
    features.index_add_(0, rows, projection[cols])
    return features


class MemoryPopulator:
    """The reference's populator class, vectorised (see the functions above)."""

    random_bits = staticmethod(random_bits)
    structured_patterns = staticmethod(structured_patterns)
    from_experience = staticmethod(from_experience)
