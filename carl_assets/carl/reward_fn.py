"""GRPO reward functions for TRL: the CARL composite (`make_carl_reward_fn(model, tokenizer)`, the
reference's reward), each of its components, and the confidence scores of `carl_assets.carl.confidence`
(`make_reward_fn(name, model, tokenizer)` for any name in `REWARD_NAMES`). They run the batched scorer
`score_completions` (`carl_assets.carl.completion_scores`, re-exported here).

How a reward function scores a step. All completions of a step are re-scored in one batched no-grad
forward pass: each prompt is re-tokenised as TRL's GRPO does (the chat template with the generation
prompt for conversational prompts, the tokenizer for plain strings), followed by the completion's own
token ids (``completion_ids``, as generated). It scores the positions that PREDICT the completion tokens:
the hidden state at ``len(prompt) - 1 + t`` against completion token t. This follows the reference's
agent step; the reference's reward function instead tokenised the completion text alone and paired
logits[t] with token t, one position off (it scored the distribution of the token after). The decoder
stack (``model.get_decoder()``) runs once over the right-padded batch; only the predicting positions go
through the LM head, in vocabulary tiles (`token_stats_from_hidden`), so no ``[B, T, V]`` tensor is built
(memory grows with B*T). Models without a separable LM head fall back to a full forward (same numbers,
more memory). Rewards are not rounded (the reference rounded to 4 decimals, which flattens GRPO's
advantages).

The reference's two rules hold: a completion whose text is blank or shorter than ``min_chars`` (5)
characters scores 0.0 (a degenerate answer must not win its group by a peaked first token; 0 turns the
rule off), and at most ``max_completion_tokens`` (512) completion tokens are scored (the reference
truncated there; the prompt stays whole, as context). Short completions are counted in ``carl/short``,
not warned one by one.

Empty completions and non-finite results get 0.0 and a logged warning with the reason; a NaN never
reaches TRL. Completions whose logits hold NaN or +inf (a diverged model) are also counted in one warning
("0.0 for N of M completions with non-finite logits") and in ``carl/zeroed``. The model's train/eval mode
is restored. If TRL passes ``log_metric``, the component means over the scored completions are logged as
``carl/multiscale``, ``carl/cloud_quality``, ``carl/discontinuity``, ``carl/phi_mean`` (plus
``carl/zeroed``, the fraction scored 0.0 for a reason); with TRL's ``log_extra``, each completion's phi
mean goes into the completions table as ``carl_phi_mean``.

With ``reward`` other than "carl", the function is named after it and returns that component; a
completion skipped for a reason gets 0.0 for a CARL component (the reference's rule) and a confidence
score's `empty_value` (what a uniform distribution scores: 0.0 would put silence above every real answer
on neg_entropy and mean_logprob, which are never positive).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from carl_assets.carl.completion_scores import NONFINITE_REASON, CompletionScores, score_completions
from carl_assets.carl.confidence import CONFIDENCE_SCORES, empty_value
from carl_assets.carl.lm_head import vocab_size_of

__all__ = [
    "CARL_SCORES",
    "NONFINITE_REASON",
    "REWARD_NAMES",
    "CompletionScores",
    "make_carl_reward_fn",
    "make_reward_fn",
    "score_completions",
]

logger = logging.getLogger("carl_assets.carl")  # the name these warnings have always been logged under
CARL_SCORES = ("carl", "multiscale", "cloud_quality", "discontinuity")
# Every name a reward (GRPO) or a dream scorer can be: the CARL composite, its components, the confidence
# scores.
REWARD_NAMES = CARL_SCORES + CONFIDENCE_SCORES
MIN_CHARS = 5  # the reference: a completion with no text or fewer than 5 characters scores 0.0
MAX_SCORED_TOKENS = 512  # the reference: at most 512 tokens of a completion are scored
SHORT_REASON = "shorter than the minimum characters"


def _prompt_ids(tokenizer: Any, prompt: Any, chat_template_kwargs: dict[str, Any]) -> list[int]:
    """Token ids of a prompt, as TRL's GRPO builds them: chat template + generation prompt, or plain text."""
    if isinstance(prompt, list):  # conversational: a list of {"role", "content"} messages
        encoded = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True, **chat_template_kwargs
        )
        ids = encoded["input_ids"]
    else:
        ids = tokenizer(text=str(prompt))["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def _completion_text(completion: Any) -> str:
    if isinstance(completion, list):  # conversational: the last message's content
        return str(completion[-1]["content"]) if completion else ""
    return str(completion)


class _StepScorer:
    """One reward function's fixed settings, and how it scores one GRPO step (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        reward: str,
        chunk_size: int | None,
        chat_template_kwargs: dict[str, Any] | None,
        min_chars: int,
        max_completion_tokens: int | None,
    ):
        self.model, self.tokenizer, self.reward, self.chunk_size = model, tokenizer, reward, chunk_size
        self.min_chars, self.max_completion_tokens = min_chars, max_completion_tokens
        vocab = vocab_size_of(model) or len(tokenizer)
        self.skipped_value = 0.0 if reward in CARL_SCORES else empty_value(reward, vocab)
        self.template_kwargs = dict(chat_template_kwargs or {})
        bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:  # any id will do: padding is masked out and never scored
            pad_id = eos if eos is not None else 0
        self.pad_id = pad_id
        self.fallback_start = [t for t in (bos, eos, pad_id) if t is not None][
            :1
        ]  # context for an empty prompt

    def prompt_ids(self, prompts: Sequence[Any]) -> list[list[int]]:
        """Each prompt's ids (each distinct prompt tokenised once)."""
        cache: dict[str, list[int]] = {}
        for prompt in prompts:
            key = repr(prompt)
            if key not in cache:
                cache[key] = _prompt_ids(self.tokenizer, prompt, self.template_kwargs) or list(
                    self.fallback_start
                )
        return [cache[repr(prompt)] for prompt in prompts]

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None,
    ) -> tuple[CompletionScores, list[bool]]:
        """The step's scores (rewards already this reward's values) and which completions were too short."""
        if completion_ids is None:
            completion_ids = [
                self.tokenizer(text=_completion_text(c), add_special_tokens=False)["input_ids"]
                for c in completions
            ]
        if len(prompts) != len(completion_ids):
            raise ValueError(f"{len(prompts)} prompts but {len(completion_ids)} completions")
        comp_ids = [[int(t) for t in c][: self.max_completion_tokens] for c in completion_ids]
        short = [
            bool(c)
            and self.min_chars > 0
            and (not _completion_text(t).strip() or len(_completion_text(t)) < self.min_chars)
            for c, t in zip(comp_ids, completions, strict=True)
        ]
        scored = score_completions(
            self.model,
            self.prompt_ids(prompts),
            [[] if s else c for c, s in zip(comp_ids, short, strict=True)],
            pad_token_id=self.pad_id,
            chunk_size=self.chunk_size,
            self_certainty=self.reward == "self_certainty",
        )
        if self.reward != "carl":
            scored.rewards = [
                self.skipped_value if c is None else float(c[self.reward]) for c in scored.components
            ]
        self._explain(scored, short)
        return scored, short

    def _explain(self, scored: CompletionScores, short: list[bool]) -> None:
        """Short completions get their reason; other skipped ones a warning; non-finite ones one line in
        all."""
        n = len(short)
        for i, reason in enumerate(scored.reasons):
            if short[i]:
                scored.reasons[i] = SHORT_REASON
            elif reason is not None:
                logger.warning(
                    "%s reward %s for completion %d of %d: %s", self.reward, self.skipped_value, i, n, reason
                )
        n_nonfinite = sum(r == NONFINITE_REASON for r in scored.reasons)
        if n_nonfinite:  # a diverging model: say how much of the step it affects, in one line
            logger.warning(
                "%s reward %s for %d of %d completions with non-finite logits (NaN or +inf): "
                "the model may have diverged",
                self.reward,
                self.skipped_value,
                n_nonfinite,
                n,
            )


