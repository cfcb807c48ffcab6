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

from carl_assets.steering.projection import project_texts
from carl_assets.steering.vectors import SteeringVectors

READOUT_COLUMNS = ["text_index", "emotion", "layer", "projection", "calibrated"]


def readout_projections(model: Any, tokenizer: Any, texts: Sequence[str], vectors: SteeringVectors,
                        batch_size: int = 16, max_length: int = 512) -> pd.DataFrame:
    """One row per (text, emotion, layer): the projection and its calibrated value (NaN when the readout
    carries no training statistics). Empty texts are read as one space."""
    texts = [str(t) if str(t) else " " for t in texts]
    if not texts:
        return pd.DataFrame(columns=READOUT_COLUMNS)
    frame = project_texts(model, tokenizer, vectors, texts, batch_size=batch_size, max_length=max_length)
    return frame[READOUT_COLUMNS]
