"""The training-signal agent: pluggable scorers of generated responses.

A scorer is any callable ``scorer(model, tokenizer, responses) -> dict[str, np.ndarray]`` returning
named components, one value per response. Built in:

- `CarlScorer`: the CARL reward of each response under the policy (`carl`), its mean Phi
  (`phi_mean`) and whether the coherence gate lets the agent act on it (`gate_open`).
- `TokenScorer`: any of `REWARD_NAMES` read from the policy's next-token distributions at the positions
  that predict the completion: the CARL composite or one of its components (`multiscale`,
  `cloud_quality`, `discontinuity`), or a confidence score (`phi_mean`, `self_certainty`, `neg_entropy`,
  `mean_logprob`; see `carl_assets.carl.confidence`). One instance can compute several at once.
- `SteeringScorer`: how strongly the response's residual stream points along an emotion's readout
  vector (`steering:<emotion>`).
- `CombinedScorer` (built by `parse_scorer_spec`): runs its parts and adds `score`, the weighted
  sum of each part's primary component.

Scorers read the exact token ids the model generated (`GeneratedResponse.prompt_ids` and
`completion_ids`), so nothing is re-tokenised. The built-in ones share one forward in which each
distinct prompt runs once (`score_with_shared_forward`); a model that cannot take a prefilled KV
cache is scored by plain full-sequence forwards instead (same numbers, tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from carl_assets.carl.batch import carl_reward_from_stats, token_stats_from_hidden
from carl_assets.carl.coherence import SIGMA, coherence_gate
from carl_assets.carl.confidence import (
    confidence_from_stats,
    empty_value,
    mean_vocab_logprob_from_hidden,
)
from carl_assets.carl.reward_fn import (
    CARL_SCORES,
    REWARD_NAMES,
    _lm_head_parts,
    _vocab_size,
    score_completions,
)
from carl_assets.dreams.forward import ResponseForward, run_response_forward
from carl_assets.dreams.generation import GeneratedResponse, pad_and_eos_ids
from carl_assets.steering.vectors import SteeringVectors, find_decoder_blocks


class Scorer(Protocol):
    """Scores responses: named components, one float per response each. `primary` names the component
    that counts as the scorer's score in a weighted combination."""

    primary: str

    def __call__(self, model: Any, tokenizer: Any,
                 responses: Sequence[GeneratedResponse]) -> dict[str, np.ndarray]: ...


