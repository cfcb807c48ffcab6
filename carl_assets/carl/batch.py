"""CARL in torch, batched: the same numbers as `carl_assets.carl.carl_reward`, no Python loop over tokens.

- `carl_reward_batch(logits, token_ids, attention_mask)`: a right-padded ``[B, T, V]`` batch.
- `carl_reward_from_stats(entropy, selected_logprob, attention_mask, vocab_size)`: from per-token
  entropy and log P(selected token) only, which `token_stats_from_hidden` computes over tiles of the
  LM head (an online log-sum-exp), so no ``[B, T, V]`` tensor is held.

See `carl_assets.carl` for the maths and the precision notes. torch is imported inside the functions,
so importing this module stays cheap.

Non-finite logits: a -inf logit is an impossible token (masked decoding) and is handled exactly. A
position whose logits hold NaN or +inf, or are all -inf, has no distribution: with
``nonfinite="raise"`` (the default) these functions raise ``ValueError`` naming the first such
position; with ``nonfinite="nan"`` its statistics (and the reward of its sequence) are NaN, for a
caller that handles them row by row (`make_carl_reward_fn` gives such a completion 0.0 and a warning).
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

from carl_assets.carl.coherence import _ENTROPY_EPS, DEFECT_THRESHOLD, MAX_SCALES, WEIGHTS

# ============================================================================================
# torch, batched — same numbers, no Python loop over tokens
# ============================================================================================


NonFinite = Literal["raise", "nan"]


def _check_nonfinite_mode(nonfinite: str) -> None:
    if nonfinite not in ("raise", "nan"):
        raise ValueError(f"nonfinite must be 'raise' or 'nan', got {nonfinite!r}")


def _first_bad_position(entropy: Any, selected: Any, valid: Any = None) -> tuple[int, ...] | None:
    """Index (in the leading shape) of the first position whose statistics are NaN, or None."""
    import torch

    bad = torch.isnan(entropy) | torch.isnan(selected) | torch.isposinf(selected)
    if valid is not None:
        bad &= valid
    if not bool(bad.any()):
        return None
    flat = int(torch.nonzero(bad.reshape(-1))[0])
    return tuple(int(i) for i in _unravel(flat, tuple(entropy.shape)))


def _unravel(index: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for size in reversed(shape):
        index, rem = divmod(index, size)
        out.append(rem)
    return out[::-1]


def _describe_row(row_logits: Any) -> str:
    """What is wrong with one position's logits: the first NaN / +inf, or all -inf."""
    import torch

    bad = torch.isnan(row_logits) | torch.isposinf(row_logits)
    if bool(bad.any()):
        v = int(torch.nonzero(bad)[0])
        return f"vocabulary index {v} is {float(row_logits[v])} ({int(bad.sum())} NaN/+inf in the row)"
    if not bool(torch.isfinite(row_logits).any()):
        return "every logit is -inf: no token is possible"
    return "its statistics are not finite"


def _raise_nonfinite(position: tuple[int, ...], row_logits: Any) -> None:
    where = ", ".join(str(i) for i in position)
    raise ValueError(f"logits at position [{where}] are not a distribution: {_describe_row(row_logits)}; "
                     "logits must be finite or -inf")


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


def token_stats_from_logits(logits: Any, token_ids: Any, nonfinite: NonFinite = "raise") -> TokenStats:
    """Entropy and log P(selected) from full logits ``[..., V]`` (bf16/fp16 are upcast to float32).

    -inf logits are impossible tokens; a position with NaN / +inf logits or all -inf raises
    ``ValueError`` naming it, or with ``nonfinite="nan"`` gets NaN statistics (see the module notes)."""
    import torch

    _check_nonfinite_mode(nonfinite)
    with torch.no_grad():
        flat = logits.reshape(-1, logits.shape[-1])
        ids = token_ids.reshape(-1).to(device=flat.device, dtype=torch.long)
        vocab = flat.shape[-1]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab})")
        work = flat.float() if flat.dtype not in (torch.float32, torch.float64) else flat.clone()
        entropy, selected = _logits_stats(work, ids)
        if nonfinite == "raise" and (bad := _first_bad_position(entropy, selected)) is not None:
            _raise_nonfinite(tuple(_unravel(bad[0], tuple(logits.shape[:-1]))), flat[bad[0]])
    shape = logits.shape[:-1]
    return TokenStats(entropy.reshape(shape), selected.reshape(shape), vocab)


