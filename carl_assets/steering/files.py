"""The readout on disk: `vectors.safetensors` + `manifest.json`, written atomically, checked and read back."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, overload

import pandas as pd
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from carl_assets.steering.manifest import (
    FORMAT,
    INDEX_CONVENTION,
    MANIFEST_FILE,
    VECTORS_FILE,
    SteeringVectors,
    tensor_key,
)
from carl_assets.storage import atomic_write_bytes, atomic_write_json

LAYOUTS = ("per_layer", "ELH")
UNIT_NORM_TOLERANCE = 1e-4
CALIBRATION_COLUMNS = ["emotion", "layer", "mean_projection_positive", "mean_projection_negative"]


def save_readout(
    vectors: SteeringVectors, directory: str | os.PathLike[str], extra: Mapping[str, Any] | None = None
) -> Path:
    """Write `vectors.safetensors` (keys `layer_<idx>.vectors`) and `manifest.json`, each atomically.
    `extra` adds fields to the manifest (e.g. the emotions skipped for too few pairs)."""
    directory = Path(directory)
    tensors = {
        tensor_key(layer): vectors.vectors[layer].detach().to("cpu", torch.float32).contiguous()
        for layer in vectors.layers
    }
    manifest = {**vectors.manifest(), **(extra or {})}
    calibration = _calibration_records(vectors.stats)
    if calibration:  # the training projections' class means: a reader can place new texts on that scale
        manifest["calibration"] = calibration
    atomic_write_bytes(directory / VECTORS_FILE, safetensors_save(tensors, metadata={"format": FORMAT}))
    atomic_write_json(directory / MANIFEST_FILE, manifest)
    return directory


def _calibration_records(stats: pd.DataFrame | None) -> list[dict[str, Any]]:
    if stats is None or not set(CALIBRATION_COLUMNS) <= set(stats.columns):
        return []
    rows = stats[CALIBRATION_COLUMNS].dropna()
    return [
        {
            "emotion": str(r.emotion),
            "layer": int(r.layer),
            "mean_projection_positive": float(r.mean_projection_positive),
            "mean_projection_negative": float(r.mean_projection_negative),
        }
        for r in rows.itertuples(index=False)
    ]


def readout_problems(directory: str | os.PathLike[str]) -> list[str]:
    """Everything wrong with a saved readout: files, keys, shapes, dtypes, finiteness, unit norms."""
    directory = Path(directory)
    problems = [
        f"{name} is missing in {directory}"
        for name in (VECTORS_FILE, MANIFEST_FILE)
        if not (directory / name).is_file()
    ]
    if problems:
        return problems
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    tensors = safetensors_load((directory / VECTORS_FILE).read_bytes())
    concepts, layers = manifest.get("concepts", []), manifest.get("layers", [])
    expected = {tensor_key(layer) for layer in layers}
    if set(tensors) != expected:
        problems.append(f"tensor keys {sorted(tensors)} != manifest layers {sorted(expected)}")
    if len(set(concepts)) != len(concepts):
        problems.append("duplicate concepts in the manifest")
    if set(manifest.get("pair_counts", {})) != set(concepts):
        problems.append("pair_counts do not list exactly the manifest's concepts")
    for key in sorted(expected & set(tensors)):
        problems += _tensor_problems(key, tensors[key], (len(concepts), manifest.get("hidden_size")))
    return problems


def _tensor_problems(key: str, t: torch.Tensor, shape: tuple[int, Any]) -> list[str]:
    """What is wrong with one layer's tensor: shape, dtype, finiteness, unit rows."""
    problems = []
    if tuple(t.shape) != shape:
        problems.append(f"{key} has shape {tuple(t.shape)}, manifest says ({shape[0]}, {shape[1]})")
    if t.dtype != torch.float32:
        problems.append(f"{key} is {t.dtype}, not float32")
    if not bool(torch.isfinite(t).all()):
        problems.append(f"{key} has non-finite values")
    elif t.numel():
        err = float((t.double().norm(dim=-1) - 1).abs().max())
        if err > UNIT_NORM_TOLERANCE:
            problems.append(f"{key} rows are not unit norm (max |norm-1| = {err:.2e})")
    return problems


@overload
def load_readout(
    directory: str | os.PathLike[str], layout: Literal["per_layer"] = "per_layer"
) -> SteeringVectors: ...


@overload
def load_readout(directory: str | os.PathLike[str], layout: Literal["ELH"]) -> torch.Tensor: ...


def load_readout(
    directory: str | os.PathLike[str], layout: str = "per_layer"
) -> SteeringVectors | torch.Tensor:
    """Read a readout written by `save_readout`; ValueError if files and manifest disagree.

    `layout="per_layer"`: a `SteeringVectors`; `layout="ELH"`: the reference's
    `[n_concepts, n_layers, hidden]` tensor (concepts and layers in manifest order)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, not {layout!r}")
    directory = Path(directory)
    problems = readout_problems(directory)
    if problems:
        raise ValueError(f"invalid readout in {directory}: " + "; ".join(problems))
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    tensors = safetensors_load((directory / VECTORS_FILE).read_bytes())
    layers = [int(x) for x in manifest["layers"]]
    vectors = SteeringVectors(
        concepts=list(manifest["concepts"]),
        layers=layers,
        vectors={layer: tensors[tensor_key(layer)] for layer in layers},
        pair_counts={
            c: {k: int(v) for k, v in d.items()} for c, d in manifest.get("pair_counts", {}).items()
        },
        model=manifest.get("model", ""),
        reduction=manifest.get("token_reduction", "last"),
        index_convention=manifest.get("index_convention", INDEX_CONVENTION),
        dropped=dict(manifest.get("dropped", {})),
        truncated_texts=int(manifest.get("truncated_texts", 0)),
        max_tokens=manifest.get("max_tokens"),
        bos_excluded=bool(manifest.get("bos_excluded", False)),
        skipped_reason=str(manifest.get("skipped_reason", "")),
    )
    if manifest.get("calibration"):
        vectors.stats = pd.DataFrame(manifest["calibration"])
    return vectors.as_tensor() if layout == "ELH" else vectors
