"""LeWorld data assets: the addressable bit memory and the state-transition dataset generated from it.

The science lives in `carl_assets.leworld` (populators, sequence generation); these assets take their
declared upstreams as handles (`carl_assets.handles`), call it, write safetensors / DuckDB and report
metadata. `carl_assets.defs.leworld` collects them with the model and its evaluation.
"""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import torch
from dagster_duckdb import DuckDBResource
from safetensors.torch import load_file, save_file

from carl_assets.defs.common import library_config, materialized, table_preview
from carl_assets.defs.resources import ArtifactStore, write_tables
from carl_assets.handles import AssetHandle
from carl_assets.leworld.architecture import ArtificialMemory, MemoryConfig
from carl_assets.leworld.data import (
    MAX_LENGTH,
    MIN_LENGTH,
    DatasetSettings,
    SequenceBatch,
    generate_splits,
)
from carl_assets.leworld.memory import MemorySettings
from carl_assets.leworld.populators import (
    REGIONS,
    from_experience,
    random_bits,
    region_of,
    structured_patterns,
    text_experiences,
)
from carl_assets.storage import content_hash

GROUP = "leworld"
MEMORY_FILE = "memory.safetensors"
DATASET_FILE = "dataset.json"


class LeWorldMemoryConfig(dg.Config, MemorySettings):
    """leworld_memory: its size and the populator that fills it (each setting defined once, in
    `carl_assets.leworld.memory.MemorySettings`)."""


class LeWorldDatasetConfig(dg.Config, DatasetSettings):
    """leworld_dataset: the splits' sizes and the dynamics' difficulty, mix and cue (each setting defined
    once, in `carl_assets.leworld.data.DatasetSettings`)."""


def load_memory_bits(leworld_memory: AssetHandle) -> torch.Tensor:
    """The memory's bits, [num_words, word_size] float32 in {0, 1}, from a leworld_memory version."""
    return load_file(str(leworld_memory.file(MEMORY_FILE)))["bits"].to(torch.float32)


def load_split(leworld_dataset: AssetHandle, split: str) -> SequenceBatch:
    """One split ('train' or 'validation') of a leworld_dataset version."""
    return SequenceBatch.from_tensors(load_file(str(leworld_dataset.file(f"{split}.safetensors"))))


def _populate(config: MemorySettings, memory_graph: AssetHandle
              ) -> tuple[ArtificialMemory, dict[str, object]]:
    """The memory filled by the configured populator, and what the `experience` one reports."""
    memory = ArtificialMemory(MemoryConfig(num_words=config.num_words, word_size=config.word_size))
    if config.populator == "structured":
        structured_patterns(memory, config.seed)
        return memory, {}
    if config.populator == "random":
        random_bits(memory, config.seed)
        return memory, {}
    try:
        nodes = memory_graph.read("memory_nodes")
    except LookupError as exc:
        raise LookupError("populator='experience' reads the DuckDB table memory_nodes (column text): "
                          "materialize memory_graph first") from exc
    features = text_experiences(nodes["text"].astype(str).tolist(), config.word_size, config.seed)
    if not len(features):
        raise ValueError("memory_nodes has no text to populate the LeWorld memory from")
    # One word per sentence, repeated to fill the memory (the reference left the rest untouched).
    return memory, {"experience_rows": from_experience(memory, features, tile=True), "nodes": len(nodes)}


# memory_graph is an input always: Dagster edges are static, and the `experience` populator reads its table.
# For the other populators the edge only costs a "stale" mark when the memory graph changes.
@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "safetensors"},
    description="The addressable bit memory (65,536 words by default), filled by a populator: structured "
    "patterns (default), random bits, or sentences of the memory graph's node texts (DuckDB `memory_nodes`, "
    "hence the memory_graph edge).",
)
def leworld_memory(context: dg.AssetExecutionContext, config: LeWorldMemoryConfig, memory_graph: AssetHandle,
                   artifacts: ArtifactStore) -> dg.MaterializeResult:
    memory, extra = _populate(library_config(config, MemorySettings), memory_graph)
    bits = memory.memory.to(torch.uint8)
    with artifacts.write_version("leworld_memory") as (tmp, version):
        save_file({"bits": bits}, str(tmp / MEMORY_FILE), metadata={"populator": config.populator})
    quarters = region_of(torch.arange(config.num_words), config.num_words)
    density = {f"bit_density_{name}": float(bits[quarters == i].float().mean())
               for i, name in enumerate(REGIONS)}
    context.log.info(f"leworld_memory: {config.populator}, {tuple(bits.shape)}")
    return materialized(bits, config=config, metadata={
        "shape": list(bits.shape), "populator": config.populator, "bit_density": float(bits.float().mean()),
        **density, **extra, "path": str(artifacts.path("leworld_memory", version) / MEMORY_FILE)})


