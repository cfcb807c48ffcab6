"""`score_completions`: CARL and the confidence scores of completions given their prompts, in one batched
no-grad forward pass, composed of steps: check the rows, build the right-padded batch and the indices of
the predicting positions, run the decoder and the LM head (in vocabulary tiles) at those positions only,
and turn the per-token statistics into per-completion scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from carl_assets.carl.batch import (
    TokenStats,
    carl_reward_from_stats,
    token_stats_from_hidden,
    token_stats_from_logits,
)
from carl_assets.carl.coherence import COMPONENT_KEYS
from carl_assets.carl.confidence import confidence_from_stats, mean_vocab_logprob_from_hidden
from carl_assets.carl.lm_head import lm_head_parts, vocab_size_of

NONFINITE_REASON = "non-finite logits"


@dataclass
class CompletionScores:
    """Per completion: the reward (0.0 when skipped), its components (None when skipped) and the reason
    it was skipped (None when scored)."""

    rewards: list[float]
    components: list[dict[str, float] | None]
    reasons: list[str | None]


class PredictionBatch(NamedTuple):
    """The scored rows as one batch: `input_ids`/`attention` `[B, W]` (prompt + completion[:-1], right-
    padded), `completion`/`completion_mask` `[B, C]`, `flat_index` `[B, C]` (the flat position that predicts
    each completion token; 0 in padding) and `picked` `[B*C]` (the real completion tokens)."""

    input_ids: torch.Tensor
    attention: torch.Tensor
    completion: torch.Tensor
    completion_mask: torch.Tensor
    flat_index: torch.Tensor
    picked: torch.Tensor


def _scorable_rows(
    completion_ids: Sequence[Sequence[int]], vocab: int | None, reasons: list[str | None]
) -> list[int]:
    """The rows to score; the others get their reason (empty, or a token outside the vocabulary)."""
    rows = []
    for i, ids in enumerate(completion_ids):
        if not ids:
            reasons[i] = "empty completion"
        elif vocab is not None and (min(ids) < 0 or max(ids) >= vocab):
            reasons[i] = f"token id outside the vocabulary [0, {vocab})"
        else:
            rows.append(i)
    return rows


def prediction_batch(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    rows: Sequence[int],
    pad_token_id: int,
) -> PredictionBatch:
    """The batch of `rows`: the hidden state at `len(prompt) - 1 + t` predicts completion token t."""
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
    offsets = torch.arange(max_comp).unsqueeze(0) + torch.tensor(starts).unsqueeze(-1)
    flat_index = (offsets + (torch.arange(len(rows)) * width).unsqueeze(-1)) * comp_mask
    return PredictionBatch(input_ids, attention, comp, comp_mask, flat_index, comp_mask.reshape(-1).bool())


def predicting_stats(
    model: Any, batch: PredictionBatch, chunk_size: int | None, self_certainty: bool
) -> tuple[TokenStats, torch.Tensor | None]:
    """One no-grad forward: the token statistics at the picked predicting positions (flat, NaN for
    non-finite logits) and, with `self_certainty`, the mean log-prob over the vocabulary there. Uses the
    separable LM head in tiles, else full logits (memory B*T*V, same numbers). Restores train/eval mode."""
    device = next(model.parameters()).device
    decoder, lm_head, softcap, scale = lm_head_parts(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            input_ids, attention = batch.input_ids.to(device), batch.attention.to(device)
            idx = batch.flat_index.reshape(-1)[batch.picked].to(device)
            ids = batch.completion.reshape(-1)[batch.picked].to(device)
            if decoder is not None:
                hidden = decoder(input_ids=input_ids, attention_mask=attention, use_cache=False)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden.last_hidden_state
                selected_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
                del hidden
                stats = token_stats_from_hidden(
                    selected_hidden,
                    lm_head,
                    ids,
                    chunk_size=chunk_size,
                    softcap=softcap,
                    logit_scale=scale,
                    nonfinite="nan",
                )
                vocab_mean = (
                    mean_vocab_logprob_from_hidden(selected_hidden, lm_head, softcap, scale)
                    if self_certainty
                    else None
                )
            else:
                logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
                picked_logits = logits.reshape(-1, logits.shape[-1]).index_select(0, idx)
                stats = token_stats_from_logits(picked_logits, ids, nonfinite="nan")
                vocab_mean = (
                    torch.log_softmax(picked_logits.double(), dim=-1).mean(dim=-1) if self_certainty else None
                )
                del logits, picked_logits
    finally:
        model.train(was_training)
    return stats, vocab_mean


def _scatter(
    batch: PredictionBatch, stats: TokenStats, vocab_mean: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Flat statistics back to `[B, C]` (0 in padding): entropy, log-prob, vocab mean log-prob; and the
    mask."""
    mask = batch.completion_mask.to(stats.entropy.device)
    picked = batch.picked.to(mask.device)
    entropy = torch.zeros(mask.shape, dtype=stats.entropy.dtype, device=mask.device)
    logprob = torch.zeros_like(entropy)
    entropy.view(-1)[picked] = stats.entropy
    logprob.view(-1)[picked] = stats.selected_logprob
    vocab_logprob = None
    if vocab_mean is not None:
        vocab_logprob = torch.zeros_like(entropy)
        vocab_logprob.view(-1)[picked] = vocab_mean.to(vocab_logprob.dtype).to(mask.device)
    return entropy, logprob, vocab_logprob, mask


