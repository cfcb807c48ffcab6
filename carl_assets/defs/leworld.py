"""LeWorld assets: memory → dataset → model (three phases) → evaluation against two baselines.

The science lives in `carl_assets.leworld`; these assets read their inputs from storage, call it, write
safetensors / DuckDB and report metadata. Sizes default to what fits about a minute on a 2-core CPU.
"""


import json
import time

import dagster as dg
import numpy as np
import pandas as pd
import torch
from dagster_duckdb import DuckDBResource
from safetensors.torch import load_file, save_file

from carl_assets.defs.common import materialized, table_preview
from carl_assets.defs.resources import ArtifactStore, read_table, write_tables
from carl_assets.leworld.architecture import (
    ArtificialMemory,
    BLMConfig,
    LeWorldSystem,
    MemoryConfig,
    SLMConfig,
    count_params,
    load_system,
    save_system,
)
from carl_assets.leworld.data import MAX_LENGTH, MIN_LENGTH, SequenceBatch, generate_sequences
from carl_assets.leworld.evaluation import evaluate
from carl_assets.leworld.populators import (
    REGIONS,
    from_experience,
    random_bits,
    region_of,
    structured_patterns,
    text_experiences,
)
from carl_assets.leworld.training import TrainingConfig, train_system
from carl_assets.plotting import line_plot
from carl_assets.storage import content_hash

GROUP = "leworld"
MEMORY_FILE = "memory.safetensors"
SPLITS = ("train", "validation")
PHASE_LOSS = {1: ("slm_loss", "blm_loss"), 2: ("total_loss",), 3: ("loss_with_info", "loss_without_info", "next_state_loss_with_info")}


class LeWorldMemoryConfig(dg.Config):
    populator: str = "structured"  # "structured" | "random" | "experience" (memory-graph node texts)
    num_words: int = 65536
    word_size: int = 32
    seed: int = 0


class LeWorldDatasetConfig(dg.Config):
    num_train: int = 512
    num_validation: int = 128
    seq_length: int = 20
    state_dim: int = 64
    char_dim: int = 32
    difficulty: str = "medium"  # easy | medium | hard: 1, 2 or 3 relevant memory regions
    mix: str = "last"  # "last": the seed (the last region drives the dynamics) | "mean": all regions do
    seed: int = 0


class LeWorldModelConfig(dg.Config):
    phase1_epochs: int = 3
    phase2_epochs: int = 4
    phase3_epochs: int = 2
    batch_size: int = 32
    phase1_lr: float = 1e-3
    phase2_lr: float = 3e-4
    phase3_lr: float = 1e-4
    slm_d_model: int = 64  # the seed used 128; 64 halves the SLMs' cost at the same validation MSE here
    blm_d_model: int = 128
    n_slms: int = 3
    info_dim: int = 16
    encoding_dim: int = 64
    max_read_range: int = 128
    seed: int = 0


class LeWorldEvaluationConfig(dg.Config):
    n_steps: int = 5  # rollout horizon, as in the seed's evaluator


def load_memory_bits(artifacts: ArtifactStore) -> torch.Tensor:
    return load_file(str(artifacts.require("leworld_memory", MEMORY_FILE)))["bits"].to(torch.float32)


def load_split(artifacts: ArtifactStore, split: str) -> SequenceBatch:
    return SequenceBatch.from_tensors(load_file(str(artifacts.require("leworld_dataset", f"{split}.safetensors"))))


