"""CARL — Coherence-Aware Reinforcement Learning: the order parameter, the rewards and the gates.

The order parameter of a next-token distribution P over a vocabulary of size V is

    Phi = 1 - H(P) / log V        (0 = uniform, "chaos"; 1 = a delta, "crystal")

and three reward signals are read from the Phi sequence of a completion:

1. multiscale coherence: is Phi consistent within dyadic blocks at every scale?
2. cloud quality: is the selected token both likely and drawn from a peaked distribution?
3. discontinuity: do the jumps in Phi (|dPhi| > 0.03) go from exploration to commitment?

    R = 0.5 * multiscale + 0.3 * cloud_quality + 0.2 * discontinuity

Three implementations compute the same numbers:

- `carl_reward(logits, token_ids)`: numpy, one sequence, the seed's semantics exactly (population
  std, trimmed blocks, ``min(floor(log2 T) + 1, 16)`` scales, the thresholds, the 0.5 defaults).
- `carl_reward_batch(logits, token_ids, attention_mask)`: torch, a right-padded ``[B, T, V]`` batch,
  vectorised over tokens (a loop over at most 16 scales only).
- `carl_reward_from_stats(entropy, selected_logprob, attention_mask, vocab_size)`: from per-token
  entropy and log P(selected token) only, which `token_stats_from_hidden` computes by running the LM
  head over tiles of positions x vocabulary with an online log-sum-exp, so memory grows with B*T and
  no ``[B, T, V]`` tensor is ever held. This is the path `make_carl_reward_fn` uses inside TRL's GRPO.
  It uses the exact entropy ``-sum p log p``; the seed's ``log(p + 1e-10)`` moves Phi by at most
  ``V * 1e-10 / log V`` (3e-7 at V = 32k).

Sequence-level maths in torch runs in float64, so threshold comparisons (|dPhi| > 0.03, Phi < 0.5,
Phi > 0.7) agree with numpy; with float32 logits the per-token Phi carries float32 rounding (~1e-7).

Empty sequences (T = 0): the seed's per-component defaults apply (multiscale 0.5, cloud quality 0.0,
discontinuity 0.5, so R = 0.35), and phi_mean / phi_std / entropy_mean are reported as 0.0 rather
than the NaN of a mean over nothing — the seed's agent step also treats an empty completion as
phi_mean = 0.0, which the coherence gate turns into an abstention.

The gates: `coherence_gate` (act only when Phi >= sigma) and `PhaseTransitionGate` (a transformers
callback that stops SFT once token accuracy crystallizes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

# ============================================================================================
# Constants — the conservation law T* = kappa * d, with kappa * sigma = 4
# ============================================================================================

KAPPA = 64 / 3  # 21.333... conservation constant
SIGMA = 3 / 16  # 0.1875: the semantic quantum (minimum meaningful signal)
KAPPA_SIGMA = 4.0  # bits per embedding dimension (exact)
DEFECT_THRESHOLD = 0.03  # minimum |delta Phi| for a discontinuity event

WEIGHTS = {"multiscale": 0.5, "cloud_quality": 0.3, "discontinuity": 0.2}
MAX_SCALES = 16
_ENTROPY_EPS = 1e-10  # the seed's log(p + 1e-10); kept everywhere so all paths agree
COMPONENT_KEYS = ("multiscale", "cloud_quality", "discontinuity", "phi_mean", "phi_std", "entropy_mean")


def t_star(d: int) -> int:
    """Natural decompression boundary for embedding dimension d: ``int(KAPPA * d)``.

    Triadic dimensions (d = 3 * 2^k) give a power of two: T*(384) = 8192, T*(768) = 16384,
    T*(3072) = 65536.
    """
    return int(KAPPA * d)


# ============================================================================================
# numpy, one sequence — the seed's semantics
# ============================================================================================


def _check_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D [T, V], got shape {logits.shape}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    if logits.shape[1] < 2:
        raise ValueError(f"the vocabulary needs at least 2 entries (log V > 0), got V={logits.shape[1]}")
    if np.isnan(logits).any() or np.isposinf(logits).any():
        raise ValueError("logits contain NaN or +inf")
    if logits.shape[0] and not np.isfinite(logits.max(axis=-1)).all():
        raise ValueError("a row of logits is entirely -inf")
    return logits


def _check_token_ids(token_ids: np.ndarray, length: int, vocab_size: int) -> np.ndarray:
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 1:
        raise ValueError(f"token_ids must be 1-D [T], got shape {token_ids.shape}")
    if token_ids.size and not np.issubdtype(token_ids.dtype, np.integer):
        raise ValueError(f"token_ids must be integers, got dtype {token_ids.dtype}")
    if len(token_ids) < length:
        raise ValueError(f"token_ids has {len(token_ids)} entries but logits have {length} positions")
    used = token_ids[:length]
    if used.size and (used.min() < 0 or used.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got range [{used.min()}, {used.max()}]")
    return used.astype(np.int64, copy=False)


def compute_phi(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order parameter from logits ``[T, V]``: returns ``(phi, probs, entropy)``, shapes [T], [T, V], [T].

    ``Phi_t = 1 - H(P_t) / log V`` with ``H = -sum p log(p + 1e-10)`` (the seed's epsilon), computed in
    the logits' dtype.
    """
    logits = _check_logits(logits)
    log_vocab = math.log(logits.shape[1])
    shifted = logits - logits.max(axis=-1, keepdims=True)  # stable softmax
    exp = np.exp(shifted)
    probs = exp / exp.sum(axis=-1, keepdims=True)
    entropy = -np.sum(probs * np.log(probs + _ENTROPY_EPS), axis=-1)
    phi = 1.0 - entropy / log_vocab
    return phi, probs, entropy


