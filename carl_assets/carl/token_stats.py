"""Per-token statistics CARL needs (entropy and log P(selected token)) from logits or from hidden states.

`token_stats_from_hidden` computes them over tiles of the LM head with an online log-sum-exp, so no
``[B, T, V]`` tensor is held; `token_stats_from_logits` from full logits. Non-finite logits: see
`carl_assets.carl.batch`.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch

from carl_assets.carl.coherence import _ENTROPY_EPS

NonFinite = Literal["raise", "nan"]


def check_nonfinite_mode(nonfinite: str) -> None:
    if nonfinite not in ("raise", "nan"):
        raise ValueError(f"nonfinite must be 'raise' or 'nan', got {nonfinite!r}")


def first_bad_position(entropy: Any, selected: Any, valid: Any = None) -> tuple[int, ...] | None:
    """Index (in the leading shape) of the first position whose statistics are NaN, or None."""
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
    bad = torch.isnan(row_logits) | torch.isposinf(row_logits)
    if bool(bad.any()):
        v = int(torch.nonzero(bad)[0])
        return f"vocabulary index {v} is {float(row_logits[v])} ({int(bad.sum())} NaN/+inf in the row)"
    if not bool(torch.isfinite(row_logits).any()):
        return "every logit is -inf: no token is possible"
    return "its statistics are not finite"


def raise_nonfinite(position: tuple[int, ...], row_logits: Any) -> None:
    where = ", ".join(str(i) for i in position)
    raise ValueError(
        f"logits at position [{where}] are not a distribution: {_describe_row(row_logits)}; "
        "logits must be finite or -inf"
    )


class TokenStats(NamedTuple):
    """Per-token statistics that are all CARL needs: entropy and log P(selected token)."""

    entropy: Any  # torch.Tensor, leading shape of the positions
    selected_logprob: Any  # torch.Tensor, same shape
    vocab_size: int


def stat_dtype(device: Any) -> Any:
    return torch.float32 if getattr(device, "type", "cpu") == "mps" else torch.float64


def _logits_stats(logits: Any, ids: Any) -> tuple[Any, Any]:
    """Entropy (the reference's epsilon) and log P(ids) for logits ``[n, V]``; reuses the logits buffer
    when allowed."""
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
    check_nonfinite_mode(nonfinite)
    with torch.no_grad():
        flat = logits.reshape(-1, logits.shape[-1])
        ids = token_ids.reshape(-1).to(device=flat.device, dtype=torch.long)
        vocab = flat.shape[-1]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab})")
        work = flat.float() if flat.dtype not in (torch.float32, torch.float64) else flat.clone()
        entropy, selected = _logits_stats(work, ids)
        if nonfinite == "raise" and (bad := first_bad_position(entropy, selected)) is not None:
            raise_nonfinite(tuple(_unravel(bad[0], tuple(logits.shape[:-1]))), flat[bad[0]])
    shape = logits.shape[:-1]
    return TokenStats(entropy.reshape(shape), selected.reshape(shape), vocab)


DEFAULT_TILE_ELEMENTS = 1 << 21  # logits per tile: 8 MB in float32 (two such buffers are live)
DEFAULT_ROW_CHUNK = 4096  # positions per chunk when the LM head is a plain weight


def token_stats_from_hidden(
    hidden: Any,
    lm_head: Any,
    token_ids: Any,
    chunk_size: int | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    tile_elements: int = DEFAULT_TILE_ELEMENTS,
    nonfinite: NonFinite = "raise",
) -> TokenStats:
    """Entropy and log P(selected) per position, never holding more than a tile of logits.

    ``hidden`` is ``[..., H]``: the final-normed hidden states of the positions that PREDICT
    ``token_ids`` (same leading shape). ``lm_head`` is the output embedding: an ``nn.Linear`` or a
    ``[V, H]`` weight tensor, whose logits are computed tile by tile — ``chunk_size`` positions (default
    up to 4096) times as many vocabulary rows as fit ``tile_elements`` — and combined with an online
    log-sum-exp, so memory is O(N + tile) instead of O(N * V) and the matmul keeps a large M. Any other
    callable ``[n, H] -> [n, V]`` is run over chunks of ``chunk_size`` positions (default: what fits
    ``tile_elements``). ``softcap`` applies Gemma-2-style final logit soft-capping, ``logit_scale``
    multiplies the logits.

    The entropy here is the exact ``-sum p log p``; the reference's ``log(p + 1e-10)`` differs from it by at
    most ``V * 1e-10`` nats (Phi by ``V * 1e-10 / log V``: 3e-7 at V = 32k), far inside float32 noise.

    -inf logits are impossible tokens; a position with NaN / +inf logits or all -inf raises
    ``ValueError`` naming it, or with ``nonfinite="nan"`` gets NaN statistics (see the module notes).
    """
    check_nonfinite_mode(nonfinite)
    leading = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids = token_ids.reshape(-1).to(device=flat.device, dtype=torch.long)
    if ids.shape[0] != flat.shape[0]:
        raise ValueError(f"{ids.shape[0]} token ids for {flat.shape[0]} hidden positions")
    with torch.no_grad():
        parts, vocab = _chunked_stats(flat, ids, lm_head, chunk_size, softcap, logit_scale, tile_elements)
        if parts:
            entropy = torch.cat([p[0] for p in parts])
            selected = torch.cat([p[1] for p in parts])
        else:
            entropy = torch.zeros(0, dtype=stat_dtype(flat.device), device=flat.device)
            selected = entropy.clone()
        if nonfinite == "raise" and (bad := first_bad_position(entropy, selected)) is not None:
            # recompute that one position's logits to say what is wrong
            row_logits = _head_logits(flat[bad[0] : bad[0] + 1], lm_head, softcap, logit_scale)
            raise_nonfinite(tuple(_unravel(bad[0], tuple(leading))), row_logits[0])
    return TokenStats(entropy.reshape(leading), selected.reshape(leading), vocab)


def _chunked_stats(
    flat: Any,
    ids: Any,
    lm_head: Any,
    chunk_size: int | None,
    softcap: float | None,
    logit_scale: float,
    tile_elements: int,
) -> tuple[list[tuple[Any, Any]], int]:
    """(entropy, log P) per chunk of positions, and the vocabulary size: a plain weight in vocabulary
    tiles (`_tiled_stats`), any other head over whole-vocabulary chunks."""
    weight, bias = _linear_parts(lm_head)
    if weight is not None:
        vocab = int(weight.shape[0])
        _check_ids(ids, vocab)
        rows = chunk_size or DEFAULT_ROW_CHUNK
        return [
            _tiled_stats(
                flat[r0 : r0 + rows], ids[r0 : r0 + rows], weight, bias, softcap, logit_scale, tile_elements
            )
            for r0 in range(0, flat.shape[0], rows)
        ], vocab
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
    return parts, vocab


def _head_logits(row: Any, lm_head: Any, softcap: float | None, logit_scale: float) -> Any:
    """Float logits of a few positions through the whole head, scaled and soft-capped (for error messages)."""
    weight, bias = _linear_parts(lm_head)
    if weight is not None:
        row_logits = _as_float(row @ weight.T.to(row.dtype))
        if bias is not None:
            row_logits = row_logits + bias.to(row_logits.dtype)
    else:
        row_logits = _as_float(lm_head(row))
    row_logits = row_logits * logit_scale
    if softcap:
        row_logits = torch.tanh(row_logits / softcap) * softcap
    return row_logits


def _linear_parts(lm_head: Any) -> tuple[Any, Any]:
    if isinstance(lm_head, torch.Tensor):
        return lm_head, None
    if type(lm_head) is torch.nn.Linear:  # exactly Linear: subclasses (quantized, LoRA) run as modules
        return lm_head.weight, lm_head.bias
    return None, None


def _check_ids(ids: Any, vocab: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab})")


def _as_float(logits: Any) -> Any:
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _tile_moments(logits: Any, ids: Any, offset: int, exp_out: Any = None) -> tuple[Any, Any, Any, Any, Any]:
    """Per-row moments of one vocabulary tile, which is overwritten: (max, sum e, sum e*(l - max),
    selected logit or NaN, whether the selected token lies in this tile), with e = exp(l - max)."""
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
    dtype = stat_dtype(tiles[0][0].device)
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


def _tiled_stats(
    hidden: Any,
    ids: Any,
    weight: Any,
    bias: Any,
    softcap: float | None,
    logit_scale: float,
    tile_elements: int,
) -> tuple[Any, Any]:
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