def _log_step(
    scored: CompletionScores,
    short: list[bool],
    prefix: str,
    log_metric: Callable[[str, float], None] | None,
    log_extra: Callable[[str, list[Any]], None] | None,
) -> None:
    """The step's component means, zeroed and short fractions (`log_metric`); per-completion phi
    (`log_extra`)."""
    n = max(1, len(short))
    if log_metric is not None:
        kept = [c for c in scored.components if c is not None]
        for key in ("multiscale", "cloud_quality", "discontinuity", "phi_mean", *CONFIDENCE_SCORES[1:]):
            if kept and key in kept[0]:
                log_metric(f"{prefix}/{key}", float(np.mean([c[key] for c in kept])))
        log_metric(f"{prefix}/zeroed", sum(r is not None for r in scored.reasons) / n)
        log_metric(f"{prefix}/short", sum(short) / n)
    if log_extra is not None:  # per-completion columns of TRL's completions table
        log_extra(f"{prefix}_phi_mean", [None if c is None else c["phi_mean"] for c in scored.components])


def make_carl_reward_fn(
    model: Any,
    tokenizer: Any,
    *,
    chunk_size: int | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    metric_prefix: str = "carl",
    min_chars: int = MIN_CHARS,
    max_completion_tokens: int | None = MAX_SCORED_TOKENS,
    reward: str = "carl",
) -> Callable[..., list[float]]:
    """A TRL GRPO reward function: the CARL composite of each completion under ``model`` (or, with
    ``reward``, another of `REWARD_NAMES`; see `make_reward_fn`). How it scores, its two rules, its
    warnings and logged metrics: the module docstring.

    The returned ``carl(prompts, completions, completion_ids=None, log_metric=None, log_extra=None,
    **kwargs)`` returns one float per completion. Its ``__name__`` is the reward's ("carl"), so TRL's
    reward columns read ``rewards/carl/mean``. Without ``completion_ids`` (called outside TRL), the
    completion text is tokenised without special tokens. The last call's per-completion components are
    kept on ``carl.last_components``. Raises ValueError for an unknown reward, and from the call when
    prompts and completions differ in number.
    """
    if reward not in REWARD_NAMES:
        raise ValueError(f"unknown reward {reward!r} (known: {', '.join(REWARD_NAMES)})")
    step = _StepScorer(
        model, tokenizer, reward, chunk_size, chat_template_kwargs, min_chars, max_completion_tokens
    )

    def carl(
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        log_extra: Callable[[str, list[Any]], None] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        scored, short = step(prompts, completions, completion_ids)
        carl.last_components = scored.components
        _log_step(scored, short, metric_prefix, log_metric, log_extra)
        return scored.rewards

    carl.__name__ = reward
    carl.__qualname__ = reward
    carl.last_components = []
    return carl


def make_reward_fn(name: str, model: Any, tokenizer: Any, **kwargs: Any) -> Callable[..., list[float]]:
    """A TRL GRPO reward function named `name`, one of `REWARD_NAMES`: "carl" (the reference's composite),
    a CARL component ("multiscale", "cloud_quality", "discontinuity") or a confidence score ("phi_mean",
    "self_certainty", "neg_entropy", "mean_logprob"; see `carl_assets.carl.confidence`), read at the
    positions that predict each completion token. Keywords as `make_carl_reward_fn`. Raises
    ``ValueError`` naming the known rewards for an unknown name."""
    return make_carl_reward_fn(model, tokenizer, reward=name.strip().lower(), **kwargs)