def _num_scales(length: int) -> int:
    """The seed's ``min(int(log2 T) + 1, 16)``; with exact integer log2 (bit length)."""
    return min(int(length).bit_length(), MAX_SCALES) if length >= 1 else 0


def multiscale_coherence(phi: np.ndarray) -> float:
    """Is Phi consistent across dyadic block scales?

    Scale j cuts Phi into ``T // 2^j`` whole blocks of 2^j (the tail is trimmed) and scores
    ``clip(1 - mean(population std within blocks), 0, 1)``; scales j = 0 .. min(floor(log2 T), 15) are
    averaged with weights ``2^(j/2)``. Fewer than 2 tokens: 0.5.
    """
    phi = np.asarray(phi)
    length = len(phi)
    if length < 2:
        return 0.5
    total_weight = 0.0
    weighted_sum = 0.0
    for j in range(_num_scales(length)):
        block = 2**j
        n_blocks = length // block
        blocks = phi[: n_blocks * block].reshape(n_blocks, block)
        coherence = max(0.0, min(1.0, 1.0 - float(np.mean(np.std(blocks, axis=1)))))
        weight = 2 ** (j / 2)
        weighted_sum += weight * coherence
        total_weight += weight
    return weighted_sum / total_weight


def cloud_quality(phi: np.ndarray, probs: np.ndarray, token_ids: np.ndarray) -> float:
    """``mean(P(selected token) * Phi)``: confident correctness, not lucky correctness. Empty: 0.0."""
    length = len(phi)
    if length == 0:
        return 0.0
    probs = np.asarray(probs)
    ids = _check_token_ids(token_ids, length, probs.shape[1])
    selected = probs[np.arange(length), ids]
    return float(np.mean(selected * phi))


def discontinuity_score(phi: np.ndarray) -> float:
    """Do jumps in Phi happen at the right places?

    Each ``|dPhi| > 0.03`` is an event. A rise (commitment) scores 0.8 from Phi < 0.5, else 0.3; a fall
    (dissolution) scores 0.2 from Phi > 0.7, else 0.5. The mean over events; 0.5 with no events or
    fewer than 2 tokens.
    """
    phi = np.asarray(phi)
    if len(phi) < 2:
        return 0.5
    delta = np.diff(phi)
    prev = phi[:-1]
    event = np.abs(delta) > DEFECT_THRESHOLD
    if not event.any():
        return 0.5
    commit = delta > DEFECT_THRESHOLD
    scores = np.where(commit, np.where(prev < 0.5, 0.8, 0.3), np.where(prev > 0.7, 0.2, 0.5))
    return float(scores[event].mean())


def carl_reward(logits: np.ndarray, token_ids: np.ndarray) -> tuple[float, dict[str, float]]:
    """CARL composite reward of one sequence: ``logits[t]`` is the distribution that produced ``token_ids[t]``.

    ``R = 0.5 * multiscale + 0.3 * cloud_quality + 0.2 * discontinuity``; returns ``(R, components)``
    with components multiscale, cloud_quality, discontinuity, phi_mean, phi_std (population),
    entropy_mean. Raises ``ValueError`` on bad shapes, NaN logits or ids outside the vocabulary.
    """
    logits = _check_logits(logits)
    _check_token_ids(token_ids, logits.shape[0], logits.shape[1])
    phi, probs, entropy = compute_phi(logits)
    ms = multiscale_coherence(phi)
    cq = cloud_quality(phi, probs, token_ids)
    ds = discontinuity_score(phi)
    composite = WEIGHTS["multiscale"] * ms + WEIGHTS["cloud_quality"] * cq + WEIGHTS["discontinuity"] * ds
    empty = len(phi) == 0
    return float(composite), {
        "multiscale": float(ms),
        "cloud_quality": float(cq),
        "discontinuity": float(ds),
        "phi_mean": 0.0 if empty else float(np.mean(phi)),
        "phi_std": 0.0 if empty else float(np.std(phi)),
        "entropy_mean": 0.0 if empty else float(np.mean(entropy)),
    }


# ============================================================================================
# torch, batched — same numbers, no Python loop over tokens
# ============================================================================================


class TokenStats(NamedTuple):
    """Per-token statistics that are all CARL needs: entropy and log P(selected token)."""

    entropy: Any  # torch.Tensor, leading shape of the positions
    selected_logprob: Any  # torch.Tensor, same shape
    vocab_size: int


def _stat_dtype(device: Any) -> Any:
    import torch

    return torch.float32 if getattr(device, "type", "cpu") == "mps" else torch.float64


