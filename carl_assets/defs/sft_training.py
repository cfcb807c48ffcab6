"""sft_checkpoint: SFT until crystallization, from the policy that dreamed the data (or base_model), in this
process or in N processes through Dagster Pipes."""

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource
from datasets import load_from_disk

from carl_assets.carl.coherence import GATE_MIN_ABOVE, GATE_THRESHOLD, GATE_WINDOW
from carl_assets.carl.distributed import (
    launch_command,
    outcome_from_log,
    parse_launcher,
    per_rank_batch,
    sft_arguments,
)
from carl_assets.carl.training import TRAINING_LOG_FILE, StepLogger, train_sft
from carl_assets.defs.checkpoints import (
    accuracy_plot,
    plain,
    record_provenance,
    resume_dir,
    run_metadata,
    say_resuming,
    weights_check,
    weights_check_spec,
    weights_files,
)
from carl_assets.defs.common import config_values, materialized
from carl_assets.defs.pools import TRAINING_POOL
from carl_assets.defs.resources import ArtifactStore
from carl_assets.defs.training_config import SFTCheckpointConfig
from carl_assets.dreams.cycle_state import CYCLE_FILE, DreamCycleState, is_auto, parse_checkpoint_spec
from carl_assets.handles import Checkpoint, DatasetVersion
from carl_assets.models.defaults import training_defaults
from carl_assets.models.loading import load_model_and_tokenizer

TEMPLATED_SFT_LR = 1.5e-3  # tuned: the offline model crystallizes on the 48 templated examples in ~120 steps


@dataclass(frozen=True)
class SFTStart:
    """The weights an SFT run starts from, and the dream cycle of its data (None: not dream data)."""

    asset: str
    version: str
    folder: Path
    cycle: DreamCycleState | None

    @property
    def name(self) -> str:
        return f"{self.asset}@{self.version}"


def dataset_cycle(dataset: DatasetVersion) -> DreamCycleState | None:
    """The dream cycle an sft_dataset version was made from (its cycle.json), None for other sources."""
    path = dataset.file() / CYCLE_FILE
    return DreamCycleState.load(path) if path.is_file() else None


def sft_start(
    config: SFTCheckpointConfig, artifacts: ArtifactStore, base_model: Checkpoint, dataset: DatasetVersion
) -> SFTStart:
    """Where this SFT run starts: `start_from` when set (a rollback names any kept policy version),
    else the policy that dreamed the dataset's cycle (cycle n+1 from cycle n's weights), else base_model."""
    cycle = dataset_cycle(dataset)
    if not is_auto(config.start_from):
        asset, version = parse_checkpoint_spec(config.start_from)
        if asset == "base_model" and version in (None, base_model.version):
            folder = base_model.file()
        else:  # an explicitly named version: read as configured
            folder = artifacts.require(asset, version=version)
    elif cycle is not None:
        asset, folder = cycle.policy_asset, cycle.policy_folder()
    else:
        asset, folder = "base_model", base_model.file()
    return SFTStart(asset, folder.name, folder, cycle)


def _launched_sft(
    context: dg.AssetExecutionContext,
    pipes: dg.PipesSubprocessClient,
    config: SFTCheckpointConfig,
    start_dir: Path,
    dataset_dir: Path,
    output_dir: Path,
    run: Any,
) -> tuple[Any, dict[str, Any]]:
    """SFT in N processes (torchrun / accelerate launch) through Dagster Pipes, rank 0 saving into
    `output_dir`: (the outcome from the training log it wrote, the metadata it reported)."""
    per_rank_batch(run.batch_size, parse_launcher(config.launcher)[1])  # a clear error before launching
    arguments = sft_arguments(
        start_dir, dataset_dir, output_dir, run, log_every=config.log_interval(), launcher=config.launcher
    )
    command = launch_command(config.launcher, arguments)
    context.log.info(f"SFT through Pipes: {' '.join(command[: command.index('-m', 2) + 2])} ...")
    invocation = pipes.run(command=command, context=context, extras={"launcher": config.launcher})
    reported = invocation.get_materialize_result()
    outcome = outcome_from_log(json.loads((output_dir / TRAINING_LOG_FILE).read_text()))
    metadata = dict(reported.metadata or {})
    if reported.data_version is not None:  # the weights' hash; the asset's data version adds its config
        metadata["weights_version"] = reported.data_version.value
    return outcome, metadata


def _train(
    context: dg.AssetExecutionContext,
    pipes: dg.PipesSubprocessClient,
    config: SFTCheckpointConfig,
    start: SFTStart,
    dataset_dir: Path,
    output_dir: Path,
    run: Any,
    resume: Path,
    placement: tuple[Any, Any],
) -> tuple[Any, dict[str, Any]]:
    """Train into `output_dir` in this process or through Pipes: (outcome, launcher metadata)."""
    if parse_launcher(config.launcher)[0] != "inprocess":
        return _launched_sft(context, pipes, config, start.folder, dataset_dir, output_dir, run)
    model, tokenizer = load_model_and_tokenizer(start.folder, device=placement[0], dtype=placement[1])
    say_resuming(context, resume)
    logger = StepLogger(context.log.info, every=config.log_interval(), max_steps=run.max_steps, label="SFT")
    outcome = train_sft(
        model,
        tokenizer,
        load_from_disk(str(dataset_dir)),
        output_dir,
        run,
        extra_callbacks=[logger],
        checkpoint_dir=resume,
        save_steps=config.checkpoint_every,
    )
    return outcome, {"launcher": "inprocess", "world_size": 1}


