"""Where a model comes from (`resolve_model_source`: offline, packaged, GGUF, local folder, hub id) and the
weight-format rule for folders (safetensors only, unless pickles are explicitly allowed)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from carl_assets.models.packaged import is_packaged_model, packaged_model_file

OFFLINE_SPECS = {"", "offline", "default"}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model spec."""

    kind: str  # "offline", "local", "hub", "packaged" or "gguf"
    value: str  # "" for offline, the packaged model's name, else the resolved path or the hub id


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def resolve_model_source(spec: str | None) -> ModelSource:
    """`""`/`"offline"` → the offline default; a packaged model's name (`smollm2-135m-instruct`) →
    packaged; an existing `.gguf` file → gguf; an existing folder → local (an asset's artifact folder,
    `artifacts/<asset>`, → its `current` version); `org/name` → a hub id.

    Something that looks like a path but does not exist is a clear error, not a hub lookup; so is a
    packaged model whose package is not installed (the error gives the pip command).
    """
    spec = (spec or "").strip()
    if spec.lower() in OFFLINE_SPECS:
        return ModelSource("offline", "")
    if is_packaged_model(spec):
        packaged_model_file(spec)  # fail fast, with the install command, when the package is missing
        return ModelSource("packaged", spec.lower())
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {spec!r} does not exist")
        return ModelSource("gguf", str(path.resolve()))
    if path.exists():
        if (path / "current" / "config.json").exists() and not (path / "config.json").exists():
            # an asset's artifact folder (the README's `.carl/artifacts/grpo_checkpoint`)
            path = path / "current"
        if not path.is_dir() or not (path / "config.json").exists():
            raise FileNotFoundError(f"model path {path} is not a Hugging Face model folder (no config.json)")
        return ModelSource("local", str(path.resolve()))
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec
    if looks_like_path or not _HUB_ID.match(spec):
        raise FileNotFoundError(f"model path {spec!r} does not exist (and is not a hub id like 'org/name')")
    return ModelSource("hub", spec)


# Weights stored as Python pickles (torch.save): unpickling can run arbitrary code.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_NOT_WEIGHTS = {"training_args.bin"}  # a Trainer's pickle beside the weights, never loaded here


def pickle_weight_files(folder: str | os.PathLike[str]) -> list[str]:
    """Names of the pickle weight files (`pytorch_model*.bin`, `*.pt`, `*.pth`, `*.pkl`, `*.ckpt`) in
    `folder`."""
    return sorted(
        p.name
        for p in Path(folder).iterdir()
        if p.is_file() and p.suffix in _PICKLE_SUFFIXES and p.name not in _NOT_WEIGHTS
    )


def check_weight_format(folder: str | os.PathLike[str], allow_pickle: bool = False) -> None:
    """Refuse a model folder whose only weights are pickles, unless `allow_pickle`.

    A folder with safetensors weights passes (they are what gets loaded: `use_safetensors=True`)."""
    folder = Path(folder)
    if allow_pickle or any(folder.glob("*.safetensors")):
        return
    pickles = pickle_weight_files(folder)
    if pickles:
        raise ValueError(
            f"model folder {str(folder)!r} holds only pickle weights ({', '.join(pickles)}): "
            "unpickling can run "
            "arbitrary code. Convert them to safetensors, or pass allow_pickle=True (carl --allow-pickle) "
            "if you trust where the folder came from"
        )


def gguf_source_file(source: ModelSource) -> Path:
    """The GGUF file behind a `gguf` or `packaged` source."""
    return packaged_model_file(source.value) if source.kind == "packaged" else Path(source.value)
