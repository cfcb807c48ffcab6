"""GRPO reward functions for TRL: the CARL composite (`make_carl_reward_fn(model, tokenizer)`, the seed's
reward), each of its components, and the confidence scores of `carl_assets.carl.confidence`
(`make_reward_fn(name, model, tokenizer)` for any name in `REWARD_NAMES`), and the batched scorer
`score_completions` they run (one no-grad forward pass, the LM head in vocabulary tiles)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from carl_assets.carl.batch import carl_reward_from_stats, token_stats_from_hidden, token_stats_from_logits
from carl_assets.carl.coherence import COMPONENT_KEYS
from carl_assets.carl.confidence import (
    CONFIDENCE_SCORES,
    confidence_from_stats,
    empty_value,
    mean_vocab_logprob_from_hidden,
)

logger = logging.getLogger("carl_assets.carl")  # the name these warnings have always been logged under
NONFINITE_REASON = "non-finite logits"
CARL_SCORES = ("carl", "multiscale", "cloud_quality", "discontinuity")
# Every name a reward (GRPO) or a dream scorer can be: the CARL composite, its components, the confidence scores.
REWARD_NAMES = CARL_SCORES + CONFIDENCE_SCORES

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
                      pad_token_id: int = 0, chunk_size: int | None = None,
                      self_certainty: bool = False) -> CompletionScores:
    """CARL of each completion given its prompt, in ONE batched no-grad forward pass.

    Each scored completion's components are CARL's (`COMPONENT_KEYS`) plus the confidence scores
    neg_entropy and mean_logprob, and self_certainty when `self_certainty` is set (it needs the mean
    log-probability over the vocabulary: one more pass of the predicting positions through the LM head).

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
                                                softcap=softcap, logit_scale=scale, nonfinite="nan")
                vocab_mean = (mean_vocab_logprob_from_hidden(selected_hidden, lm_head, softcap, scale)
                              if self_certainty else None)
            else:  # no separable LM head: full logits (memory B*T*V), same numbers
                logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
                picked_logits = logits.reshape(-1, logits.shape[-1]).index_select(0, idx)
                stats = token_stats_from_logits(picked_logits, ids, nonfinite="nan")
                vocab_mean = (torch.log_softmax(picked_logits.double(), dim=-1).mean(dim=-1)
                              if self_certainty else None)
                del logits, picked_logits
    finally:
        model.train(was_training)

    mask = comp_mask.to(stats.entropy.device)
    entropy = torch.zeros(mask.shape, dtype=stats.entropy.dtype, device=mask.device)
    logprob = torch.zeros_like(entropy)
    entropy.view(-1)[picked.to(mask.device)] = stats.entropy
    logprob.view(-1)[picked.to(mask.device)] = stats.selected_logprob
    vocab_logprob = None
    if vocab_mean is not None:
        vocab_logprob = torch.zeros_like(entropy)
        vocab_logprob.view(-1)[picked.to(mask.device)] = vocab_mean.to(vocab_logprob.dtype).to(mask.device)
    confidence = {k: v.tolist() for k, v in confidence_from_stats(entropy, logprob, vocab_logprob, mask,
                                                                   stats.vocab_size).items() if k != "phi_mean"}
    # NaN statistics (NaN / +inf logits: a diverged model) make that row NaN, turned into a reason below
    batch_rewards, batch_components = carl_reward_from_stats(entropy, logprob, mask, stats.vocab_size, nonfinite="nan")
    finite = torch.isfinite(batch_rewards)
    for key in batch_components.values():
        finite &= torch.isfinite(key)
    values = batch_rewards.tolist()
    comps = {k: v.tolist() for k, v in batch_components.items()}
    finite_list = finite.tolist()
    for r, i in enumerate(rows):
        if not finite_list[r]:
            reasons[i] = NONFINITE_REASON
            continue
        rewards[i] = float(values[r])
        components[i] = {**{k: float(comps[k][r]) for k in COMPONENT_KEYS},
                         **{k: float(v[r]) for k, v in confidence.items()}}
    return CompletionScores(rewards, components, reasons)


SEED_MIN_CHARS = 5  # the seed: a completion with no text or fewer than 5 characters scores 0.0
SEED_MAX_TOKENS = 512  # the seed: at most 512 tokens of a completion are scored
SHORT_REASON = "shorter than the minimum characters"