def _fill_scores(
    scores: CompletionScores,
    rows: Sequence[int],
    batch: PredictionBatch,
    stats: TokenStats,
    vocab_mean: torch.Tensor | None,
) -> None:
    """CARL (its components) and the confidence scores of each row; a non-finite row gets the reason."""
    entropy, logprob, vocab_logprob, mask = _scatter(batch, stats, vocab_mean)
    confidence = {
        k: v.tolist()
        for k, v in confidence_from_stats(entropy, logprob, vocab_logprob, mask, stats.vocab_size).items()
        if k != "phi_mean"
    }
    # NaN statistics (NaN / +inf logits: a diverged model) make that row NaN, turned into a reason below
    batch_rewards, batch_components = carl_reward_from_stats(
        entropy, logprob, mask, stats.vocab_size, nonfinite="nan"
    )
    finite = torch.isfinite(batch_rewards)
    for key in batch_components.values():
        finite &= torch.isfinite(key)
    values = batch_rewards.tolist()
    comps = {k: v.tolist() for k, v in batch_components.items()}
    for r, (i, ok) in enumerate(zip(rows, finite.tolist(), strict=True)):
        if not ok:
            scores.reasons[i] = NONFINITE_REASON
            continue
        scores.rewards[i] = float(values[r])
        scores.components[i] = {
            **{k: float(comps[k][r]) for k in COMPONENT_KEYS},
            **{k: float(v[r]) for k, v in confidence.items()},
        }


def score_completions(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_token_id: int = 0,
    chunk_size: int | None = None,
    self_certainty: bool = False,
) -> CompletionScores:
    """CARL of each completion given its prompt, in ONE batched no-grad forward pass.

    Each scored completion's components are CARL's (`COMPONENT_KEYS`) plus the confidence scores
    neg_entropy and mean_logprob, and self_certainty when `self_certainty` is set (it needs the mean
    log-probability over the vocabulary: one more pass of the predicting positions through the LM head).

    Sequences are ``prompt + completion[:-1]`` (the last token predicts nothing we score), right-padded.
    The hidden state at position ``len(prompt) - 1 + t`` predicts completion token t (the alignment of
    the reference's agent step); only those positions go through the LM head, in vocabulary tiles. The
    model's train/eval mode is restored afterwards. Raises ValueError for a prompt without tokens.
    """
    n = len(completion_ids)
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError(
            "every prompt needs at least one token (the one that predicts the first completion token)"
        )
    scores = CompletionScores([0.0] * n, [None] * n, [None] * n)
    rows = _scorable_rows(completion_ids, vocab_size_of(model), scores.reasons)
    if not rows:
        return scores
    batch = prediction_batch(prompt_ids, completion_ids, rows, pad_token_id)
    stats, vocab_mean = predicting_stats(model, batch, chunk_size, self_certainty)
    _fill_scores(scores, rows, batch, stats, vocab_mean)
    return scores