def _logits_stats(logits: Any, ids: Any) -> tuple[Any, Any]:
    """Entropy (seed's epsilon) and log P(ids) for logits ``[n, V]``; reuses the logits buffer when allowed."""
    import torch

    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    selected = (logits.gather(-1, ids.unsqueeze(-1)) - lse).squeeze(-1)
    probs = logits.sub_(lse).exp_() if not logits.requires_grad else (logits - lse).exp()
    plogp = (probs + _ENTROPY_EPS).log_().mul_(probs)
    entropy = -plogp.sum(dim=-1)
    return entropy, selected


def token_stats_from_logits(logits: Any, token_ids: Any) -> TokenStats:
    """Entropy and log P(selected) from full logits ``[..., V]`` (bf16/fp16 are upcast to float32)."""
    import torch

    with torch.no_grad():
        flat = logits.reshape(-1, logits.shape[-1])
        ids = token_ids.reshape(-1).to(device=flat.device, dtype=torch.long)
        vocab = flat.shape[-1]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab})")
        work = flat.float() if flat.dtype not in (torch.float32, torch.float64) else flat.clone()
        entropy, selected = _logits_stats(work, ids)
    shape = logits.shape[:-1]
    return TokenStats(entropy.reshape(shape), selected.reshape(shape), vocab)


DEFAULT_TILE_ELEMENTS = 1 << 21  # logits per tile: 8 MB in float32 (two such buffers are live)
DEFAULT_ROW_CHUNK = 4096  # positions per chunk when the LM head is a plain weight


def token_stats_from_hidden(hidden: Any, lm_head: Any, token_ids: Any, chunk_size: int | None = None,
                            softcap: float | None = None, logit_scale: float = 1.0,
                            tile_elements: int = DEFAULT_TILE_ELEMENTS) -> TokenStats:
    """Entropy and log P(selected) per position, never holding more than a tile of logits.

    ``hidden`` is ``[..., H]``: the final-normed hidden states of the positions that PREDICT
    ``token_ids`` (same leading shape). ``lm_head`` is the output embedding: an ``nn.Linear`` or a
    ``[V, H]`` weight tensor, whose logits are computed tile by tile — ``chunk_size`` positions (default
    up to 4096) times as many vocabulary rows as fit ``tile_elements`` — and combined with an online
    log-sum-exp, so memory is O(N + tile) instead of O(N * V) and the matmul keeps a large M. Any other
    callable ``[n, H] -> [n, V]`` is run over chunks of ``chunk_size`` positions (default: what fits
    ``tile_elements``). ``softcap`` applies Gemma-2-style final logit soft-capping, ``logit_scale``
    multiplies the logits.

    The entropy here is the exact ``-sum p log p``; the seed's ``log(p + 1e-10)`` differs from it by at
    most ``V * 1e-10`` nats (Phi by ``V * 1e-10 / log V``: 3e-7 at V = 32k), far inside float32 noise.
    """
    import torch

    leading = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids = token_ids.reshape(-1).to(device=flat.device, dtype=torch.long)
    if ids.shape[0] != flat.shape[0]:
        raise ValueError(f"{ids.shape[0]} token ids for {flat.shape[0]} hidden positions")
    weight, bias = _linear_parts(lm_head)
    with torch.no_grad():
        if weight is not None:
            vocab = int(weight.shape[0])
            _check_ids(ids, vocab)
            rows = chunk_size or DEFAULT_ROW_CHUNK
            parts = [_tiled_stats(flat[r0 : r0 + rows], ids[r0 : r0 + rows], weight, bias, softcap, logit_scale,
                                  tile_elements) for r0 in range(0, flat.shape[0], rows)]
        else:
            vocab = int(lm_head(flat[:1] if flat.shape[0] else flat.new_zeros(1, flat.shape[-1])).shape[-1])
            _check_ids(ids, vocab)
            rows = chunk_size or max(1, tile_elements // vocab)
            parts = []
            for r0 in range(0, flat.shape[0], rows):
                logits = _as_float(lm_head(flat[r0 : r0 + rows]))
                if logit_scale != 1.0:
                    logits = logits * logit_scale
                if softcap:
                    logits = torch.tanh(logits / softcap).mul_(softcap)
                parts.append(_finish([_tile_moments(logits, ids[r0 : r0 + rows], 0)]))
        if parts:
            entropy = torch.cat([p[0] for p in parts])
            selected = torch.cat([p[1] for p in parts])
        else:
            entropy = torch.zeros(0, dtype=_stat_dtype(flat.device), device=flat.device)
            selected = entropy.clone()
    return TokenStats(entropy.reshape(leading), selected.reshape(leading), vocab)


def _linear_parts(lm_head: Any) -> tuple[Any, Any]:
    import torch

    if isinstance(lm_head, torch.Tensor):
        return lm_head, None
    if type(lm_head) is torch.nn.Linear:  # exactly Linear: subclasses (quantized, LoRA) run as modules
        return lm_head.weight, lm_head.bias
    return None, None


def _check_ids(ids: Any, vocab: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab})")


