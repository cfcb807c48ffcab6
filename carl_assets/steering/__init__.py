"""Amygdala readout vectors (`vectors`) and the `steering-vectors` reference loader (`reference`).

The public names of `carl_assets.steering.vectors` are importable from here, the path DESIGN.md names.
"""

from __future__ import annotations

import importlib
from typing import Any

from carl_assets.steering.vectors import (
    DEPTH_FRACTIONS,
    FORMAT,
    INDEX_CONVENTION,
    MANIFEST_FILE,
    REDUCTIONS,
    VECTORS_FILE,
    VLLM_ENV,
    ResidualReader,
    SteeringVectors,
    ZeroNormError,
    auc,
    default_layers,
    find_decoder_blocks,
    heldout_mask,
    load_readout,
    model_max_positions,
    readout_problems,
    save_readout,
    tensor_key,
    train_steering_vectors,
)

__all__ = [
    "DEPTH_FRACTIONS", "FORMAT", "INDEX_CONVENTION", "MANIFEST_FILE", "REDUCTIONS", "VECTORS_FILE",
    "ResidualReader", "SteeringVectors", "ZeroNormError", "auc", "default_layers", "find_decoder_blocks",
    "heldout_mask", "load_readout", "readout_problems", "save_readout", "tensor_key", "train_steering_vectors",
    "VLLM_ENV", "model_max_positions",
]


def __getattr__(name: str) -> Any:  # PEP 562: the rest of `vectors` (helpers the tests reach for)
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return getattr(importlib.import_module("carl_assets.steering.vectors"), name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
