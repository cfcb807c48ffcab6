"""CARL in torch, batched: the same numbers as `carl_assets.carl.carl_reward`, no Python loop over tokens.

- `carl_reward_batch(logits, token_ids, attention_mask)`: a right-padded ``[B, T, V]`` batch.
- `carl_reward_from_stats(entropy, selected_logprob, attention_mask, vocab_size)`: from per-token
  entropy and log P(selected token) only, which `token_stats_from_hidden` computes over tiles of the
  LM head (an online log-sum-exp), so no ``[B, T, V]`` tensor is held.

See `carl_assets.carl` for the maths and the precision notes. The per-token statistics live in
`carl_assets.carl.token_stats` (re-exported here).

Non-finite logits: a -inf logit is an impossible token (masked decoding) and is handled exactly. A
position whose logits hold NaN or +inf, or are all -inf, has no distribution: with
``nonfinite="raise"`` (the default) these functions raise ``ValueError`` naming the first such
position; with ``nonfinite="nan"`` its statistics (and the reward of its sequence) are NaN, for a
caller that handles them row by row (`make_carl_reward_fn` gives such a completion 0.0 and a warning).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from carl_assets.carl.coherence import DEFECT_THRESHOLD, MAX_SCALES, WEIGHTS
from carl_assets.carl.token_stats import (
    NonFinite,
    TokenStats,
    check_nonfinite_mode,
    first_bad_position,
    raise_nonfinite,
    stat_dtype,
    token_stats_from_hidden,
    token_stats_from_logits,
)

__all__ = [
    "NonFinite",
    "TokenStats",
    "carl_reward_batch",
    "carl_reward_from_stats",
    "token_stats_from_hidden",
    "token_stats_from_logits",
]


def _lengths_from_mask(attention_mask: Any) -> Any:
    """Lengths of right-padded rows; raises if a mask is not a prefix of ones."""
    mask = attention_mask.to(torch.bool)
    lengths = mask.sum(dim=-1)
    positions = torch.arange(mask.shape[-1], device=mask.device)
    if not torch.equal(mask, positions.unsqueeze(0) < lengths.unsqueeze(-1)):
        raise ValueError("attention_mask must be right-padded (ones first, then zeros) in every row")
    return lengths


def carl_reward_from_stats(
    entropy: Any, selected_logprob: Any, attention_mask: Any, vocab_size: int, nonfinite: NonFinite = "raise"
) -> tuple[Any, dict[str, Any]]:
    """CARL rewards of a right-padded batch from per-token entropy and log P(selected), ``[B, T]`` each.

    Same numbers as `carl_reward` row by row. Sequence-level maths runs in float64 (float32 on MPS):
    it is O(B*T) and keeps threshold comparisons identical to the numpy path. Returns ``(rewards[B],
    components)`` with each component a ``[B]`` tensor. Padding positions are ignored whatever their
    values. A log P(selected) of -inf (an impossible token) is valid; a NaN or infinite entropy, or a NaN
    / +inf log P, at a real position raises ``ValueError`` naming ``[b, t]`` (``nonfinite="raise"``) or
    makes that row's reward and components NaN (``nonfinite="nan"``).
    """
    check_nonfinite_mode(nonfinite)
    if entropy.ndim != 2 or selected_logprob.shape != entropy.shape or attention_mask.shape != entropy.shape:
        raise ValueError("entropy, selected_logprob and attention_mask must all be [B, T]")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    dtype = stat_dtype(entropy.device)
    lengths = _lengths_from_mask(attention_mask.to(entropy.device))
    valid, broken = _broken_positions(entropy, selected_logprob, lengths, nonfinite)
    ent = entropy.to(dtype).masked_fill(~valid, 0.0)
    phi = (1.0 - ent / math.log(vocab_size)).masked_fill(~valid, 0.0)
    p_sel = selected_logprob.to(dtype).exp().masked_fill(~valid, 0.0)
    rewards, components = _rewards_and_components(ent, phi, p_sel, valid.to(dtype), lengths)
    # a row with a broken position is NaN throughout: thresholds on NaN compare false and would
    # otherwise turn it into a plausible-looking number (multiscale clamps NaN into [0, 1])
    row_broken = broken.any(dim=-1)
    nan = torch.full_like(rewards, float("nan"))
    return torch.where(row_broken, nan, rewards), {
        k: torch.where(row_broken, nan, v) for k, v in components.items()
    }


def _broken_positions(
    entropy: Any, selected_logprob: Any, lengths: Any, nonfinite: NonFinite
) -> tuple[Any, Any]:
    """`[B, T]` masks of the real positions and of those whose statistics are not usable; with
    `nonfinite="raise"`, ValueError naming the first broken one."""
    valid = torch.arange(entropy.shape[1], device=entropy.device).unsqueeze(0) < lengths.unsqueeze(-1)
    broken = valid & (
        ~torch.isfinite(entropy) | torch.isnan(selected_logprob) | torch.isposinf(selected_logprob)
    )
    if nonfinite == "raise" and bool(broken.any()):
        b, t = (int(i) for i in torch.nonzero(broken)[0])
        raise ValueError(
            f"position [{b}, {t}] has entropy {float(entropy[b, t])} and log P(selected) "
            f"{float(selected_logprob[b, t])}: CARL needs a finite entropy and a log P that is finite "
            "or -inf (NaN or +inf logits upstream?)"
        )
    return valid, broken


def _rewards_and_components(
    ent: Any, phi: Any, p_sel: Any, validf: Any, lengths: Any
) -> tuple[Any, dict[str, Any]]:
    """The reward `[B]` and its components from masked per-token entropy, Phi and P(selected) `[B, T]`."""
    denom = lengths.to(ent.dtype).clamp(min=1.0)
    nonempty = lengths > 0
    phi_mean = phi.sum(-1) / denom
    phi_std = (((phi - phi_mean.unsqueeze(-1)) ** 2) * validf).sum(-1).div(denom).sqrt()
    entropy_mean = ent.sum(-1) / denom
    cloud = (p_sel * phi).sum(-1) / denom  # 0.0 when empty (the reference's default)
    multiscale = _multiscale_batch(phi, lengths)
    discontinuity = _discontinuity_batch(phi, lengths)
    rewards = (
        WEIGHTS["multiscale"] * multiscale
        + WEIGHTS["cloud_quality"] * cloud
        + WEIGHTS["discontinuity"] * discontinuity
    )
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
        whole = lengths // block  # blocks that fit entirely inside each row (the reference trims the tail)
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
    if phi.shape[1] < 2:
        return torch.full((phi.shape[0],), 0.5, dtype=phi.dtype, device=phi.device)
    delta = phi[:, 1:] - phi[:, :-1]
    prev = phi[:, :-1]
    valid = torch.arange(delta.shape[1], device=phi.device).unsqueeze(0) < (lengths - 1).unsqueeze(-1)
    event = valid & (delta.abs() > DEFECT_THRESHOLD)
    commit = delta > DEFECT_THRESHOLD
    one = torch.ones_like(prev)
    scores = torch.where(
        commit, torch.where(prev < 0.5, 0.8 * one, 0.3 * one), torch.where(prev > 0.7, 0.2 * one, 0.5 * one)
    )
    n_events = event.sum(-1)
    mean = (scores * event).sum(-1) / n_events.clamp(min=1).to(phi.dtype)
    return torch.where(n_events > 0, mean, torch.full_like(mean, 0.5))


def carl_reward_batch(
    logits: Any, token_ids: Any, attention_mask: Any, nonfinite: NonFinite = "raise"
) -> tuple[Any, dict[str, Any]]:
    """CARL rewards of a right-padded batch: logits ``[B, T, V]``, token ids and mask ``[B, T]``.

    ``logits[b, t]`` is the distribution that produced ``token_ids[b, t]``. Same numbers as
    `carl_reward` row by row (padding positions are ignored, whatever their values). Returns
    ``(rewards[B], components)``; see `carl_reward_from_stats`. -inf logits are impossible tokens; NaN /
    +inf logits, or all -inf, at a real position raise ``ValueError`` naming ``[b, t]`` and the
    vocabulary index (``nonfinite="raise"``), or make that row NaN (``nonfinite="nan"``).
    """
    if logits.ndim != 3 or token_ids.shape != logits.shape[:2] or attention_mask.shape != logits.shape[:2]:
        raise ValueError("logits must be [B, T, V] and token_ids / attention_mask [B, T]")
    if logits.shape[-1] < 2:
        raise ValueError(f"the vocabulary needs at least 2 entries, got V={logits.shape[-1]}")
    valid = attention_mask.to(device=logits.device, dtype=torch.bool)
    ids = token_ids.to(device=logits.device, dtype=torch.long).masked_fill(~valid, 0)  # padding may be -100
    check_nonfinite_mode(nonfinite)
    stats = token_stats_from_logits(logits, ids, nonfinite="nan")  # padding may hold anything
    if nonfinite == "raise" and (bad := first_bad_position(stats.entropy, stats.selected_logprob, valid)):
        raise_nonfinite(bad, logits[bad])
    return carl_reward_from_stats(
        stats.entropy, stats.selected_logprob, attention_mask, stats.vocab_size, nonfinite=nonfinite
    )
