"""Typed handles: what a downstream asset receives for each upstream asset it declares as an input.

An asset's data lives in two places: its artifact version folder (`artifacts/<asset>/<version>/`, see
`carl_assets.artifacts`) and the DuckDB tables it writes. A handle names both for one upstream asset, as
resolved once when the run loads the input: the version *this run* made (overlapping runs may have
promoted another `current` meanwhile), else the current one. Reading through a handle is therefore
reading a declared input; a table the upstream does not write is refused, naming its owner.

Nothing here imports Dagster: `carl_assets.defs.io_manager` builds handles for the asset graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from carl_assets import storage
from carl_assets.artifacts import VERSION_FILE
from carl_assets.models.defaults import is_offline_model

# asset -> the DuckDB tables it writes (its own; `artifact_versions` is the store's bookkeeping, no asset's).
TABLE_OWNERS: dict[str, tuple[str, ...]] = {
    "memory_graph": ("memory_nodes", "memory_edges", "memory_rejects", "memory_file_metadata"),
    "emotion_tags": ("emotion_tags", "emotion_tag_nodes"),
    "emotion_training_pairs": ("emotion_training_pairs",),
    "base_model": (),
    "steering_vectors": (
        "steering_vector_stats",
        "steering_layer_sweep",
        "steering_cross_talk",
        "steering_heldout_projections",
    ),
    "scorer_validation": ("scorer_validation", "scorer_validation_items"),
    "dream_scenarios": ("dream_scenarios", "dream_cycles", "dream_heldout"),
    "sft_dataset": ("sft_dataset", "agent_tasks"),
    "sft_checkpoint": ("checkpoint_provenance",),
    "crystallization_events": ("crystallization_events", "training_log"),
    "grpo_checkpoint": ("grpo_rewards", "grpo_completions", "checkpoint_provenance"),
    "agent_evaluation": ("agent_evaluation", "agent_evaluation_summary", "agent_readout"),
    "leworld_memory": (),
    "leworld_dataset": ("leworld_dataset_index",),
    "leworld_model": ("leworld_metrics",),
    "leworld_evaluation": (
        "leworld_evaluation",
        "leworld_evaluation_steps",
        "leworld_evaluation_seeds",
        "leworld_memory_verdict",
    ),
}

# The dream loop's back edges: reads that go against the asset graph. The previous cycle's policy (the newest
# grpo_checkpoint) is downstream of the assets that start the next cycle, and Dagster's graph is acyclic, so
# it cannot be their input. dream_scenarios and scorer_validation read `current` once and record the version
# they read (dream_scenarios in the cycle's state and `dream_cycles`, scorer_validation in its `policy`
# column); sft_checkpoint starts from the policy version that cycle state names. A `start_from` set in the
# config (a rollback) reads the version it names. Nothing else may read against the graph.
CYCLE_BACK_EDGES: dict[str, tuple[str, ...]] = {
    "dream_scenarios": ("grpo_checkpoint",),
    "scorer_validation": ("grpo_checkpoint",),
    "sft_checkpoint": ("grpo_checkpoint",),
}

DATASET_DIR = "dataset"  # the HF dataset (save_to_disk) inside an sft_dataset version
GRPO_PROMPTS_DIR = "grpo_prompts"  # the prompts held out of SFT for GRPO, beside it


def table_owners(table: str) -> tuple[str, ...]:
    """The assets that write `table` (empty when none does: a bookkeeping table)."""
    return tuple(asset for asset, tables in TABLE_OWNERS.items() if table in tables)


@dataclass(frozen=True)
class AssetHandle:
    """One upstream asset as this run sees it.

    asset: the upstream asset's name; version: its artifact version folder name (None when the asset keeps
    no folder, or has never been materialized); path: that folder; database: the DuckDB file; tables: the
    tables the asset writes (`TABLE_OWNERS`)."""

    asset: str
    version: str | None
    path: Path | None
    database: Path
    tables: tuple[str, ...] = ()

    def file(self, name: str = "") -> Path:
        """`path/name` (the folder itself for an empty name). FileNotFoundError naming the asset when it
        has no version or the file is not in it."""
        if self.path is None:
            raise FileNotFoundError(f"{self.asset!r} has no artifact version: materialize it first")
        target = self.path / name if name else self.path
        if not target.exists():
            raise FileNotFoundError(
                f"{target} is missing from {self.asset}@{self.version}: materialize it again ({self.asset!r})"
            )
        return target

    def read(self, table: str) -> pd.DataFrame:
        """The whole DuckDB table `table`, which this asset writes. KeyError naming the table's owner when it
        is another asset's (declare that asset as an input instead); LookupError (as
        `storage.read_table`) when it was never written; FileNotFoundError when there is no database."""
        if table not in self.tables:
            owners = table_owners(table)
            whose = f"it is written by {', '.join(owners)}" if owners else "no asset writes it"
            raise KeyError(
                f"{self.asset!r} does not write table {table!r}: {whose}; declare that asset as an "
                "input and read it from its handle"
            )
        return storage.read_table(self.database, table)

    @property
    def version_info(self) -> dict[str, Any]:
        """This version's `_version.json` (asset, version, run_id, created_at, parents, extra); {} without
        one."""
        if self.path is None or not (self.path / VERSION_FILE).is_file():
            return {}
        return json.loads((self.path / VERSION_FILE).read_text())


@dataclass(frozen=True)
class Checkpoint(AssetHandle):
    """A model folder (Hugging Face layout): base_model, sft_checkpoint, grpo_checkpoint."""

    @property
    def is_offline(self) -> bool:
        """Whether the folder is the offline default model (`models.defaults.is_offline_model`); False
        without a version. Checkpoints trained from it carry no record: ask the base model's handle."""
        return self.path is not None and is_offline_model(self.path)


@dataclass(frozen=True)
class DatasetVersion(AssetHandle):
    """An sft_dataset version: the HF dataset, the GRPO prompts held out of it, and what it recorded."""

    @property
    def dataset_dir(self) -> Path:
        """The HF dataset folder (`datasets.load_from_disk`); FileNotFoundError naming sft_dataset if it is
        missing."""
        return self.file(DATASET_DIR)

    @property
    def grpo_prompts_dir(self) -> Path:
        """The held-out GRPO prompts folder (it may not exist: the caller decides what that means)."""
        return self.file() / GRPO_PROMPTS_DIR

    @property
    def info(self) -> dict[str, Any]:
        """The version's extra fields (`ArtifactVersions.record(..., key=value)`): the dream cycle etc."""
        return dict(self.version_info.get("extra", {}))


@dataclass(frozen=True)
class Readout(AssetHandle):
    """A steering_vectors version: `vectors.safetensors` + `manifest.json` (load with steering.readout)."""


HANDLE_TYPES: dict[str, type[AssetHandle]] = {
    "base_model": Checkpoint,
    "sft_checkpoint": Checkpoint,
    "grpo_checkpoint": Checkpoint,
    "sft_dataset": DatasetVersion,
    "steering_vectors": Readout,
}


def make_handle(asset: str, version: str | None, path: Path | None, database: Path) -> AssetHandle:
    """The handle of `asset`'s class (`HANDLE_TYPES`, default `AssetHandle`) with its tables."""
    cls = HANDLE_TYPES.get(asset, AssetHandle)
    return cls(
        asset=asset, version=version, path=path, database=Path(database), tables=TABLE_OWNERS.get(asset, ())
    )