def _dataset_index(splits: dict[str, SequenceBatch], num_words: int) -> pd.DataFrame:
    """One row per sequence: its relevant regions (start/end of 3 slots, zero-padded), the region that
    drives the dynamics and the final state's norm."""
    frames = []
    for split, data in splits.items():
        last = data.n_relevant - 1
        frame = pd.DataFrame({"split": split, "sequence": np.arange(len(data)),
                              "n_relevant": data.n_relevant.numpy()})
        for k in range(3):
            frame[f"start_{k}"] = data.relevant_starts[:, k].numpy()
            frame[f"end_{k}"] = data.relevant_ends[:, k].numpy()
        frame["driving_start"] = data.relevant_starts.gather(1, last[:, None]).squeeze(1).numpy()
        driving = region_of(torch.tensor(frame["driving_start"].to_numpy()), num_words)
        frame["driving_region"] = [REGIONS[i] for i in driving.tolist()]
        frame["final_state_norm"] = data.states[:, -1].norm(dim=-1).numpy()
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


WELL_FORMED = dg.AssetCheckSpec(
    "leworld_dataset_is_well_formed", asset="leworld_dataset", blocking=True,
    description="Addresses inside memory, lengths 16..128 on used slots, zero padding, finite states.")


def well_formed(splits: dict[str, SequenceBatch], num_words: int) -> dg.AssetCheckResult:
    """The dataset check: per split, the count of addresses outside memory, used slots outside
    MIN_LENGTH..MAX_LENGTH, non-zero padding and non-finite states (all 0 to pass)."""
    problems = {}
    for split, data in splits.items():
        used = torch.arange(3)[None, :] < data.n_relevant[:, None]
        lengths = data.relevant_ends - data.relevant_starts
        problems[split] = int(
            (data.relevant_starts < 0).sum() + (data.relevant_ends > num_words).sum()
            + ((lengths < MIN_LENGTH) | (lengths > MAX_LENGTH))[used].sum() + (lengths[~used] != 0).sum()
            + (~torch.isfinite(data.states)).sum()
        )
    return dg.AssetCheckResult(check_name=WELL_FORMED.name, passed=sum(problems.values()) == 0,
                               metadata={f"problems_{k}": v for k, v in problems.items()})


def _write_dataset(artifacts: ArtifactStore, config: LeWorldDatasetConfig, splits: dict[str, SequenceBatch],
                   bits: torch.Tensor) -> Path:
    """The splits as safetensors and `dataset.json` (config + the memory's size and hash) in a new
    leworld_dataset version; returns its folder."""
    with artifacts.write_version("leworld_dataset") as (tmp, version):
        for split, data in splits.items():
            save_file(data.tensors(), str(tmp / f"{split}.safetensors"))
        info = {"num_words": bits.shape[0], "word_size": bits.shape[1], "memory_hash": content_hash(bits)}
        (tmp / DATASET_FILE).write_text(json.dumps(config.model_dump() | info, indent=2))
    return artifacts.path("leworld_dataset", version)


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "safetensors", "duckdb"},
    check_specs=[WELL_FORMED],
    description="Synthetic state-transition sequences whose dynamics depend on the contents of 1–3 memory "
    "regions (train and validation splits), generated vectorised; an index table `leworld_dataset_index`.",
)
def leworld_dataset(context: dg.AssetExecutionContext, config: LeWorldDatasetConfig,
                    leworld_memory: AssetHandle, artifacts: ArtifactStore, duckdb: DuckDBResource
                    ) -> dg.MaterializeResult:
    bits = load_memory_bits(leworld_memory)
    sizes = {"train": config.num_train, "validation": config.num_validation}
    splits = generate_splits(bits, library_config(config, DatasetSettings))
    folder = _write_dataset(artifacts, config, splits, bits)
    index = _dataset_index(splits, bits.shape[0])
    write_tables(duckdb, {"leworld_dataset_index": index})
    context.log.info(f"leworld_dataset: {sizes} sequences of {config.seq_length} steps, difficulty "
                     f"{config.difficulty}, cue {config.cue}")
    return materialized(folder, config=config, check_results=[well_formed(splits, bits.shape[0])], metadata={
        "sequences": sizes, "states_shape_train": list(splits["train"].states.shape),
        "difficulty": config.difficulty, "cue": config.cue, "index_rows": len(index),
        "preview": table_preview(index)})
