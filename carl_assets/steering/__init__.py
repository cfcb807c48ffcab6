"""Amygdala readout vectors and the `steering-vectors` reference loader (`reference`).

The public names of the readout (see `carl_assets.steering.vectors` for the module of each) are
importable from here.
"""

from __future__ import annotations

from carl_assets.steering.vectors import (
    DEPTH_FRACTIONS,
    FORMAT,
    INDEX_CONVENTION,
    MANIFEST_FILE,
    REDUCTIONS,
    VECTORS_FILE,
    VLLM_ENV,
    ReadoutConfig,
    ResidualReader,
    SteeringVectors,
    ZeroNormError,
    auc,
    default_layers,
    encode_texts,
    find_decoder_blocks,
    heldout_mask,
    load_readout,
    model_max_positions,
    padded_batch,
    readout_problems,
    save_readout,
    tensor_key,
    token_limit,
    train_steering_vectors,
)

__all__ = [
    "DEPTH_FRACTIONS",
    "FORMAT",
    "INDEX_CONVENTION",
    "MANIFEST_FILE",
    "REDUCTIONS",
    "VECTORS_FILE",
    "VLLM_ENV",
    "ReadoutConfig",
    "ResidualReader",
    "SteeringVectors",
    "ZeroNormError",
    "auc",
    "default_layers",
    "encode_texts",
    "find_decoder_blocks",
    "heldout_mask",
    "load_readout",
    "model_max_positions",
    "padded_batch",
    "readout_problems",
    "save_readout",
    "tensor_key",
    "token_limit",
    "train_steering_vectors",
]