def _finish_log(
    folder: Path, context: dg.AssetExecutionContext, version: str, start: SFTStart, learning_rate: float
) -> dict[str, Any]:
    """Add the run, version, start and cycle to the training log the trainer wrote; returns the log."""
    log = json.loads((folder / TRAINING_LOG_FILE).read_text())
    log.update(
        {
            "run_id": context.run.run_id,
            "finished_at": datetime.now(timezone.utc).isoformat(),
            "version": version,
            "started_from": start.name,
            "dream_cycle": None if start.cycle is None else start.cycle.cycle,
            "learning_rate": learning_rate,
        }
    )
    (folder / TRAINING_LOG_FILE).write_text(json.dumps(log, indent=2, default=str) + "\n")
    return log


def _metadata(
    path: Path,
    version: str,
    start: SFTStart,
    learning_rate: float,
    config: SFTCheckpointConfig,
    outcome: Any,
    run: Any,
    launched: dict[str, Any],
) -> dict[str, Any]:
    return {
        "path": dg.MetadataValue.path(str(path)),
        "version": version,
        "started_from": start.name,
        "dream_cycle": None if start.cycle is None else start.cycle.cycle,
        "learning_rate": learning_rate,
        "optim": plain(config.optim),
        "crystallized": outcome.crystallized,
        "triggered": outcome.triggered,
        "trigger_step": outcome.trigger_step,
        "steps": outcome.steps,
        "max_steps": outcome.max_steps,
        "window_values": dg.MetadataValue.json([round(v, 4) for v in outcome.window_values]),
        "final_accuracy": outcome.final_accuracy,
        "peak_entropy": outcome.peak_entropy,
        "peak_entropy_step": outcome.peak_entropy_step,
        "train_seconds": round(outcome.seconds, 2),
        **run_metadata(run),
        **launched,
        "resumed_from_step": outcome.resumed_from_step,
    }


@dg.asset(
    group_name="training",
    ins={"base_model": dg.AssetIn(), "sft_dataset": dg.AssetIn()},
    kinds={"pytorch", "safetensors"},
    pool=TRAINING_POOL,
    check_specs=[weights_check_spec("sft_checkpoint", "GRPO does not start from a broken model")],
    description="TRL SFTTrainer (logging_steps=1) with the PhaseTransitionGate: stops when gate_min_above of "
    f"the last gate_window logged token accuracies reach gate_threshold (by default {GATE_MIN_ABOVE} of "
    f"{GATE_WINDOW} at {GATE_THRESHOLD}: crystallization) or at max steps. Starts from the checkpoint that "
    "dreamed the data (the dataset's cycle.json: cycle n+1 from cycle n's weights, at the cycle's learning "
    "rate) or base_model; each run is a new version folder under artifacts/sft_checkpoint (safetensors + "
    "training_log.json), the last N kept.",
)
def sft_checkpoint(
    context: dg.AssetExecutionContext,
    config: SFTCheckpointConfig,
    duckdb: DuckDBResource,
    artifacts: ArtifactStore,
    pipes: dg.PipesSubprocessClient,
    base_model: Checkpoint,
    sft_dataset: DatasetVersion,
) -> dg.MaterializeResult:
    start = sft_start(config, artifacts, base_model, sft_dataset)
    offline = base_model.is_offline
    templated_lr = training_defaults(offline).sft.learning_rate  # offline: TEMPLATED_SFT_LR
    learning_rate = config.learning_rate or (start.cycle.learning_rate if start.cycle else templated_lr)
    device, dtype, weights_dtype = config.placement(offline)
    run = config.run_config(learning_rate, offline, device, dtype)
    dataset = load_from_disk(str(sft_dataset.dataset_dir))
    context.log.info(
        f"SFT from {start.name} on {len(dataset)} examples, lr {learning_rate:.2e} "
        f"({run.lr_scheduler_type}), batch {run.batch_size}x{run.gradient_accumulation_steps}, "
        f"optim {config.optim}, {run.dtype} on {run.device}, at most {run.max_steps} steps"
    )
    parents = {start.asset: start.version, "sft_dataset": sft_dataset.version}
    # Trainer checkpoints live outside the version folders, keyed by what defines the run: a rerun of the
    # same run resumes, a changed one starts afresh. Removed once the version is written.
    resume = resume_dir(artifacts, "sft_checkpoint", parents, config_values(config), learning_rate)
    with artifacts.write_version("sft_checkpoint", run_id=context.run.run_id, parents=parents) as (
        tmp,
        version,
    ):
        outcome, launched = _train(
            context, pipes, config, start, sft_dataset.dataset_dir, tmp, run, resume, (device, weights_dtype)
        )
        log = _finish_log(tmp, context, version, start, learning_rate)
        version_files = [p.name for p in weights_files(tmp)]
    shutil.rmtree(resume, ignore_errors=True)
    path = artifacts.path("sft_checkpoint", version)
    record_provenance(duckdb, "sft_checkpoint", version, dataset, parents)
    if outcome.crystallized:
        context.log.info(f"crystallized at step {outcome.trigger_step} ({outcome.seconds:.1f} s)")
    else:
        context.log.warning(f"did not crystallize within {outcome.max_steps} steps")
    return materialized(
        version_files,
        *[path / n for n in version_files],
        config=config,
        uri=path,
        check_results=[weights_check("sft_checkpoint", path)],
        metadata=_metadata(path, version, start, learning_rate, config, outcome, run, launched),
        plots={"accuracy_curve": accuracy_plot(log)},
    )