def _as_float(logits: Any) -> Any:
    import torch

    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _tile_moments(logits: Any, ids: Any, offset: int, exp_out: Any = None) -> tuple[Any, Any, Any, Any, Any]:
    """Per-row moments of one vocabulary tile, which is overwritten: (max, sum e, sum e*(l - max),
    selected logit or NaN, whether the selected token lies in this tile), with e = exp(l - max)."""
    import torch

    rows = torch.arange(logits.shape[0], device=logits.device)
    local = ids - offset
    inside = (local >= 0) & (local < logits.shape[1])
    selected = logits[rows, local.clamp(0, logits.shape[1] - 1)]
    peak = logits.amax(dim=-1, keepdim=True)
    shifted = logits.sub_(peak)
    exp = torch.exp(shifted) if exp_out is None else torch.exp(shifted, out=exp_out)
    total = exp.sum(dim=-1)
    weighted = shifted.mul_(exp).sum(dim=-1)  # sum e * (l - max), in place: cheaper than a bmm
    return peak.reshape(-1), total, weighted, selected, inside


def _finish(tiles: list[tuple[Any, Any, Any, Any, Any]]) -> tuple[Any, Any]:
    """Combine tile moments (in float64) into entropy and log P(selected) per row.

    With M the global max, S = sum_t s_t e^(m_t - M) and D = sum_t e^(m_t - M) (u_t + (m_t - M) s_t) =
    sum e^(l - M) (l - M): H = log S - D / S and log P(id) = l_id - M - log S. No cancellation: both
    terms of H are non-negative.
    """
    import torch

    dtype = _stat_dtype(tiles[0][0].device)
    peaks = torch.stack([t[0] for t in tiles]).to(dtype)
    top = peaks.amax(dim=0)
    scale = torch.exp(peaks - top)
    totals = torch.stack([t[1] for t in tiles]).to(dtype)
    weighted = torch.stack([t[2] for t in tiles]).to(dtype)
    norm = (scale * totals).sum(dim=0)
    dev = (scale * (weighted + (peaks - top) * totals)).sum(dim=0)
    entropy = torch.log(norm) - dev / norm
    inside = torch.stack([t[4] for t in tiles])
    chosen = torch.stack([t[3] for t in tiles]).to(dtype)
    # the selected logit was read before the tile was shifted; pick it from its tile
    selected_logit = torch.where(inside, chosen, torch.zeros_like(chosen)).sum(dim=0)
    selected = selected_logit - top - torch.log(norm)
    return entropy, selected


def _tiled_stats(hidden: Any, ids: Any, weight: Any, bias: Any, softcap: float | None, logit_scale: float,
                 tile_elements: int) -> tuple[Any, Any]:
    import torch

    n, vocab = hidden.shape[0], weight.shape[0]
    cols = tile_elements // max(1, n)
    if cols >= 512:  # keep the matmul's N a multiple of 256: odd widths run ~1.5x slower on CPU
        cols = cols // 256 * 256
    cols = max(1, min(vocab, cols))
    same_dtype = hidden.dtype in (torch.float32, torch.float64) and weight.dtype == hidden.dtype
    buffer = torch.empty((n, cols), dtype=hidden.dtype if same_dtype else torch.float32, device=hidden.device)
    exp_buffer = torch.empty_like(buffer)  # the two tiles that are ever live
    tiles = []
    for v0 in range(0, vocab, cols):
        w = weight[v0 : v0 + cols]
        logits = buffer[:, : w.shape[0]]
        if same_dtype:
            torch.matmul(hidden, w.T, out=logits)
        else:
            logits.copy_(hidden @ w.T.to(hidden.dtype))
        if bias is not None:
            logits.add_(bias[v0 : v0 + cols].to(logits.dtype))
        if logit_scale != 1.0:
            logits.mul_(logit_scale)
        if softcap:
            logits.div_(softcap).tanh_().mul_(softcap)
        tiles.append(_tile_moments(logits, ids, v0, exp_buffer[:, : w.shape[0]]))
    return _finish(tiles)


def _lengths_from_mask(attention_mask: Any) -> Any:
    """Lengths of right-padded rows; raises if a mask is not a prefix of ones."""
    import torch

    mask = attention_mask.to(torch.bool)
    lengths = mask.sum(dim=-1)
    positions = torch.arange(mask.shape[-1], device=mask.device)
    if not torch.equal(mask, positions.unsqueeze(0) < lengths.unsqueeze(-1)):
        raise ValueError("attention_mask must be right-padded (ones first, then zeros) in every row")
    return lengths


