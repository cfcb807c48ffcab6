"""Confidence scores of a completion: how sure the policy was of it, from the next-token distributions
that PREDICT its tokens (the distribution at position t-1 for token t; the prompt's last position for
the first token).

For completion tokens ``y_1 .. y_T``, the predicting distributions ``p_t`` over a vocabulary of size
``V`` and entropies ``H(p_t) = -sum_v p_t(v) log p_t(v)`` (nats):

- ``phi_mean = mean_t (1 - H(p_t) / log V)``: CARL's order parameter (the reference's `compute_phi`).
- ``neg_entropy = -mean_t H(p_t)``: the RENT reward (Prabhudesai et al. 2025, "Maximizing Confidence
  Alone Improves Reasoning").
- ``self_certainty = mean_t KL(U || p_t) = mean_t (-log V - (1/V) sum_v log p_t(v))``: the reward of
  Kang et al. 2025 ("Scalable Best-of-N Selection for Large Language Models via Self-Certainty") that
  INTUITOR trains on (Zhao et al. 2025, "Learning to Reason without External Rewards"). Unlike the
  entropy it grows without bound as p_t puts near-zero mass on tokens, so it weighs the tail.
- ``mean_logprob = mean_t log p_t(y_t)``: the likelihood of the tokens actually there.

``phi_mean`` and ``neg_entropy`` are the same ranking for one vocabulary (an affine map of each other);
both are kept because the field knows them by these names.

An empty completion (T = 0) scores what a uniform distribution would: phi_mean 0, neg_entropy -log V,
self_certainty 0, mean_logprob -log V. A reward that gave it 0.0 would rank silence above every real
answer on the two scores that are never positive.

`confidence_scores` is the numpy reference for one sequence; `confidence_from_stats` the batched torch
form from per-token statistics and a mask (any padding side: these are plain means over the masked
positions); `mean_vocab_logprob_from_hidden` computes ``(1/V) sum_v log p(v)`` from hidden states
through the LM head in row chunks, the one statistic the tiled CARL path (`token_stats_from_hidden`)
does not keep.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

CONFIDENCE_SCORES = ("phi_mean", "self_certainty", "neg_entropy", "mean_logprob")
DEFAULT_ROWS_PER_CHUNK = 256  # positions whose full logits are held at once (256 x 49k floats = 50 MB)


def empty_value(name: str, vocab_size: int) -> float:
    """The score of an empty completion: the value a uniform next-token distribution has."""
    if name not in CONFIDENCE_SCORES:
        raise ValueError(f"unknown confidence score {name!r} (known: {', '.join(CONFIDENCE_SCORES)})")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    return -math.log(vocab_size) if name in ("neg_entropy", "mean_logprob") else 0.0


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def confidence_scores(logits: np.ndarray, token_ids: np.ndarray) -> dict[str, float]:
    """The four scores of one completion: ``logits[t]`` ``[T, V]`` is the distribution that predicted
    ``token_ids[t]``. numpy, float64, exact entropy (a zero probability adds nothing). Raises
    ``ValueError`` on bad shapes, ids outside the vocabulary or non-finite logits."""
    logits = np.asarray(logits, dtype=np.float64)
    token_ids = np.asarray(token_ids)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [T, V] with V >= 2, got shape {logits.shape}")
    if token_ids.shape != (logits.shape[0],):
        raise ValueError(f"token_ids must be [T] = [{logits.shape[0]}], got shape {token_ids.shape}")
    if not np.isfinite(logits).all():
        raise ValueError("logits must be finite")
    vocab = logits.shape[1]
    if logits.shape[0] == 0:
        return {name: empty_value(name, vocab) for name in CONFIDENCE_SCORES}
    if token_ids.min() < 0 or token_ids.max() >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab})")
    logp = _log_softmax(logits)
    entropy = -(np.exp(logp) * logp).sum(axis=-1)
    return {
        "phi_mean": float(np.mean(1.0 - entropy / math.log(vocab))),
        "self_certainty": float(np.mean(-math.log(vocab) - logp.mean(axis=-1))),
        "neg_entropy": float(-np.mean(entropy)),
        "mean_logprob": float(np.mean(logp[np.arange(len(token_ids)), token_ids])),
    }


def confidence_from_stats(
    entropy: Any, selected_logprob: Any, mean_vocab_logprob: Any | None, mask: Any, vocab_size: int
) -> dict[str, Any]:
    """The scores of a batch from per-token statistics, each ``[B, T]``: entropy (nats), log p(token),
    and ``(1/V) sum_v log p(v)`` (None: self_certainty is left out). ``mask`` ``[B, T]`` marks the
    completion's positions, in any layout (right or left padding); values elsewhere are ignored, NaN
    included. Returns ``{name: [B] float64 tensor}``; rows with no position get `empty_value`."""
    if entropy.ndim != 2 or selected_logprob.shape != entropy.shape or mask.shape != entropy.shape:
        raise ValueError("entropy, selected_logprob and mask must all be [B, T]")
    if mean_vocab_logprob is not None and mean_vocab_logprob.shape != entropy.shape:
        raise ValueError("mean_vocab_logprob must be [B, T] like entropy")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    valid = mask.to(device=entropy.device, dtype=torch.bool)
    count = valid.sum(dim=-1).to(torch.float64)
    log_vocab = math.log(vocab_size)

    def mean(values: Any) -> Any:
        zeroed = torch.where(
            valid, values.to(torch.float64), torch.zeros((), dtype=torch.float64, device=values.device)
        )
        return zeroed.sum(dim=-1) / count.clamp(min=1.0)

    mean_entropy = mean(entropy)
    out = {
        "phi_mean": 1.0 - mean_entropy / log_vocab,
        "neg_entropy": -mean_entropy,
        "mean_logprob": mean(selected_logprob),
    }
    if mean_vocab_logprob is not None:
        out["self_certainty"] = -log_vocab - mean(mean_vocab_logprob)
    empty = count == 0
    return {
        name: torch.where(empty, torch.full_like(v, empty_value(name, vocab_size)), v)
        for name, v in out.items()
    }


def confidence_scores_batch(logits: Any, token_ids: Any, mask: Any) -> dict[str, Any]:
    """The four scores of a batch from full logits ``[B, T, V]`` (``logits[b, t]`` predicted
    ``token_ids[b, t]``) and a mask ``[B, T]`` in any padding layout. Same numbers as
    `confidence_scores` row by row (float64)."""
    if logits.ndim != 3 or token_ids.shape != logits.shape[:2] or mask.shape != logits.shape[:2]:
        raise ValueError("logits must be [B, T, V] and token_ids / mask [B, T]")
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    ids = token_ids.to(torch.long).masked_fill(~mask.to(torch.bool), 0)  # padding ids may be anything
    entropy = -(logp.exp() * logp).sum(dim=-1)
    selected = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return confidence_from_stats(entropy, selected, logp.mean(dim=-1), mask, int(logits.shape[-1]))


def mean_vocab_logprob_from_hidden(
    hidden: Any,
    lm_head: Any,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    rows_per_chunk: int | None = None,
) -> Any:
    """``(1/V) sum_v log p(v)`` at each position of ``hidden`` ``[N, H]`` (final-normed hidden states),
    the logits being ``lm_head(hidden) * logit_scale``, soft-capped as ``softcap * tanh(l / softcap)``
    when `softcap` is set (Gemma 2). Full logits are held for `rows_per_chunk` positions at a time
    (default 256). Returns ``[N]`` float64, under no_grad."""
    rows = rows_per_chunk or DEFAULT_ROWS_PER_CHUNK
    parts = []
    with torch.no_grad():
        for start in range(0, hidden.shape[0], rows):
            logits = lm_head(hidden[start : start + rows]).to(torch.float32)
            if logit_scale != 1.0:
                logits = logits * logit_scale
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            # mean_v log p(v) = mean_v l_v - logsumexp(l): no log-softmax tensor is built
            parts.append(logits.mean(dim=-1).double() - torch.logsumexp(logits, dim=-1).double())
    if not parts:
        return torch.zeros(0, dtype=torch.float64, device=hidden.device)
    return torch.cat(parts)