@dg.asset(group_name=GROUP, kinds={"pytorch", "safetensors"}, description="The addressable bit memory (65,536 words by default), filled by a populator: structured patterns (default), random bits, or sentences of the memory graph's node texts (DuckDB `memory_nodes`).")
def leworld_memory(context: dg.AssetExecutionContext, config: LeWorldMemoryConfig, artifacts: ArtifactStore, duckdb: DuckDBResource) -> dg.MaterializeResult:
    memory = ArtificialMemory(MemoryConfig(num_words=config.num_words, word_size=config.word_size))
    extra: dict[str, object] = {}
    if config.populator == "structured":
        structured_patterns(memory, config.seed)
    elif config.populator == "random":
        random_bits(memory, config.seed)
    elif config.populator == "experience":
        try:
            nodes = read_table(duckdb, "memory_nodes")
        except LookupError as exc:
            raise LookupError("populator='experience' reads the DuckDB table memory_nodes (column text): materialize memory_graph first") from exc
        features = text_experiences(nodes["text"].astype(str).tolist(), config.word_size, config.seed)
        if not len(features):
            raise ValueError("memory_nodes has no text to populate the LeWorld memory from")
        # One word per sentence, repeated to fill the memory (the seed left the rest untouched).
        extra = {"experience_rows": from_experience(memory, features, tile=True), "nodes": len(nodes)}
    else:
        raise ValueError(f"unknown populator {config.populator!r}: use structured, random or experience")
    bits = memory.memory.to(torch.uint8)
    with artifacts.write_dir("leworld_memory") as tmp:
        save_file({"bits": bits}, str(tmp / MEMORY_FILE), metadata={"populator": config.populator})
    quarters = region_of(torch.arange(config.num_words), config.num_words)
    density = {f"bit_density_{name}": float(bits[quarters == i].float().mean()) for i, name in enumerate(REGIONS)}
    context.log.info(f"leworld_memory: {config.populator}, {tuple(bits.shape)}")
    return materialized(
        bits,
        config=config,
        metadata={"shape": list(bits.shape), "populator": config.populator, "bit_density": float(bits.float().mean()), **density, **extra, "path": str(artifacts.path("leworld_memory") / MEMORY_FILE)},
    )


@dg.asset(group_name=GROUP, deps=["leworld_memory"], kinds={"pytorch", "safetensors", "duckdb"}, description="Synthetic state-transition sequences whose dynamics depend on the contents of 1–3 memory regions (train and validation splits), generated vectorised; an index table `leworld_dataset_index`.")
def leworld_dataset(context: dg.AssetExecutionContext, config: LeWorldDatasetConfig, artifacts: ArtifactStore, duckdb: DuckDBResource) -> dg.MaterializeResult:
    bits = load_memory_bits(artifacts)
    sizes = {"train": config.num_train, "validation": config.num_validation}
    splits = {
        split: generate_sequences(bits, sizes[split], config.seq_length, config.state_dim, config.char_dim, config.difficulty, config.seed * 2 + i, config.mix)
        for i, split in enumerate(SPLITS)
    }
    with artifacts.write_dir("leworld_dataset") as tmp:
        for split, data in splits.items():
            save_file(data.tensors(), str(tmp / f"{split}.safetensors"))
        info = {"num_words": bits.shape[0], "word_size": bits.shape[1], "memory_hash": content_hash(bits)}
        (tmp / "dataset.json").write_text(json.dumps(config.model_dump() | info, indent=2))
    frames = []
    for split, data in splits.items():
        last = data.n_relevant - 1
        frame = pd.DataFrame({"split": split, "sequence": np.arange(len(data)), "n_relevant": data.n_relevant.numpy()})
        for k in range(3):
            frame[f"start_{k}"] = data.relevant_starts[:, k].numpy()
            frame[f"end_{k}"] = data.relevant_ends[:, k].numpy()
        frame["driving_start"] = data.relevant_starts.gather(1, last[:, None]).squeeze(1).numpy()
        frame["driving_region"] = [REGIONS[i] for i in region_of(torch.tensor(frame["driving_start"].to_numpy()), bits.shape[0]).tolist()]
        frame["final_state_norm"] = data.states[:, -1].norm(dim=-1).numpy()
        frames.append(frame)
    index = pd.concat(frames, ignore_index=True)
    write_tables(duckdb, {"leworld_dataset_index": index})
    context.log.info(f"leworld_dataset: {sizes} sequences of {config.seq_length} steps, difficulty {config.difficulty}")
    return materialized(
        artifacts.path("leworld_dataset"),
        config=config,
        metadata={"sequences": sizes, "states_shape_train": list(splits["train"].states.shape), "difficulty": config.difficulty, "index_rows": len(index), "preview": table_preview(index)},
    )