def carl_reward_from_stats(entropy: Any, selected_logprob: Any, attention_mask: Any,
                           vocab_size: int) -> tuple[Any, dict[str, Any]]:
    """CARL rewards of a right-padded batch from per-token entropy and log P(selected), ``[B, T]`` each.

    Same numbers as `carl_reward` row by row. Sequence-level maths runs in float64 (float32 on MPS):
    it is O(B*T) and keeps threshold comparisons identical to the numpy path. Returns ``(rewards[B],
    components)`` with each component a ``[B]`` tensor.
    """
    import torch

    if entropy.ndim != 2 or selected_logprob.shape != entropy.shape or attention_mask.shape != entropy.shape:
        raise ValueError("entropy, selected_logprob and attention_mask must all be [B, T]")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    dtype = _stat_dtype(entropy.device)
    lengths = _lengths_from_mask(attention_mask.to(entropy.device))
    valid = torch.arange(entropy.shape[1], device=entropy.device).unsqueeze(0) < lengths.unsqueeze(-1)
    validf = valid.to(dtype)
    ent = entropy.to(dtype).masked_fill(~valid, 0.0)
    phi = (1.0 - ent / math.log(vocab_size)).masked_fill(~valid, 0.0)
    p_sel = selected_logprob.to(dtype).exp().masked_fill(~valid, 0.0)
    count = lengths.to(dtype)
    denom = count.clamp(min=1.0)
    nonempty = lengths > 0

    phi_mean = phi.sum(-1) / denom
    phi_std = (((phi - phi_mean.unsqueeze(-1)) ** 2) * validf).sum(-1).div(denom).sqrt()
    entropy_mean = ent.sum(-1) / denom
    cloud = (p_sel * phi).sum(-1) / denom  # 0.0 when empty (the seed's default)
    multiscale = _multiscale_batch(phi, lengths)
    discontinuity = _discontinuity_batch(phi, lengths)
    rewards = (WEIGHTS["multiscale"] * multiscale + WEIGHTS["cloud_quality"] * cloud
               + WEIGHTS["discontinuity"] * discontinuity)
    zero = torch.zeros_like(phi_mean)
    return rewards, {
        "multiscale": multiscale,
        "cloud_quality": cloud,
        "discontinuity": discontinuity,
        "phi_mean": torch.where(nonempty, phi_mean, zero),
        "phi_std": torch.where(nonempty, phi_std, zero),
        "entropy_mean": torch.where(nonempty, entropy_mean, zero),
    }


def _multiscale_batch(phi: Any, lengths: Any) -> Any:
    """Vectorised `multiscale_coherence` over right-padded rows (phi is 0 beyond each length)."""
    import torch

    batch, width = phi.shape
    weighted = torch.zeros(batch, dtype=phi.dtype, device=phi.device)
    total = torch.zeros_like(weighted)
    for j in range(MAX_SCALES):
        block = 2**j
        if block > width:
            break
        n_blocks = width // block
        blocks = phi[:, : n_blocks * block].reshape(batch, n_blocks, block)
        std = (blocks - blocks.mean(-1, keepdim=True)).pow(2).mean(-1).sqrt()  # population std
        whole = lengths // block  # blocks that fit entirely inside each row (the seed trims the tail)
        in_row = torch.arange(n_blocks, device=phi.device).unsqueeze(0) < whole.unsqueeze(-1)
        mean_std = (std * in_row).sum(-1) / whole.clamp(min=1).to(phi.dtype)
        coherence = (1.0 - mean_std).clamp(0.0, 1.0)
        active = (whole >= 1).to(phi.dtype)  # scale j exists iff 2^j <= T (and j < 16)
        weight = 2 ** (j / 2)
        weighted += weight * coherence * active
        total += weight * active
    return torch.where(lengths >= 2, weighted / total.clamp(min=1e-300), torch.full_like(weighted, 0.5))


def _discontinuity_batch(phi: Any, lengths: Any) -> Any:
    """Vectorised `discontinuity_score` with masks over the valid deltas of each row."""
    import torch

    if phi.shape[1] < 2:
        return torch.full((phi.shape[0],), 0.5, dtype=phi.dtype, device=phi.device)
    delta = phi[:, 1:] - phi[:, :-1]
    prev = phi[:, :-1]
    valid = torch.arange(delta.shape[1], device=phi.device).unsqueeze(0) < (lengths - 1).unsqueeze(-1)
    event = valid & (delta.abs() > DEFECT_THRESHOLD)
    commit = delta > DEFECT_THRESHOLD
    one = torch.ones_like(prev)
    scores = torch.where(commit, torch.where(prev < 0.5, 0.8 * one, 0.3 * one),
                         torch.where(prev > 0.7, 0.2 * one, 0.5 * one))
    n_events = event.sum(-1)
    mean = (scores * event).sum(-1) / n_events.clamp(min=1).to(phi.dtype)
    return torch.where(n_events > 0, mean, torch.full_like(mean, 0.5))


def carl_reward_batch(logits: Any, token_ids: Any, attention_mask: Any) -> tuple[Any, dict[str, Any]]:
    """CARL rewards of a right-padded batch: logits ``[B, T, V]``, token ids and mask ``[B, T]``.

    ``logits[b, t]`` is the distribution that produced ``token_ids[b, t]``. Same numbers as
    `carl_reward` row by row (padding positions are ignored, whatever their values). Returns
    ``(rewards[B], components)``; see `carl_reward_from_stats`.
    """
    import torch

    if logits.ndim != 3 or token_ids.shape != logits.shape[:2] or attention_mask.shape != logits.shape[:2]:
        raise ValueError("logits must be [B, T, V] and token_ids / attention_mask [B, T]")
    if logits.shape[-1] < 2:
        raise ValueError(f"the vocabulary needs at least 2 entries, got V={logits.shape[-1]}")
    valid = attention_mask.to(device=logits.device, dtype=torch.bool)
    ids = token_ids.to(device=logits.device, dtype=torch.long).masked_fill(~valid, 0)  # padding may be -100
    stats = token_stats_from_logits(logits, ids)
    return carl_reward_from_stats(stats.entropy, stats.selected_logprob, attention_mask, stats.vocab_size)


