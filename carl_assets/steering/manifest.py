"""The readout's data type (`SteeringVectors`) and the manifest that describes its tensors.

Keys `layer_<idx>.vectors`, each `[n_concepts, hidden]` float32, as a vLLM readout loads them; the
manifest states the layer index convention, the token reduction and how the vectors were made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch

VECTORS_FILE = "vectors.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "carl-amygdala-readout/1"
INDEX_CONVENTION = (
    "layer i = residual stream after decoder block i-1 (0 = embeddings, the input of block 0), "
    "before the final norm "
    "(what a vLLM readout sees as hidden_states + residual)"
)
# How a text's per-token activations become one vector (the readout's reduction).
Reduction = Literal["last", "mean"]
REDUCTIONS = {
    "last": "last real token of each text (from the attention mask)",
    "mean": "attention-mask-weighted mean over the real tokens of each text",
}
BOS_EXCLUDED = ", leaving out a leading BOS token"
# The env vars a vLLM readout reads (the reference's ReadoutManager); paths relative to the manifest's folder.
VLLM_ENV = {"VLLM_READOUT_VECTORS": "vectors.safetensors", "VLLM_READOUT_MANIFEST": "manifest.json"}


def tensor_key(layer: int) -> str:
    """The safetensors key of one layer's `[n_concepts, hidden]` vectors."""
    return f"layer_{int(layer)}.vectors"


@dataclass
class SteeringVectors:
    """Unit readout directions: `vectors[layer]` is `[len(concepts), hidden]` float32, row k = concepts[k]."""

    concepts: list[str]
    layers: list[int]
    vectors: dict[int, torch.Tensor]
    pair_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    model: str = ""
    reduction: str = "last"
    index_convention: str = INDEX_CONVENTION
    stats: pd.DataFrame | None = None  # per (emotion, layer): counts, raw norm, held-out AUC
    dropped: dict[str, str] = field(default_factory=dict)  # concept -> why it has no vector
    truncated_texts: int = 0  # unique texts cut to `max_tokens`
    max_tokens: int | None = None  # the token limit applied: min(max_length, the model's positions)
    bos_excluded: bool = False  # a leading BOS token was left out of the mean reduction
    # Why the readout has no concepts at all (e.g. an untagged memory graph gave no pairs); "" otherwise.
    skipped_reason: str = ""
    # Reduced activations per unique text, `[len(layers), hidden]`, only when asked for (the layer
    # sweep hands them to the main run so those texts are not run twice); never saved.
    activations: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.vectors.values())).shape[1]) if self.vectors else 0

    def as_tensor(self) -> torch.Tensor:
        """The reference's `[E, L, H]` view: concept k, the k-th of `layers` (in order), hidden."""
        if not self.layers:
            return torch.zeros(len(self.concepts), 0, 0)
        return torch.stack([self.vectors[layer] for layer in self.layers], dim=1)

    def manifest(self) -> dict[str, Any]:
        """The manifest written beside the tensors (see `save_readout`)."""
        detail = REDUCTIONS.get(self.reduction, self.reduction)
        if self.bos_excluded and self.reduction == "mean":
            detail += BOS_EXCLUDED
        return {
            "format": FORMAT,
            "concepts": list(self.concepts),
            "layers": [int(x) for x in self.layers],
            "hidden_size": self.hidden_size,
            "n_concepts": len(self.concepts),
            "dtype": "float32",
            "tensor_keys": {str(layer): tensor_key(layer) for layer in self.layers},
            "model": self.model,
            "method": "CAA: mean(positive) - mean(negative), normalised to unit length per concept and layer",
            "index_convention": self.index_convention,
            "token_reduction": self.reduction,
            "token_reduction_detail": detail,
            "bos_excluded": bool(self.bos_excluded),
            "max_tokens": self.max_tokens,
            "truncated_texts": int(self.truncated_texts),
            "elh_view": "stack layer_<idx>.vectors in `layers` order on dim 1: "
            "[n_concepts, n_layers, hidden]",
            "vllm_env": dict(VLLM_ENV),
            "vllm_env_note": "paths relative to the folder holding this manifest",
            "pair_counts": {c: dict(self.pair_counts.get(c, {})) for c in self.concepts},
            "dropped": dict(self.dropped),
            **({"skipped_reason": self.skipped_reason} if self.skipped_reason else {}),
        }