def _batches(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


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

    def __call__(self, model: Any, tokenizer: Any, responses: Sequence[GeneratedResponse]) -> dict[str, np.ndarray]:
        shared = score_with_shared_forward([self], model, tokenizer, responses, self.batch_size)
        return shared if shared is not None else self._score_separately(model, tokenizer, responses)

    def empty(self, n: int) -> dict[str, np.ndarray]:
        return {"carl": np.zeros(n), "phi_mean": np.zeros(n)}

    def fill(self, out: dict[str, np.ndarray], forward: ResponseForward, model: Any, eos: set[int]) -> None:
        assert forward.predicting_hidden is not None
        decoder, lm_head, softcap, scale = _lm_head_parts(model)
        if lm_head is None:
            raise ValueError("the model has no separable LM head")
        mask = forward.completion_mask.bool()
        hidden = forward.predicting_hidden[mask.to(forward.predicting_hidden.device)]
        stats = token_stats_from_hidden(hidden, lm_head, forward.completion_ids[mask].to(hidden.device),
                                        chunk_size=self.chunk_size, softcap=softcap, logit_scale=scale)
        entropy = torch.zeros(mask.shape, dtype=stats.entropy.dtype)
        logprob = torch.zeros_like(entropy)
        entropy[mask] = stats.entropy.cpu()
        logprob[mask] = stats.selected_logprob.cpu()
        rewards, components = carl_reward_from_stats(entropy, logprob, forward.completion_mask, stats.vocab_size)
        finite = torch.isfinite(rewards) & torch.isfinite(components["phi_mean"])
        out["carl"][forward.rows] = torch.where(finite, rewards, torch.zeros_like(rewards)).numpy()
        out["phi_mean"][forward.rows] = torch.where(finite, components["phi_mean"], torch.zeros_like(rewards)).numpy()

    def finish(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out["gate_open"] = np.array([1.0 if coherence_gate(float(p), self.gate_threshold)[0] else 0.0
                                     for p in out["phi_mean"]])
        return out

    def _score_separately(self, model: Any, tokenizer: Any,
                          responses: Sequence[GeneratedResponse]) -> dict[str, np.ndarray]:
        out = self.empty(len(responses))
        pad_id, _ = pad_and_eos_ids(model, tokenizer)
        for rows in _batches(len(responses), self.batch_size):
            scored = score_completions(model, [responses[i].prompt_ids for i in rows],
                                       [responses[i].completion_ids for i in rows], pad_token_id=pad_id,
                                       chunk_size=self.chunk_size)
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
            raise ValueError(f"TokenScorer names {list(self.names)}: give distinct names from {', '.join(REWARD_NAMES)}")
        self._vocab: int | None = None

    @property
    def primary(self) -> str:
        return self.names[0]

    def __call__(self, model: Any, tokenizer: Any, responses: Sequence[GeneratedResponse]) -> dict[str, np.ndarray]:
        shared = score_with_shared_forward([self], model, tokenizer, responses, self.batch_size)
        return shared if shared is not None else self._score_separately(model, tokenizer, responses)

    def prepare(self, model: Any) -> None:
        self._vocab = _vocab_size(model)

    def empty(self, n: int) -> dict[str, np.ndarray]:
        # NaN marks "not scored" until `finish` gives empty completions their value
        return {name: np.full(n, np.nan) for name in self.names}

    def fill(self, out: dict[str, np.ndarray], forward: ResponseForward, model: Any, eos: set[int]) -> None:
        assert forward.predicting_hidden is not None
        _, lm_head, softcap, scale = _lm_head_parts(model)
        if lm_head is None:
            raise ValueError("the model has no separable LM head")
        mask = forward.completion_mask.bool()
        hidden = forward.predicting_hidden[mask.to(forward.predicting_hidden.device)]
        stats = token_stats_from_hidden(hidden, lm_head, forward.completion_ids[mask].to(hidden.device),
                                        chunk_size=self.chunk_size, softcap=softcap, logit_scale=scale)
        self._vocab = stats.vocab_size
        entropy = torch.zeros(mask.shape, dtype=stats.entropy.dtype)
        logprob = torch.zeros_like(entropy)
        entropy[mask] = stats.entropy.cpu()
        logprob[mask] = stats.selected_logprob.cpu()
        vocab_logprob = None
        if "self_certainty" in self.names:
            vocab_logprob = torch.zeros_like(entropy)
            vocab_logprob[mask] = mean_vocab_logprob_from_hidden(hidden, lm_head, softcap, scale).cpu().to(entropy.dtype)
        values = confidence_from_stats(entropy, logprob, vocab_logprob, forward.completion_mask, stats.vocab_size)
        if set(self.names) & set(CARL_SCORES):
            rewards, components = carl_reward_from_stats(entropy, logprob, forward.completion_mask, stats.vocab_size)
            values.update(components)
            values["carl"] = rewards
        for name in self.names:
            column = values[name].double()
            zero = 0.0 if name in CARL_SCORES else empty_value(name, stats.vocab_size)
            out[name][forward.rows] = torch.where(torch.isfinite(column), column, torch.full_like(column, zero)).numpy()

    def finish(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in self.names:
            blank = np.isnan(out[name])
            if blank.any():
                out[name][blank] = 0.0 if name in CARL_SCORES else empty_value(name, self._vocab or 2)
        return out

    def _score_separately(self, model: Any, tokenizer: Any,
                          responses: Sequence[GeneratedResponse]) -> dict[str, np.ndarray]:
        self.prepare(model)
        out = self.empty(len(responses))
        pad_id, _ = pad_and_eos_ids(model, tokenizer)
        for rows in _batches(len(responses), self.batch_size):
            scored = score_completions(model, [responses[i].prompt_ids for i in rows],
                                       [responses[i].completion_ids for i in rows], pad_token_id=pad_id,
                                       chunk_size=self.chunk_size, self_certainty="self_certainty" in self.names)
            for local, i in enumerate(rows):
                components = scored.components[local]
                if components is not None:
                    for name in self.names:
                        out[name][i] = scored.rewards[local] if name == "carl" else components[name]
        return self.finish(out)


class _StopForward(Exception):
    """Raised by the reading hook: the blocks above the read layer are not needed."""


class SteeringScorer:
    """Projection of the response's residual stream on an emotion's unit readout vector.

    The residual stream at `layer` (the readout convention: index i = output of decoder block i-1,
    0 = the input of block 0; default the readout's deepest layer) is averaged over the response's
    tokens only (prompt excluded; a trailing EOS excluded too, as it is the same token in every
    finished response and carries nothing of the response) and dotted with the emotion's vector.
    `batch_size` responses per forward; responses to the same prompt share one run of it
    (`carl_assets.dreams.forward`), else prompt + response run right-padded up to the read layer. A
    response with no tokens to read scores 0.0.
    """

    needs_predicting = False

    def __init__(self, vectors: SteeringVectors, emotion: str, layer: int | None = None, batch_size: int = 16):
        if emotion not in vectors.concepts:
            raise ValueError(f"unknown emotion {emotion!r}: the steering vectors know {sorted(vectors.concepts)}")
        self.layer = int(max(vectors.layers) if layer is None else layer)
        if self.layer not in vectors.vectors:
            raise ValueError(f"layer {self.layer} has no steering vectors (layers: {sorted(vectors.layers)})")
        self.emotion = emotion
        self.vector = vectors.vectors[self.layer][vectors.concepts.index(emotion)].detach().to(torch.float32)
        self.batch_size = batch_size
        self.primary = f"steering:{emotion}"

    @property
    def layers_needed(self) -> tuple[int, ...]:
        return (self.layer,)

    def __call__(self, model: Any, tokenizer: Any, responses: Sequence[GeneratedResponse]) -> dict[str, np.ndarray]:
        shared = score_with_shared_forward([self], model, tokenizer, responses, self.batch_size)
        return shared if shared is not None else self._score_separately(model, tokenizer, responses)

    def empty(self, n: int) -> dict[str, np.ndarray]:
        return {self.primary: np.zeros(n)}

    def fill(self, out: dict[str, np.ndarray], forward: ResponseForward, model: Any, eos: set[int]) -> None:
        mask = forward.completion_mask.clone()
        lengths = mask.sum(dim=1)
        last = forward.completion_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        drop_eos = (lengths > 1) & torch.as_tensor([int(t) in eos for t in last.tolist()], dtype=torch.bool)
        rows = drop_eos.nonzero().squeeze(1)
        mask[rows, lengths[rows] - 1] = 0
        out[self.primary][forward.rows] = self._mean_projection(forward.residual[self.layer], mask)

    def finish(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return out

    def _mean_projection(self, hidden: torch.Tensor, read: torch.Tensor) -> np.ndarray:
        weights = read.unsqueeze(-1).to(hidden.device)
        # where(), not a product: padded positions may hold NaN in some attention kernels
        summed = torch.where(weights > 0, hidden.float(), torch.zeros((), device=hidden.device)).sum(dim=1).cpu()
        counts = read.sum(dim=1).to(torch.float32)
        mean = summed / counts.clamp(min=1.0).unsqueeze(-1)
        projection = (mean.double() @ self.vector.double()).numpy()
        projection[counts.numpy() == 0] = 0.0
        return projection

    def _score_separately(self, model: Any, tokenizer: Any,
                          responses: Sequence[GeneratedResponse]) -> dict[str, np.ndarray]:
        pad_id, eos = pad_and_eos_ids(model, tokenizer)
        out = np.zeros(len(responses))
        for rows in _batches(len(responses), self.batch_size):
            sequences, spans = [], []
            for i in rows:
                completion = list(responses[i].completion_ids)
                if len(completion) > 1 and completion[-1] in eos:
                    completion = completion[:-1]
                spans.append((len(responses[i].prompt_ids), len(completion)))
                sequences.append(list(responses[i].prompt_ids) + completion)
            out[list(rows)] = self.project(model, sequences, spans, pad_id)
        return {self.primary: out}

    def project(self, model: Any, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]],
                pad_id: int) -> np.ndarray:
        """Mean residual-stream projection over positions `[start, start + length)` of each sequence."""
        width = max(len(s) for s in sequences)
        device = next(model.parameters()).device
        ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        read = torch.zeros((len(sequences), width), dtype=torch.float32)
        for r, (seq, (start, length)) in enumerate(zip(sequences, spans, strict=True)):
            ids[r, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            attention[r, : len(seq)] = 1
            read[r, start: start + length] = 1.0
        captured: dict[str, torch.Tensor] = {}
        blocks = find_decoder_blocks(model)
        if not 0 <= self.layer <= len(blocks):
            raise ValueError(f"layer {self.layer} is outside 0..{len(blocks)} for this model")

        def capture(hidden: torch.Tensor) -> None:
            captured["hidden"] = hidden
            raise _StopForward

        if self.layer == 0:  # what enters block 0
            handle = blocks[0].register_forward_pre_hook(
                lambda _m, args, kwargs: capture(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        else:
            handle = blocks[self.layer - 1].register_forward_hook(
                lambda _m, _i, output: capture(output[0] if isinstance(output, (tuple, list)) else output))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
            model.train(was_training)
        return self._mean_projection(captured["hidden"], read)


@dataclass
class CombinedScorer:
    """Runs each part and returns all their components plus `score` = sum of weight * primary component."""

    parts: list[tuple[Any, float]]
    batch_size: int = 32  # responses per shared forward

    @property
    def primary(self) -> str:
        return "score"

    def __call__(self, model: Any, tokenizer: Any, responses: Sequence[GeneratedResponse]) -> dict[str, np.ndarray]:
        scorers = [scorer for scorer, _ in self.parts]
        out = None
        if all(hasattr(s, "fill") for s in scorers):  # one shared forward feeds every part
            out = score_with_shared_forward(scorers, model, tokenizer, responses, self.batch_size)
        if out is None:
            out = {}
            for scorer in scorers:
                out.update(scorer(model, tokenizer, responses))
        score = np.zeros(len(responses))
        for scorer, weight in self.parts:
            score = score + weight * np.asarray(out[scorer.primary], dtype=np.float64)
        out["score"] = score
        return out

    @property
    def weights(self) -> dict[str, float]:
        return {scorer.primary: weight for scorer, weight in self.parts}


def score_with_shared_forward(scorers: Sequence[Any], model: Any, tokenizer: Any,
                              responses: Sequence[GeneratedResponse], batch_size: int) -> dict[str, np.ndarray] | None:
    """Every scorer's components from ONE shared-prompt forward per batch of responses (see
    `carl_assets.dreams.forward`), or None when the model cannot run it (callers then score separately).
    Empty completions are not run: they keep the scorers' empty values (0.0)."""
    n = len(responses)
    pad_id, eos = pad_and_eos_ids(model, tokenizer)
    outputs = [scorer.empty(n) for scorer in scorers]
    for scorer in scorers:
        if hasattr(scorer, "prepare"):
            scorer.prepare(model)
    layers = sorted({layer for scorer in scorers for layer in scorer.layers_needed})
    predicting = any(scorer.needs_predicting for scorer in scorers)
    non_empty = [i for i in range(n) if len(responses[i].completion_ids) > 0]
    for start in range(0, len(non_empty), batch_size):
        forward = run_response_forward(model, responses, non_empty[start: start + batch_size], layers=layers,
                                       want_predicting=predicting, pad_id=pad_id)
        if forward is None:
            return None
        for scorer, out in zip(scorers, outputs, strict=True):
            scorer.fill(out, forward, model, eos)
    merged: dict[str, np.ndarray] = {}
    for scorer, out in zip(scorers, outputs, strict=True):
        merged.update(scorer.finish(out))
    return merged


def parse_scorer_spec(spec: str, steering_vectors: SteeringVectors | None = None) -> CombinedScorer:
    """A scorer from a spec such as ``"carl"``, ``"self_certainty"``, ``"steering:warmth"`` or
    ``"carl:0.7,steering:warmth:0.3"``: comma-separated parts, each a scorer name with its arguments, and
    an optional trailing weight (default 1.0). Names: "carl" (`CarlScorer`, the seed's composite), the
    other `REWARD_NAMES` (`TokenScorer`), `steering:<emotion>` (needs `steering_vectors`)."""
    if not spec or not spec.strip():
        raise ValueError("empty scorer spec: expected e.g. 'carl' or 'carl:0.7,steering:warmth:0.3'")
    parts: list[tuple[Any, float]] = []
    for raw in spec.split(","):
        part = raw.strip()
        pieces = [p.strip() for p in part.split(":")]
        if not part or any(not p for p in pieces):
            raise ValueError(f"bad scorer spec part {part!r} in {spec!r}")
        weight = 1.0
        if len(pieces) > 1 and _is_number(pieces[-1]):
            weight = float(pieces.pop())
            if not math.isfinite(weight):
                raise ValueError(f"scorer spec part {part!r}: the weight must be finite")
        name, args = pieces[0].lower(), pieces[1:]
        if name == "carl":
            if args:
                raise ValueError(f"scorer spec part {part!r}: carl takes no arguments, only a weight")
            parts.append((CarlScorer(), weight))
        elif name in REWARD_NAMES:
            if args:
                raise ValueError(f"scorer spec part {part!r}: {name} takes no arguments, only a weight")
            parts.append((TokenScorer((name,)), weight))
        elif name == "steering":
            if len(args) != 1:
                raise ValueError(f"scorer spec part {part!r}: expected steering:<emotion>[:weight]")
            if steering_vectors is None:
                raise ValueError(f"scorer spec part {part!r} needs steering vectors, and none were given")
            parts.append((SteeringScorer(steering_vectors, args[0]), weight))
        else:
            raise ValueError(f"scorer spec part {part!r}: unknown scorer {pieces[0]!r} (known: "
                             f"{', '.join(REWARD_NAMES)}, steering:<emotion>)")
    names = [scorer.primary for scorer, _ in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"scorer spec {spec!r} names a scorer twice: {names}")
    return CombinedScorer(parts)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def score_responses(scorer: Any, model: Any, tokenizer: Any,
                    responses: Sequence[GeneratedResponse]) -> dict[str, np.ndarray]:
    """Run any scorer and make sure the result has a `score` column (a bare scorer's primary component)
    and one value per response in every column."""
    components = {k: np.asarray(v, dtype=np.float64) for k, v in scorer(model, tokenizer, responses).items()}
    bad = {k: v.shape for k, v in components.items() if v.shape != (len(responses),)}
    if bad:
        raise ValueError(f"scorer returned columns of the wrong shape for {len(responses)} responses: {bad}")
    if "score" not in components:
        primary = getattr(scorer, "primary", None)
        if primary not in components:
            raise ValueError(f"scorer returned {sorted(components)}: no 'score' column and no primary component")
        components["score"] = components[primary].copy()
    return components