# ============================================================================================
# Gates
# ============================================================================================


def coherence_gate(phi_mean: float, threshold: float = SIGMA) -> tuple[bool, str]:
    """Should the agent act? Returns ``(should_act, level)``: high >= 0.8, medium >= 0.5, low >= threshold,
    otherwise abstain (Phi below sigma is sub-semantic noise). NaN abstains."""
    if phi_mean >= 0.8:
        return True, "high"
    if phi_mean >= 0.5:
        return True, "medium"
    if phi_mean >= threshold:
        return True, "low"
    return False, "abstain"


class _PhaseTransitionGate:
    """Detects crystallization during training and stops it.

    Fires once, when ``min_above`` of the last ``window`` logged ``mean_token_accuracy`` values reach
    ``threshold`` (default: 3 of the last 5 at >= 0.99), which is robust to single-batch noise. It then
    sets ``control.should_training_stop``. Logs without ``mean_token_accuracy`` (evaluation logs, the
    final summary) are skipped — the seed counted them as accuracy 0. The peak of the logged
    ``entropy`` (whenever present) and its step are tracked too. TRL's SFT averages the accuracy over
    ``logging_steps``, so use ``logging_steps=1``.

    Attributes after training: ``triggered``, ``trigger_step`` (-1 if not), ``window_values`` (the
    window at the trigger), ``peak_entropy``, ``peak_entropy_step``, ``history`` (one dict per log
    with the accuracy: step, mean_token_accuracy, entropy).
    """

    def __init__(self, threshold: float = 0.99, window: int = 5, min_above: int = 3) -> None:
        if window < 1 or not 1 <= min_above <= window:
            raise ValueError(f"need 1 <= min_above <= window, got min_above={min_above}, window={window}")
        self.threshold = threshold
        self.window = window
        self.min_above = min_above
        self._recent: list[float] = []
        self.triggered = False
        self.trigger_step = -1
        self.window_values: list[float] = []
        self.peak_entropy = 0.0
        self.peak_entropy_step = -1
        self.history: list[dict[str, Any]] = []

    def check(self, value: float, entropy: float | None = None, step: int = 0) -> bool:
        """Record one accuracy value (and entropy); True exactly once, at the step the gate fires."""
        self.track_entropy(entropy, step)
        self._recent.append(float(value))
        if len(self._recent) > self.window:
            self._recent.pop(0)
        if self.triggered or len(self._recent) < self.min_above:
            return False
        if sum(1 for v in self._recent if v >= self.threshold) >= self.min_above:
            self.triggered = True
            self.trigger_step = step
            self.window_values = list(self._recent)
            return True
        return False

    def track_entropy(self, entropy: float | None, step: int) -> None:
        if entropy is not None and entropy > self.peak_entropy:
            self.peak_entropy = float(entropy)
            self.peak_entropy_step = step

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> Any:
        if not logs:
            return control
        step = int(getattr(state, "global_step", 0))
        entropy = logs.get("entropy")
        if "mean_token_accuracy" not in logs:
            self.track_entropy(entropy, step)
            return control
        accuracy = float(logs["mean_token_accuracy"])
        self.history.append({"step": step, "mean_token_accuracy": accuracy,
                             "entropy": None if entropy is None else float(entropy)})
        if self.check(accuracy, entropy, step):
            control.should_training_stop = True
        return control

    def summary(self) -> dict[str, Any]:
        """One record of the run's gate: for a `crystallization_events` row."""
        return {
            "triggered": self.triggered,
            "trigger_step": self.trigger_step,
            "window_values": list(self.window_values),
            "peak_entropy": self.peak_entropy,
            "peak_entropy_step": self.peak_entropy_step,
            "threshold": self.threshold,
            "window": self.window,
            "min_above": self.min_above,
        }


def _phase_transition_gate_class() -> type:
    """`PhaseTransitionGate` is a transformers `TrainerCallback`; importing transformers costs seconds,
    so the class is made on first access (the CLI's maths commands never pay for it)."""
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - transformers is a dependency
        TrainerCallback = object
    cls = type("PhaseTransitionGate", (_PhaseTransitionGate, TrainerCallback),
               {"__doc__": _PhaseTransitionGate.__doc__, "__module__": __name__})
    cls.__qualname__ = "PhaseTransitionGate"
    return cls


def __getattr__(name: str) -> Any:  # PEP 562: module attributes made on first access
    if name == "PhaseTransitionGate":
        cls = globals()["PhaseTransitionGate"] = _phase_transition_gate_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ============================================================================================
# TRL GRPO reward function
# ============================================================================================


@dataclass
class CompletionScores:
    """Per completion: the reward (0.0 when skipped), its components (None when skipped) and the reason
    it was skipped (None when scored)."""

    rewards: list[float]
    components: list[dict[str, float] | None]
    reasons: list[str | None]


