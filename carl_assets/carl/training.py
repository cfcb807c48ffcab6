"""SFT until crystallization, then GRPO on the CARL reward (TRL), on CPU or an accelerator: the public names
in one place, and the datasets `carl train` reads.

- `carl_assets.carl.run_config`: `SFTRunConfig`, `GRPORunConfig` (each setting once; None: the model's
  default, `resolved(offline)`);
- `carl_assets.carl.trl_config`: `trl_config`, the one mapping of a run config onto TRL's config;
- `carl_assets.carl.sft_trainer`: `train_sft` (the crystallization gate), `SFTOutcome`;
- `carl_assets.carl.grpo_trainer`: `train_grpo` (a reward of the policy itself), `GRPOOutcome`;
- `carl_assets.carl.trainer_checkpoints`: resuming an interrupted run; `trainer_common`: logs, saving.

No Dagster import here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import load_dataset, load_from_disk

from carl_assets.carl.grpo_trainer import CARL_COMPONENTS, GRPO_LOG_FILE, GRPOOutcome, train_grpo
from carl_assets.carl.run_config import GRPORunConfig, SFTRunConfig
from carl_assets.carl.sft_trainer import TRAINING_LOG_FILE, SFTOutcome, prompt_lengths, train_sft
from carl_assets.carl.trainer_checkpoints import (
    CHECKPOINT_PREFIX,
    DEFAULT_SAVE_STEPS,
    GRPO_COMPLETIONS_FILE,
    TrainerCheckpoint,
    latest_checkpoint,
)
from carl_assets.carl.trainer_common import StepLogger

__all__ = [
    "CARL_COMPONENTS",
    "CHECKPOINT_PREFIX",
    "DEFAULT_SAVE_STEPS",
    "GRPO_COMPLETIONS_FILE",
    "GRPO_LOG_FILE",
    "TRAINING_LOG_FILE",
    "GRPOOutcome",
    "GRPORunConfig",
    "SFTOutcome",
    "SFTRunConfig",
    "StepLogger",
    "TrainerCheckpoint",
    "latest_checkpoint",
    "load_training_dataset",
    "prompt_lengths",
    "train_grpo",
    "train_sft",
]

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_training_dataset(spec: str, split: str = "train") -> Any:
    """A `datasets.Dataset` from a local .jsonl/.json/.parquet/.csv file, a folder written by
    `save_to_disk`, or a named Hugging Face dataset (which needs the hub or its cache)."""
    spec = str(spec).strip()
    if not spec:
        raise ValueError("no dataset given")
    path = Path(spec).expanduser()
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"unsupported dataset file {path.name!r}: use .jsonl, .json, .parquet or .csv")
        return load_dataset(builder, data_files=str(path), split="train")
    if path.is_dir():
        loaded = load_from_disk(str(path))
        if hasattr(loaded, "keys"):  # a DatasetDict
            if split not in loaded:
                raise ValueError(
                    f"dataset folder {path} has no split {split!r} (has {sorted(loaded.keys())})"
                )
            loaded = loaded[split]
        return loaded
    looks_like_path = (
        spec.startswith(("/", ".", "~")) or path.suffix.lower() in _FILE_BUILDERS or spec.count("/") > 1
    )
    if looks_like_path:
        raise FileNotFoundError(f"dataset file {spec!r} does not exist")
    return load_dataset(spec, split=split)
