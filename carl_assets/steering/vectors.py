"""Amygdala readout vectors: per-layer CAA diff-of-means directions from (emotion, polarity, text) pairs.

The public names, importable from here (and from `carl_assets.steering`) as before the readout was
split into its steps:
- `manifest`: the readout's data type `SteeringVectors`, its manifest and file names;
- `residual`: the decoder blocks, the layer indices and `ResidualReader` (the conventions);
- `tokens`: texts to token batches under the model's position limit;
- `pairs`: the pairs frame and its deterministic held-out split;
- `training`: `ReadoutConfig`, `ReadoutOptions` and `train_steering_vectors`, composed of extraction,
  aggregation, scoring;
- `stats`: AUC and the per (emotion, layer) stats;
- `files`: `save_readout`, `load_readout`, `readout_problems`.
"""

from __future__ import annotations

from carl_assets.models.loading import model_max_positions
from carl_assets.steering.files import load_readout, readout_problems, save_readout
from carl_assets.steering.manifest import (
    FORMAT,
    INDEX_CONVENTION,
    MANIFEST_FILE,
    REDUCTIONS,
    VECTORS_FILE,
    VLLM_ENV,
    SteeringVectors,
    tensor_key,
)
from carl_assets.steering.pairs import heldout_mask
from carl_assets.steering.residual import DEPTH_FRACTIONS, ResidualReader, default_layers, find_decoder_blocks
from carl_assets.steering.stats import auc
from carl_assets.steering.tokens import encode_texts, padded_batch, token_limit
from carl_assets.steering.training import ReadoutConfig, ReadoutOptions, ZeroNormError, train_steering_vectors

__all__ = [
    "DEPTH_FRACTIONS",
    "FORMAT",
    "INDEX_CONVENTION",
    "MANIFEST_FILE",
    "REDUCTIONS",
    "VECTORS_FILE",
    "VLLM_ENV",
    "ReadoutConfig",
    "ReadoutOptions",
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
