"""The amygdala readout at serving time: a text's residual stream projected on every emotion's vector.

What a vLLM readout computes while the model serves: at each readout layer, the residual stream
(the layer convention of `vectors`) dotted with each unit emotion vector, averaged over the text's
tokens. The mean of the projections is the projection of the mask-weighted mean activation, so one
`ResidualReader` pass with the `mean` reduction gives all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from carl_assets.steering.vectors import ResidualReader, SteeringVectors

READOUT_COLUMNS = ["text_index", "emotion", "layer", "projection"]


def readout_projections(model: Any, tokenizer: Any, texts: Sequence[str], vectors: SteeringVectors,
                        batch_size: int = 16, max_length: int = 512) -> pd.DataFrame:
    """One row per (text, emotion, layer): the mean over the text's tokens of the residual stream's
    projection on the emotion's unit vector. Texts are truncated to `max_length` tokens."""
    if not texts:
        return pd.DataFrame(columns=READOUT_COLUMNS)
    reader = ResidualReader(model, vectors.layers, reduction="mean")
    pad_token = tokenizer.pad_token
    if pad_token is None:  # GPT-2 style tokenizers: pad with EOS, the mask hides it
        tokenizer.pad_token = tokenizer.eos_token
    rows: list[dict[str, Any]] = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = [str(t) if str(t) else " " for t in texts[start:start + batch_size]]
            encoded = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            activations = reader(encoded["input_ids"], encoded["attention_mask"])  # [B, n_layers, H]
            for li, layer in enumerate(vectors.layers):
                matrix = vectors.vectors[layer].to(torch.float32)  # [E, H]
                projections = (activations[:, li].to(torch.float32) @ matrix.T).cpu().numpy()  # [B, E]
                for b in range(len(batch)):
                    for e, emotion in enumerate(vectors.concepts):
                        rows.append({"text_index": start + b, "emotion": emotion, "layer": int(layer),
                                     "projection": float(projections[b, e])})
    finally:
        if pad_token is None:
            tokenizer.pad_token = None
    return pd.DataFrame(rows, columns=READOUT_COLUMNS)