DEFAULT_TILE_ELEMENTS = 1 << 21  # logits per tile: 8 MB in float32 (two such buffers are live)
DEFAULT_ROW_CHUNK = 4096  # positions per chunk when the LM head is a plain weight


def token_stats_from_hidden(hidden: Any, lm_head: Any, token_ids: Any, chunk_size: int | None = None,
                            softcap: float | None = None, logit_scale: float = 1.0,
                            tile_elements: int = DEFAULT_TILE_ELEMENTS, nonfinite: NonFinite = "raise") -> TokenStats:
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

    -inf logits are impossible tokens; a position with NaN / +inf logits or all -inf raises
    ``ValueError`` naming it, or with ``nonfinite="nan"`` gets NaN statistics (see the module notes).
    """
    import torch

    _check_nonfinite_mode(nonfinite)
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
        if nonfinite == "raise" and (bad := _first_bad_position(entropy, selected)) is not None:
            row = flat[bad[0] : bad[0] + 1]  # recompute that one position's logits to say what is wrong
            if weight is not None:
                row_logits = _as_float(row @ weight.T.to(row.dtype))
                if bias is not None:
                    row_logits = row_logits + bias.to(row_logits.dtype)
            else:
                row_logits = _as_float(lm_head(row))
            row_logits = row_logits * logit_scale
            if softcap:
                row_logits = torch.tanh(row_logits / softcap) * softcap
            _raise_nonfinite(tuple(_unravel(bad[0], tuple(leading))), row_logits[0])
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
    # a tile whose row is all -inf (a masked stretch of the vocabulary): shift by 0, so that e = 0
    # there instead of exp(-inf - -inf) = NaN
    shift = torch.where(torch.isneginf(peak), torch.zeros_like(peak), peak)
    shifted = logits.sub_(shift)
    exp = torch.exp(shifted) if exp_out is None else torch.exp(shifted, out=exp_out)
    total = exp.sum(dim=-1)
    product = shifted.mul_(exp)  # e * (l - max), in place: cheaper than a bmm
    weighted = product.sum(dim=-1)
    # a -inf logit makes -inf * 0 = NaN in its product, but contributes 0: re-sum those rows without it
    # (NaN / +inf logits make `total` NaN, which still marks the row)
    broken = torch.isnan(weighted) & ~torch.isnan(total)
    if bool(broken.any()):
        weighted = torch.where(broken, product.nan_to_num(nan=0.0).sum(dim=-1), weighted)
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
    terms = scale * (weighted + (peaks - top) * totals)
    # an all -inf tile (total 0, peak -inf) adds nothing; `== 0` keeps a NaN total's NaN
    dev = torch.where(totals == 0, torch.zeros_like(terms), terms).sum(dim=0)
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
                           vocab_size: int, nonfinite: NonFinite = "raise") -> tuple[Any, dict[str, Any]]:
    """CARL rewards of a right-padded batch from per-token entropy and log P(selected), ``[B, T]`` each.

    Same numbers as `carl_reward` row by row. Sequence-level maths runs in float64 (float32 on MPS):
    it is O(B*T) and keeps threshold comparisons identical to the numpy path. Returns ``(rewards[B],
    components)`` with each component a ``[B]`` tensor. Padding positions are ignored whatever their
    values. A log P(selected) of -inf (an impossible token) is valid; a NaN or infinite entropy, or a NaN
    / +inf log P, at a real position raises ``ValueError`` naming ``[b, t]`` (``nonfinite="raise"``) or
    makes that row's reward and components NaN (``nonfinite="nan"``).
    """
    import torch

    _check_nonfinite_mode(nonfinite)
    if entropy.ndim != 2 or selected_logprob.shape != entropy.shape or attention_mask.shape != entropy.shape:
        raise ValueError("entropy, selected_logprob and attention_mask must all be [B, T]")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    dtype = _stat_dtype(entropy.device)
    lengths = _lengths_from_mask(attention_mask.to(entropy.device))
    valid = torch.arange(entropy.shape[1], device=entropy.device).unsqueeze(0) < lengths.unsqueeze(-1)
    broken = valid & (~torch.isfinite(entropy) | torch.isnan(selected_logprob) | torch.isposinf(selected_logprob))
    if nonfinite == "raise" and bool(broken.any()):
        b, t = (int(i) for i in torch.nonzero(broken)[0])
        raise ValueError(f"position [{b}, {t}] has entropy {float(entropy[b, t])} and log P(selected) "
                         f"{float(selected_logprob[b, t])}: CARL needs a finite entropy and a log P that is finite "
                         "or -inf (NaN or +inf logits upstream?)")
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
    components = {
        "multiscale": multiscale,
        "cloud_quality": cloud,
        "discontinuity": discontinuity,
        "phi_mean": torch.where(nonempty, phi_mean, zero),
        "phi_std": torch.where(nonempty, phi_std, zero),
        "entropy_mean": torch.where(nonempty, entropy_mean, zero),
    }
    # a row with a broken position is NaN throughout: thresholds on NaN compare false and would
    # otherwise turn it into a plausible-looking number (multiscale clamps NaN into [0, 1])
    row_broken = broken.any(dim=-1)
    nan = torch.full_like(rewards, float("nan"))
    return torch.where(row_broken, nan, rewards), {k: torch.where(row_broken, nan, v) for k, v in components.items()}


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


def carl_reward_batch(logits: Any, token_ids: Any, attention_mask: Any,
                      nonfinite: NonFinite = "raise") -> tuple[Any, dict[str, Any]]:
    """CARL rewards of a right-padded batch: logits ``[B, T, V]``, token ids and mask ``[B, T]``.

    ``logits[b, t]`` is the distribution that produced ``token_ids[b, t]``. Same numbers as
    `carl_reward` row by row (padding positions are ignored, whatever their values). Returns
    ``(rewards[B], components)``; see `carl_reward_from_stats`. -inf logits are impossible tokens; NaN /
    +inf logits, or all -inf, at a real position raise ``ValueError`` naming ``[b, t]`` and the
    vocabulary index (``nonfinite="raise"``), or make that row NaN (``nonfinite="nan"``).
    """
    import torch

    if logits.ndim != 3 or token_ids.shape != logits.shape[:2] or attention_mask.shape != logits.shape[:2]:
        raise ValueError("logits must be [B, T, V] and token_ids / attention_mask [B, T]")
    if logits.shape[-1] < 2:
        raise ValueError(f"the vocabulary needs at least 2 entries, got V={logits.shape[-1]}")
    valid = attention_mask.to(device=logits.device, dtype=torch.bool)
    ids = token_ids.to(device=logits.device, dtype=torch.long).masked_fill(~valid, 0)  # padding may be -100
    _check_nonfinite_mode(nonfinite)
    stats = token_stats_from_logits(logits, ids, nonfinite="nan")  # padding may hold anything
    if nonfinite == "raise" and (bad := _first_bad_position(stats.entropy, stats.selected_logprob, valid)):
        _raise_nonfinite(bad, logits[bad])
    return carl_reward_from_stats(stats.entropy, stats.selected_logprob, attention_mask, stats.vocab_size,
                                  nonfinite=nonfinite)

