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

from carl_assets.carl.reward_fn import REWARD_NAMES
from carl_assets.dreams.forward import score_with_shared_forward
from carl_assets.dreams.generation import GeneratedResponse
from carl_assets.dreams.steering_scorer import SteeringScorer
from carl_assets.dreams.token_scorers import CarlScorer, TokenScorer
from carl_assets.steering.manifest import SteeringVectors

__all__ = [
    "CarlScorer",
    "CombinedScorer",
    "Scorer",
    "SteeringScorer",
    "TokenScorer",
    "parse_scorer_spec",
    "score_responses",
    "score_with_shared_forward",
]


class Scorer(Protocol):
    """Scores responses: named components, one float per response each. `primary` names the component
    that counts as the scorer's score in a weighted combination."""

    primary: str

    def __call__(
        self, model: Any, tokenizer: Any, responses: Sequence[GeneratedResponse]
    ) -> dict[str, np.ndarray]: ...


@dataclass
class CombinedScorer:
    """Runs each part and returns all their components plus `score` = sum of weight * primary component."""

    parts: list[tuple[Any, float]]
    batch_size: int = 32  # responses per shared forward

    @property
    def primary(self) -> str:
        return "score"

    def __call__(
        self, model: Any, tokenizer: Any, responses: Sequence[GeneratedResponse]
    ) -> dict[str, np.ndarray]:
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


def parse_scorer_spec(spec: str, steering_vectors: SteeringVectors | None = None) -> CombinedScorer:
    """A scorer from a spec such as ``"carl"``, ``"self_certainty"``, ``"steering:warmth"`` or
    ``"carl:0.7,steering:warmth:0.3"``: comma-separated parts, each a scorer name with its arguments, and
    an optional trailing weight (default 1.0). Names: "carl" (`CarlScorer`, the reference's composite), the
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
            raise ValueError(
                f"scorer spec part {part!r}: unknown scorer {pieces[0]!r} (known: "
                f"{', '.join(REWARD_NAMES)}, steering:<emotion>)"
            )
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


def score_responses(
    scorer: Any, model: Any, tokenizer: Any, responses: Sequence[GeneratedResponse]
) -> dict[str, np.ndarray]:
    """Run any scorer and make sure the result has a `score` column (a bare scorer's primary component)
    and one value per response in every column."""
    components = {k: np.asarray(v, dtype=np.float64) for k, v in scorer(model, tokenizer, responses).items()}
    bad = {k: v.shape for k, v in components.items() if v.shape != (len(responses),)}
    if bad:
        raise ValueError(f"scorer returned columns of the wrong shape for {len(responses)} responses: {bad}")
    if "score" not in components:
        primary = getattr(scorer, "primary", None)
        if primary not in components:
            raise ValueError(
                f"scorer returned {sorted(components)}: no 'score' column and no primary component"
            )
        components["score"] = components[primary].copy()
    return components
