"""The amygdala readout at serving time: a text's residual stream projected on every emotion's vector.

What a vLLM readout computes while the model serves: at each readout layer, the residual stream (the
layer convention of `vectors`) reduced as the vectors were trained (the mean over tokens, BOS left out)
and dotted with each unit emotion vector; `calibrated` puts it on the training data's scale (0: a
typical negative, 1: a typical positive). A thin name over `projection.project_texts`, which the
generalisation check uses too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from carl_assets.steering.manifest import SteeringVectors
from carl_assets.steering.projection import project_texts
from carl_assets.steering.training import ReadoutConfig

READOUT_COLUMNS = ["text_index", "emotion", "layer", "projection", "calibrated"]
# How served turns (the agent's, the CLI's) are read: the readout's token limit and BOS rule, 16 texts a pass.
SERVING_READ = ReadoutConfig(batch_size=16)


def readout_projections(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    vectors: SteeringVectors,
    read: ReadoutConfig,
) -> pd.DataFrame:
    """One row per (text, emotion, layer): the projection and its calibrated value (NaN when the readout
    carries no training statistics). Empty texts are read as one space. `read`: see `project_texts`
    (`SERVING_READ` is how served turns are read)."""
    texts = [str(t) if str(t) else " " for t in texts]
    if not texts:
        return pd.DataFrame(columns=READOUT_COLUMNS)
    frame = project_texts(model, tokenizer, vectors, texts, read)
    return frame[READOUT_COLUMNS]


class EmptyReadoutError(ValueError):
    """A consumer asked for emotions from a readout that has none (steering_vectors was skipped)."""


def empty_readout(reason: str, model: str = "", *, reduction: str) -> SteeringVectors:
    """A readout with zero concepts and layers that says why (`skipped_reason`): what `steering_vectors`
    saves when there are no usable pairs, so readers can skip with that reason instead of failing."""
    if not reason:
        raise ValueError("an empty readout needs the reason it is empty")
    return SteeringVectors(
        concepts=[], layers=[], vectors={}, model=model, reduction=reduction, skipped_reason=reason
    )


def readout_skipped(vectors: SteeringVectors) -> str:
    """Why the readout holds no emotion ("" when it holds at least one)."""
    if vectors.concepts:
        return ""
    return vectors.skipped_reason or "the readout has no emotion vectors"


def require_concepts(vectors: SteeringVectors, needed_by: str) -> SteeringVectors:
    """`vectors`, or `EmptyReadoutError` naming `needed_by` (the config that asked for the readout, e.g.
    "dream_scenarios.scorer = 'steering:warmth'") and why steering_vectors has no emotions."""
    reason = readout_skipped(vectors)
    if reason:
        raise EmptyReadoutError(
            f"{needed_by} needs steering vectors, but steering_vectors was skipped: {reason}. "
            "Give the memory "
            "graph emotion tags (then rematerialize emotion_training_pairs and steering_vectors), or change "
            f"{needed_by.split(' ')[0]} to not use a steering scorer"
        )
    return vectors