def make_carl_reward_fn(model: Any, tokenizer: Any, *, chunk_size: int | None = None,
                        chat_template_kwargs: dict[str, Any] | None = None,
                        metric_prefix: str = "carl", min_chars: int = SEED_MIN_CHARS,
                        max_completion_tokens: int | None = SEED_MAX_TOKENS,
                        reward: str = "carl") -> Callable[..., list[float]]:
    """A TRL GRPO reward function: the CARL composite of each completion under ``model`` (or, with
    ``reward``, another of `REWARD_NAMES`; see `make_reward_fn`).

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

    The seed's two rules hold: a completion whose text is blank or shorter than ``min_chars`` (5)
    characters scores 0.0 (a degenerate answer must not win its group by a peaked first token; 0 turns the
    rule off), and at
    most ``max_completion_tokens`` (512) completion tokens are scored (the seed truncated there; the
    prompt stays whole, as context). Short completions are counted in ``carl/short``, not warned one by one.

    Empty completions and non-finite results get 0.0 and a logged warning with the reason; a NaN never
    reaches TRL. Completions whose logits hold NaN or +inf (a diverged model) are also counted in one
    warning ("0.0 for N of M completions with non-finite logits") and in ``carl/zeroed``. The model's
    train/eval mode is restored. If TRL passes ``log_metric``, the component means over the scored
    completions are logged as ``carl/multiscale``, ``carl/cloud_quality``, ``carl/discontinuity``,
    ``carl/phi_mean`` (plus ``carl/zeroed``, the fraction scored 0.0 for a reason); with TRL's
    ``log_extra``, each completion's phi mean goes into the completions table as ``carl_phi_mean``. The function's
    ``__name__`` is "carl", so TRL's reward columns read ``rewards/carl/mean``. Without
    ``completion_ids`` (called outside TRL), the completion text is tokenised without special tokens.
    The last call's per-completion components are kept on ``carl.last_components``.

    With ``reward`` other than "carl", the function is named after it and returns that component; a
    completion skipped for a reason gets 0.0 for a CARL component (the seed's rule) and a confidence
    score's `empty_value` (what a uniform distribution scores: 0.0 would put silence above every real
    answer on neg_entropy and mean_logprob, which are never positive).
    """
    if reward not in REWARD_NAMES:
        raise ValueError(f"unknown reward {reward!r} (known: {', '.join(REWARD_NAMES)})")
    vocab = _vocab_size(model) or len(tokenizer)
    skipped_value = 0.0 if reward in CARL_SCORES else empty_value(reward, vocab)
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
        comp_ids = [[int(t) for t in c][:max_completion_tokens] for c in completion_ids]
        short = [bool(c) and min_chars > 0 and (not _completion_text(t).strip() or len(_completion_text(t)) < min_chars)
                 for c, t in zip(comp_ids, completions, strict=True)]
        scored = score_completions(model, prompt_ids, [[] if s else c for c, s in zip(comp_ids, short, strict=True)],
                                   pad_token_id=pad_id, chunk_size=chunk_size,
                                   self_certainty=reward == "self_certainty")
        if reward != "carl":
            scored.rewards = [skipped_value if c is None else float(c[reward]) for c in scored.components]
        for i, reason in enumerate(scored.reasons):
            if short[i]:
                scored.reasons[i] = SHORT_REASON
            elif reason is not None:
                logger.warning("%s reward %s for completion %d of %d: %s", reward, skipped_value, i,
                               len(comp_ids), reason)
        n_nonfinite = sum(r == NONFINITE_REASON for r in scored.reasons)
        if n_nonfinite:  # a diverging model: say how much of the step it affects, in one line
            logger.warning("%s reward %s for %d of %d completions with non-finite logits (NaN or +inf): "
                           "the model may have diverged", reward, skipped_value, n_nonfinite, len(comp_ids))
        carl.last_components = scored.components
        if log_metric is not None:
            kept = [c for c in scored.components if c is not None]
            for key in ("multiscale", "cloud_quality", "discontinuity", "phi_mean", *CONFIDENCE_SCORES[1:]):
                if kept and key in kept[0]:
                    log_metric(f"{metric_prefix}/{key}", float(np.mean([c[key] for c in kept])))
            log_metric(f"{metric_prefix}/zeroed", sum(r is not None for r in scored.reasons) / max(1, len(comp_ids)))
            log_metric(f"{metric_prefix}/short", sum(short) / max(1, len(comp_ids)))
        if log_extra is not None:  # per-completion columns of TRL's completions table
            log_extra(f"{metric_prefix}_phi_mean", [None if c is None else c["phi_mean"] for c in scored.components])
        return scored.rewards

    carl.__name__ = reward
    carl.__qualname__ = reward
    carl.last_components = []
    return carl


def make_reward_fn(name: str, model: Any, tokenizer: Any, **kwargs: Any) -> Callable[..., list[float]]:
    """A TRL GRPO reward function named `name`, one of `REWARD_NAMES`: "carl" (the seed's composite),
    a CARL component ("multiscale", "cloud_quality", "discontinuity") or a confidence score ("phi_mean",
    "self_certainty", "neg_entropy", "mean_logprob"; see `carl_assets.carl.confidence`), read at the
    positions that predict each completion token. Keywords as `make_carl_reward_fn`. Raises
    ``ValueError`` naming the known rewards for an unknown name."""
    return make_carl_reward_fn(model, tokenizer, reward=name.strip().lower(), **kwargs)


def _completion_text(completion: Any) -> str:
    if isinstance(completion, list):  # conversational: the last message's content
        return str(completion[-1]["content"]) if completion else ""
    return str(completion)