def _prompt_ids(tokenizer: Any, prompt: Any, chat_template_kwargs: dict[str, Any]) -> list[int]:
    """Token ids of a prompt, as TRL's GRPO builds them: chat template + generation prompt, or plain text."""
    if isinstance(prompt, list):  # conversational: a list of {"role", "content"} messages
        encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, **chat_template_kwargs)
        ids = encoded["input_ids"]
    else:
        ids = tokenizer(text=str(prompt))["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def _lm_head_parts(model: Any) -> tuple[Any, Any, float | None, float]:
    """(decoder stack giving final-normed hidden states, output embedding, soft-cap, logit scale) of a
    causal LM, or Nones when the model has no separable LM head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = None
    if hasattr(model, "get_decoder"):
        try:
            decoder = model.get_decoder()
        except Exception:  # some exotic models raise here
            decoder = None
    if decoder is None or decoder is model or head is None:
        return None, None, None, 1.0
    config = getattr(model, "config", None)
    scale = 1.0
    if isinstance(getattr(config, "logit_scale", None), (int, float)):  # Cohere multiplies
        scale *= float(config.logit_scale)
    if isinstance(getattr(config, "logits_scaling", None), (int, float)):  # Granite divides
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return decoder, head, (float(softcap) if softcap else None), scale


def _vocab_size(model: Any) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.ndim == 2:
        return int(weight.shape[0])
    return None


def score_completions(model: Any, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                      pad_token_id: int = 0, chunk_size: int | None = None) -> CompletionScores:
    """CARL of each completion given its prompt, in ONE batched no-grad forward pass.

    Sequences are ``prompt + completion[:-1]`` (the last token predicts nothing we score), right-padded.
    The hidden state at position ``len(prompt) - 1 + t`` predicts completion token t (the alignment of
    the seed's agent step); only those positions go through the LM head, in vocabulary tiles. The
    model's train/eval mode is restored afterwards. Every prompt needs at least one token.
    """
    import torch

    n = len(completion_ids)
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (the one that predicts the first completion token)")
    rewards = [0.0] * n
    components: list[dict[str, float] | None] = [None] * n
    reasons: list[str | None] = [None] * n
    rows = [i for i in range(n) if len(completion_ids[i]) > 0]
    for i in range(n):
        if not completion_ids[i]:
            reasons[i] = "empty completion"
    if not rows:
        return CompletionScores(rewards, components, reasons)

    device = next(model.parameters()).device
    vocab = _vocab_size(model)
    if vocab is not None:
        for i in list(rows):
            if min(completion_ids[i]) < 0 or max(completion_ids[i]) >= vocab:
                reasons[i] = f"token id outside the vocabulary [0, {vocab})"
                rows.remove(i)
        if not rows:
            return CompletionScores(rewards, components, reasons)
    seqs = [list(prompt_ids[i]) + list(completion_ids[i])[:-1] for i in rows]
    starts = [len(prompt_ids[i]) - 1 for i in rows]  # position predicting the first completion token
    comp_lens = [len(completion_ids[i]) for i in rows]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, seq in enumerate(seqs):
        input_ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[r, : len(seq)] = 1
    max_comp = max(comp_lens)
    comp = torch.zeros((len(rows), max_comp), dtype=torch.long)
    comp_mask = torch.zeros((len(rows), max_comp), dtype=torch.long)
    for r, i in enumerate(rows):
        comp[r, : comp_lens[r]] = torch.tensor(list(completion_ids[i]), dtype=torch.long)
        comp_mask[r, : comp_lens[r]] = 1
    # flat indices of the predicting positions, [B, C] (padding entries point at position 0, masked later)
    offsets = torch.arange(max_comp).unsqueeze(0) + torch.tensor(starts).unsqueeze(-1)
    flat_index = (offsets + (torch.arange(len(rows)) * width).unsqueeze(-1)) * comp_mask
    picked = comp_mask.reshape(-1).bool()

    decoder, lm_head, softcap, scale = _lm_head_parts(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            input_ids, attention = input_ids.to(device), attention.to(device)
            idx = flat_index.reshape(-1)[picked].to(device)
            ids = comp.reshape(-1)[picked].to(device)
            if decoder is not None:
                hidden = decoder(input_ids=input_ids, attention_mask=attention, use_cache=False)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden.last_hidden_state
                selected_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
                del hidden
                stats = token_stats_from_hidden(selected_hidden, lm_head, ids, chunk_size=chunk_size,
                                                softcap=softcap, logit_scale=scale)
            else:  # no separable LM head: full logits (memory B*T*V), same numbers
                logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
                stats = token_stats_from_logits(logits.reshape(-1, logits.shape[-1]).index_select(0, idx), ids)
                del logits
    finally:
        model.train(was_training)

    mask = comp_mask.to(stats.entropy.device)
    entropy = torch.zeros(mask.shape, dtype=stats.entropy.dtype, device=mask.device)
    logprob = torch.zeros_like(entropy)
    entropy.view(-1)[picked.to(mask.device)] = stats.entropy
    logprob.view(-1)[picked.to(mask.device)] = stats.selected_logprob
    batch_rewards, batch_components = carl_reward_from_stats(entropy, logprob, mask, stats.vocab_size)
    finite = torch.isfinite(batch_rewards)
    for key in batch_components.values():
        finite &= torch.isfinite(key)
    values = batch_rewards.tolist()
    comps = {k: v.tolist() for k, v in batch_components.items()}
    finite_list = finite.tolist()
    for r, i in enumerate(rows):
        if not finite_list[r]:
            reasons[i] = "non-finite logits"
            continue
        rewards[i] = float(values[r])
        components[i] = {k: float(comps[k][r]) for k in COMPONENT_KEYS}
    return CompletionScores(rewards, components, reasons)


def make_carl_reward_fn(model: Any, tokenizer: Any, *, chunk_size: int | None = None,
                        chat_template_kwargs: dict[str, Any] | None = None,
                        metric_prefix: str = "carl") -> Callable[..., list[float]]:
    """A TRL GRPO reward function: the CARL composite of each completion under ``model``.

    The returned ``carl(prompts, completions, completion_ids=None, log_metric=None, **kwargs)`` re-scores
    all completions of a step in one batched no-grad forward pass: each prompt is re-tokenised as TRL's
    GRPO does (the chat template with the generation prompt for conversational prompts, the tokenizer
    for plain strings), followed by the completion's own token ids (``completion_ids``, as generated).
    It scores the positions that PREDICT the completion tokens: the hidden state at ``len(prompt) - 1 +
    t`` against completion token t. This follows the seed's agent step; the seed's reward function
    instead tokenised the completion text alone and paired logits[t] with token t, one position off
    (it scored the distribution of the token after). The decoder stack (``model.get_decoder()``) runs
    once over the right-padded batch; only the predicting positions go through the LM head, in
    vocabulary tiles (`token_stats_from_hidden`), so no ``[B, T, V]`` tensor is built (memory grows with
    B*T). Models without a separable LM head fall back to a full forward (same numbers, more memory). Rewards are not rounded
    (the seed rounded to 4 decimals, which flattens GRPO's advantages).

    Empty completions and non-finite results get 0.0 and a logged warning with the reason. The model's
    train/eval mode is restored. If TRL passes ``log_metric``, the component means over the scored
    completions are logged as ``carl/multiscale``, ``carl/cloud_quality``, ``carl/discontinuity``,
    ``carl/phi_mean`` (plus ``carl/zeroed``, the fraction scored 0.0 for a reason); with TRL's
    ``log_extra``, each completion's phi mean goes into the completions table as ``carl_phi_mean``. The function's
    ``__name__`` is "carl", so TRL's reward columns read ``rewards/carl/mean``. Without
    ``completion_ids`` (called outside TRL), the completion text is tokenised without special tokens.
    The last call's per-completion components are kept on ``carl.last_components``.
    """
    template_kwargs = dict(chat_template_kwargs or {})
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:  # any id will do: padding is masked out and never scored
        pad_id = eos if eos is not None else 0
    fallback_start = [t for t in (bos, eos, pad_id) if t is not None][:1]  # context for an empty prompt

    def carl(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None,
             log_metric: Callable[[str, float], None] | None = None,
             log_extra: Callable[[str, list[Any]], None] | None = None, **kwargs: Any) -> list[float]:
        if completion_ids is None:
            completion_ids = [tokenizer(text=_completion_text(c), add_special_tokens=False)["input_ids"]
                              for c in completions]
        if len(prompts) != len(completion_ids):
            raise ValueError(f"{len(prompts)} prompts but {len(completion_ids)} completions")
        cache: dict[str, list[int]] = {}
        prompt_ids = []
        for prompt in prompts:
            key = repr(prompt)
            if key not in cache:
                cache[key] = _prompt_ids(tokenizer, prompt, template_kwargs) or list(fallback_start)
            prompt_ids.append(cache[key])
        comp_ids = [[int(t) for t in c] for c in completion_ids]
        scored = score_completions(model, prompt_ids, comp_ids, pad_token_id=pad_id, chunk_size=chunk_size)
        for i, reason in enumerate(scored.reasons):
            if reason is not None:
                logger.warning("CARL reward 0.0 for completion %d of %d: %s", i, len(comp_ids), reason)
        carl.last_components = scored.components
        if log_metric is not None:
            kept = [c for c in scored.components if c is not None]
            for key in ("multiscale", "cloud_quality", "discontinuity", "phi_mean"):
                if kept:
                    log_metric(f"{metric_prefix}/{key}", float(np.mean([c[key] for c in kept])))
            log_metric(f"{metric_prefix}/zeroed", sum(r is not None for r in scored.reasons) / max(1, len(comp_ids)))
        if log_extra is not None:  # per-completion columns of TRL's completions table
            log_extra(f"{metric_prefix}_phi_mean", [None if c is None else c["phi_mean"] for c in scored.components])
        return scored.rewards

    carl.__name__ = "carl"
    carl.__qualname__ = "carl"
    carl.last_components = []
    return carl


def _completion_text(completion: Any) -> str:
    if isinstance(completion, list):  # conversational: the last message's content
        return str(completion[-1]["content"]) if completion else ""
    return str(completion)