@dg.asset_check(asset="leworld_dataset", blocking=True, description="Addresses inside memory, lengths 16..128 on used slots, zero padding, finite states.")
def leworld_dataset_is_well_formed(artifacts: ArtifactStore) -> dg.AssetCheckResult:
    num_words = load_memory_bits(artifacts).shape[0]
    problems = {}
    for split in SPLITS:
        data = load_split(artifacts, split)
        used = torch.arange(3)[None, :] < data.n_relevant[:, None]
        lengths = data.relevant_ends - data.relevant_starts
        problems[split] = int(
            (data.relevant_starts < 0).sum() + (data.relevant_ends > num_words).sum()
            + ((lengths < MIN_LENGTH) | (lengths > MAX_LENGTH))[used].sum() + (lengths[~used] != 0).sum()
            + (~torch.isfinite(data.states)).sum()
        )
    return dg.AssetCheckResult(passed=sum(problems.values()) == 0, metadata={f"problems_{k}": v for k, v in problems.items()})


def loss_plots(metrics: pd.DataFrame) -> dict[str, bytes]:
    """Each phase's losses against a running epoch count, phase boundaries marked: the prediction
    losses (MSE scale) in one plot, phase 1's address cross-entropy in another."""
    offsets, boundaries = {}, {}
    start = 0
    for phase in sorted(metrics["phase"].unique()):
        offsets[phase] = start
        start += int(metrics.loc[metrics["phase"] == phase, "epoch"].max())
        boundaries[f"end of phase {phase}"] = start + 0.5

    def series(names: list[tuple[int | None, str]]) -> dict[str, tuple[list[float], list[float]]]:
        out = {}
        for phase, name in names:
            rows = metrics[(metrics["metric"] == name) & ((metrics["phase"] == phase) if phase else True)]
            if len(rows):
                label = f"phase {phase} {name}" if phase else name
                out[label] = ([e + offsets[p] for p, e in zip(rows["phase"], rows["epoch"], strict=True)], rows["value"].tolist())
        return out

    prediction = [(p, n) for p, names in PHASE_LOSS.items() for n in names if n != "slm_loss"] + [(None, "val_one_step_mse")]
    return {
        "loss_plot": line_plot(series(prediction), "LeWorld prediction losses per phase and epoch", "epoch (all phases)", "MSE", vlines=boundaries),
        "slm_loss_plot": line_plot(series([(1, "slm_loss")]), "Phase 1: SLM address cross-entropy", "epoch", "cross-entropy"),
    }


@dg.asset(group_name=GROUP, deps=["leworld_dataset", "leworld_memory"], kinds={"pytorch", "safetensors", "duckdb"}, description="The LeWorld system trained in the seed's three phases (pre-training apart, end to end, info-request refinement); checkpoint as safetensors + config.json, per-epoch metrics in `leworld_metrics`.")
def leworld_model(context: dg.AssetExecutionContext, config: LeWorldModelConfig, artifacts: ArtifactStore, duckdb: DuckDBResource) -> dg.MaterializeResult:
    bits = load_memory_bits(artifacts)
    recorded = json.loads(artifacts.require("leworld_dataset", "dataset.json").read_text()).get("memory_hash")
    if recorded != content_hash(bits):  # the dataset's dynamics were computed from another memory
        raise ValueError("leworld_memory changed after leworld_dataset was generated: materialize leworld_dataset again")
    train, validation = (load_split(artifacts, split) for split in SPLITS)
    state_dim, char_dim = train.states.shape[2], train.characteristics.shape[1]
    torch.manual_seed(config.seed)  # parameter initialisation
    system = LeWorldSystem(
        MemoryConfig(bits.shape[0], bits.shape[1], config.max_read_range, config.encoding_dim),
        SLMConfig(state_dim, char_dim, config.slm_d_model),
        BLMConfig(state_dim, config.blm_d_model, config.n_slms, config.info_dim),
    )
    with torch.no_grad():
        system.memory.memory.copy_(bits)
    training = TrainingConfig(
        phase1_lr=config.phase1_lr, phase1_epochs=config.phase1_epochs, phase1_batch_size=config.batch_size,
        phase2_lr=config.phase2_lr, phase2_epochs=config.phase2_epochs, phase2_batch_size=config.batch_size,
        phase3_lr=config.phase3_lr, phase3_epochs=config.phase3_epochs, phase3_batch_size=config.batch_size,
        state_dim=state_dim, char_dim=char_dim, sequence_length=train.states.shape[1], seed=config.seed,
    )
    started = time.perf_counter()
    metrics = train_system(system, train, validation, training, log=context.log.info)
    seconds = time.perf_counter() - started
    with artifacts.write_dir("leworld_model") as tmp:
        save_system(system, tmp, extra={"training": training.__dict__, "seconds": seconds})
    write_tables(duckdb, {"leworld_metrics": metrics})
    last = metrics.groupby(["phase", "metric"])["value"].last()
    final = {f"phase{p}_{m}": float(v) for (p, m), v in last.items() if m in PHASE_LOSS.get(p, ()) or m == "val_one_step_mse"}
    return materialized(
        artifacts.path("leworld_model"),
        config=config,
        metadata={"parameters": count_params(system), "train_seconds": round(seconds, 2), **final, "path": str(artifacts.path("leworld_model")), "metrics_rows": len(metrics)},
        plots=loss_plots(metrics),
    )


