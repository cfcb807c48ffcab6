"""Scorers read from the policy's next-token distributions at the positions that PREDICT each completion
token: `CarlScorer` (the CARL reward, its mean Phi and the coherence gate) and `TokenScorer` (any of
`REWARD_NAMES`). Both take the statistics of one shared forward (`carl_assets.dreams.forward`) through
`completion_token_stats`, or fall back to `score_completions` for models that cannot take a prefilled cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from carl_assets.carl.batch import carl_reward_from_stats, token_stats_from_hidden
from carl_assets.carl.coherence import SIGMA, coherence_gate
from carl_assets.carl.completion_scores import CompletionScores
from carl_assets.carl.confidence import confidence_from_stats, empty_value, mean_vocab_logprob_from_hidden
from carl_assets.carl.lm_head import lm_head_parts, vocab_size_of
from carl_assets.carl.reward_fn import CARL_SCORES, REWARD_NAMES, score_completions
from carl_assets.dreams.forward import ResponseForward, batches, score_with_shared_forward
from carl_assets.dreams.generation import GeneratedResponse, pad_and_eos_ids


class CompletionStats(NamedTuple):
    """Per completion token, `[R, Tc]` on the CPU (0 in padding): the entropy of the predicting
    distribution, the log-prob of the generated token, and (when asked) the mean log-prob over the
    vocabulary (for self-certainty); `vocab_size` of the LM head."""

    entropy: torch.Tensor
    logprob: torch.Tensor
    vocab_logprob: torch.Tensor | None
    vocab_size: int


def completion_token_stats(
    forward: ResponseForward, model: Any, chunk_size: int | None, with_vocab_logprob: bool = False
) -> CompletionStats:
    """The LM head over `forward.predicting_hidden` at the completion tokens -> `CompletionStats`.
    Raises ValueError when the model has no separable LM head."""
    assert forward.predicting_hidden is not None
    _, lm_head, softcap, scale = lm_head_parts(model)
    if lm_head is None:
        raise ValueError("the model has no separable LM head")
    mask = forward.completion_mask.bool()
    hidden = forward.predicting_hidden[mask.to(forward.predicting_hidden.device)]
    stats = token_stats_from_hidden(
        hidden,
        lm_head,
        forward.completion_ids[mask].to(hidden.device),
        chunk_size=chunk_size,
        softcap=softcap,
        logit_scale=scale,
    )
    entropy = torch.zeros(mask.shape, dtype=stats.entropy.dtype)
    logprob = torch.zeros_like(entropy)
    entropy[mask] = stats.entropy.cpu()
    logprob[mask] = stats.selected_logprob.cpu()
    vocab_logprob = None
    if with_vocab_logprob:
        vocab_logprob = torch.zeros_like(entropy)
        vocab_logprob[mask] = (
            mean_vocab_logprob_from_hidden(hidden, lm_head, softcap, scale).cpu().to(entropy.dtype)
        )
    return CompletionStats(entropy, logprob, vocab_logprob, stats.vocab_size)


def scored_separately(
    model: Any,
    tokenizer: Any,
    responses: Sequence[GeneratedResponse],
    batch_size: int,
    chunk_size: int | None,
    **options: Any,
) -> Iterator[tuple[range, CompletionScores]]:
    """The fallback for models that cannot take a prefilled cache: `score_completions` on each batch of
    `batch_size` responses (their own forward), yielding (response indices, its `CompletionScores`)."""
    pad_id, _ = pad_and_eos_ids(model, tokenizer)
    for rows in batches(len(responses), batch_size):
        yield rows, score_completions(
            model,
            [responses[i].prompt_ids for i in rows],
            [responses[i].completion_ids for i in rows],
            pad_token_id=pad_id,
            chunk_size=chunk_size,
            **options,
        )


@dataclass
class CarlScorer:
    """CARL reward of each response under the policy: the positions that PREDICT the completion tokens,
    scored with the numbers of `score_completions` (`batch_size` responses per forward).

    Responses to the same prompt share one run of it (`carl_assets.dreams.forward`); models that cannot
    take a prefilled cache go through `score_completions` itself. An empty completion (or a non-finite
    result) scores 0.0 with phi_mean 0.0 (the gate closed), as the GRPO reward function does.
    """

    batch_size: int = 32
    gate_threshold: float = SIGMA
    chunk_size: int | None = None
    primary: str = "carl"
    layers_needed: tuple[int, ...] = ()
    needs_predicting: bool = True

    def __call__(
        self, model: Any, tokenizer: Any, responses: Sequence[GeneratedResponse]
    ) -> dict[str, np.ndarray]:
        shared = score_with_shared_forward([self], model, tokenizer, responses, self.batch_size)
        return shared if shared is not None else self._score_separately(model, tokenizer, responses)

    def empty(self, n: int) -> dict[str, np.ndarray]:
        return {"carl": np.zeros(n), "phi_mean": np.zeros(n)}

    def fill(self, out: dict[str, np.ndarray], forward: ResponseForward, model: Any, eos: set[int]) -> None:
        stats = completion_token_stats(forward, model, self.chunk_size)
        rewards, components = carl_reward_from_stats(
            stats.entropy, stats.logprob, forward.completion_mask, stats.vocab_size
        )
        finite = torch.isfinite(rewards) & torch.isfinite(components["phi_mean"])
        out["carl"][forward.rows] = torch.where(finite, rewards, torch.zeros_like(rewards)).numpy()
        out["phi_mean"][forward.rows] = torch.where(
            finite, components["phi_mean"], torch.zeros_like(rewards)
        ).numpy()

    def finish(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out["gate_open"] = np.array(
            [1.0 if coherence_gate(float(p), self.gate_threshold)[0] else 0.0 for p in out["phi_mean"]]
        )
        return out

    def _score_separately(
        self, model: Any, tokenizer: Any, responses: Sequence[GeneratedResponse]
    ) -> dict[str, np.ndarray]:
        out = self.empty(len(responses))
        for rows, scored in scored_separately(model, tokenizer, responses, self.batch_size, self.chunk_size):
            for local, i in enumerate(rows):
                out["carl"][i] = scored.rewards[local]
                components = scored.components[local]
                out["phi_mean"][i] = components["phi_mean"] if components is not None else 0.0
        return self.finish(out)


@dataclass
class TokenScorer:
    """Scores read from the policy's next-token distributions at the positions that PREDICT each
    completion token: any of `REWARD_NAMES` (`names`; the first is the primary score), computed from one
    shared forward (`batch_size` responses each).

    The CARL names give the numbers of `CarlScorer` (the same statistics, the same function); the
    confidence scores those of `carl_assets.carl.confidence`. An empty completion scores 0.0 on the
    CARL names (as `CarlScorer`) and a confidence score's `empty_value` (a uniform distribution's).
    Raises ``ValueError`` on an unknown or repeated name.
    """

    names: tuple[str, ...] = ("self_certainty",)
    batch_size: int = 32
    chunk_size: int | None = None
    layers_needed: tuple[int, ...] = ()
    needs_predicting: bool = True

    def __post_init__(self) -> None:
        self.names = tuple(str(n).strip().lower() for n in self.names)
        unknown = [n for n in self.names if n not in REWARD_NAMES]
        if not self.names or unknown or len(set(self.names)) != len(self.names):
            raise ValueError(
                f"TokenScorer names {list(self.names)}: give distinct names from {', '.join(REWARD_NAMES)}"
            )
        self._vocab: int | None = None

    @property
    def primary(self) -> str:
        return self.names[0]

    def __call__(
        self, model: Any, tokenizer: Any, responses: Sequence[GeneratedResponse]
    ) -> dict[str, np.ndarray]:
        shared = score_with_shared_forward([self], model, tokenizer, responses, self.batch_size)
        return shared if shared is not None else self._score_separately(model, tokenizer, responses)

    def prepare(self, model: Any) -> None:
        self._vocab = vocab_size_of(model)

    def empty(self, n: int) -> dict[str, np.ndarray]:
        # NaN marks "not scored" until `finish` gives empty completions their value
        return {name: np.full(n, np.nan) for name in self.names}

    def fill(self, out: dict[str, np.ndarray], forward: ResponseForward, model: Any, eos: set[int]) -> None:
        stats = completion_token_stats(
            forward, model, self.chunk_size, with_vocab_logprob="self_certainty" in self.names
        )
        self._vocab = stats.vocab_size
        mask = forward.completion_mask
        values = confidence_from_stats(
            stats.entropy, stats.logprob, stats.vocab_logprob, mask, stats.vocab_size
        )
        if set(self.names) & set(CARL_SCORES):
            rewards, components = carl_reward_from_stats(stats.entropy, stats.logprob, mask, stats.vocab_size)
            values.update(components)
            values["carl"] = rewards
        for name in self.names:
            column = values[name].double()
            zero = 0.0 if name in CARL_SCORES else empty_value(name, stats.vocab_size)
            out[name][forward.rows] = torch.where(
                torch.isfinite(column), column, torch.full_like(column, zero)
            ).numpy()

    def finish(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in self.names:
            blank = np.isnan(out[name])
            if blank.any():
                out[name][blank] = 0.0 if name in CARL_SCORES else empty_value(name, self._vocab or 2)
        return out

    def _score_separately(
        self, model: Any, tokenizer: Any, responses: Sequence[GeneratedResponse]
    ) -> dict[str, np.ndarray]:
        self.prepare(model)
        out = self.empty(len(responses))
        with_sc = "self_certainty" in self.names
        for rows, scored in scored_separately(
            model, tokenizer, responses, self.batch_size, self.chunk_size, self_certainty=with_sc
        ):
            for local, i in enumerate(rows):
                components = scored.components[local]
                if components is not None:
                    for name in self.names:
                        out[name][i] = scored.rewards[local] if name == "carl" else components[name]
        return self.finish(out)