@dg.asset_check(asset="leworld_model", blocking=True, description="Every logged metric is finite and the checkpoint reloads.")
def leworld_model_is_sound(artifacts: ArtifactStore, duckdb: DuckDBResource) -> dg.AssetCheckResult:
    metrics = read_table(duckdb, "leworld_metrics")
    finite = bool(np.isfinite(metrics["value"].to_numpy()).all())
    params = count_params(load_system(artifacts.require("leworld_model")))
    return dg.AssetCheckResult(passed=finite and params > 0, metadata={"finite_metrics": finite, "parameters": params})


@dg.asset(group_name=GROUP, deps=["leworld_model", "leworld_dataset"], kinds={"pytorch", "duckdb"}, description="Validation MSE/MAE (rollout from the first state, per horizon and one-step), routing entropy and SLM usage of the trained system against predicting the current state, the same system with its memory reads zeroed, and (reference) with reads of the true relevant regions; tables `leworld_evaluation`, `leworld_evaluation_steps`.")
def leworld_evaluation(context: dg.AssetExecutionContext, config: LeWorldEvaluationConfig, artifacts: ArtifactStore, duckdb: DuckDBResource) -> dg.MaterializeResult:
    system = load_system(artifacts.require("leworld_model"))
    validation = load_split(artifacts, "validation")
    result = evaluate(system, validation, n_steps=config.n_steps)
    write_tables(duckdb, {"leworld_evaluation": result.summary, "leworld_evaluation_steps": result.steps})
    m = result.metrics
    gain = 100 * (m["memory_ablated_mse"] - m["mse"]) / m["memory_ablated_mse"]
    verdict = (
        f"memory {'helps' if m['beats_memory_ablated'] else 'does NOT help'}: rollout MSE {m['mse']:.4f} with memory vs "
        f"{m['memory_ablated_mse']:.4f} with reads zeroed ({gain:+.1f}%); one-step: "
        f"{'better' if m['beats_memory_ablated_one_step'] else 'not better'} with memory; "
        f"reading the true relevant regions instead: {m['oracle_reads_mse']:.4f}"
    )
    context.log.info(verdict)
    steps = result.steps
    plot = line_plot(
        {name: (g["step"].tolist(), g["mse"].tolist()) for name, g in steps.groupby("system")},
        "Validation MSE per rollout step", "step (horizon)", "MSE",
    )
    return materialized(
        result.summary,
        config=config,
        metadata={
            "mse": m["mse"], "mae": m["mae"], "one_step_mse": m["one_step_mse"],
            "persistence_mse": m["persistence_mse"], "memory_ablated_mse": m["memory_ablated_mse"],
            "oracle_reads_mse": m["oracle_reads_mse"],
            "beats_persistence": m["beats_persistence"], "beats_memory_ablated": m["beats_memory_ablated"],
            "memory_verdict": verdict, "routing_entropy": m["routing_entropy"], "slm_usage": m["slm_usage"],
            "summary": table_preview(result.summary),
        },
        plots={"step_mse_plot": plot},
    )


@dg.asset_check(asset="leworld_evaluation", description="The trained system beats predicting the current state on validation MSE.")
def leworld_beats_persistence(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    summary = read_table(duckdb, "leworld_evaluation").set_index("system")
    model, baseline = float(summary.loc["leworld", "mse"]), float(summary.loc["persistence", "mse"])
    return dg.AssetCheckResult(passed=model < baseline, metadata={"leworld_mse": model, "persistence_mse": baseline})
