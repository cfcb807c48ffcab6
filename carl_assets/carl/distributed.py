"""SFT under whatever torch.distributed world this process was launched into, reporting through Dagster Pipes.

`run_sft` is one process's work; the command that runs it is ``carl sft-rank`` (carl_assets/cli/models.py),
the same on one CPU, under ``torchrun --nproc_per_node N`` / ``accelerate launch --num_processes N`` on one
machine, or as the command of a Kubernetes pod (``PipesK8sClient``)::

    python -m carl_assets.cli sft-rank --model DIR --dataset DIR --output DIR --config JSON

Each rank loads the model and dataset; the Trainer (through accelerate) wraps the model in DDP and
gives each rank its share of every batch. ``--config`` holds `SFTRunConfig` fields; its ``batch_size``
is the *global* batch, split evenly across ranks, so N processes take the same optimizer steps as one.
TRL gathers the token accuracy across ranks before logging, so every rank's crystallization gate sees
the same numbers and they stop at the same step. Only rank 0 saves the checkpoint and, when launched
by Dagster (``PipesSubprocessClient``, ``PipesK8sClient``), opens Pipes: its progress lines go to the
run's log and its final metadata becomes the asset's materialization. Other ranks never talk to Pipes.

No Dagster import here except ``dagster_pipes``, the small client side of Pipes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

from carl_assets import storage
from carl_assets.carl.trainer_common import SFT_LOG_EVERY
from carl_assets.carl.training import (
    TRAINING_LOG_FILE,
    SFTOutcome,
    SFTRunConfig,
    StepLogger,
    load_training_dataset,
    train_sft,
)
from carl_assets.models.loading import load_model_and_tokenizer

MODULE = "carl_assets.cli"  # `python -m carl_assets.cli sft-rank ...`: one rank
COMMAND = "sft-rank"
INPROCESS = "inprocess"
LAUNCHERS = ("torchrun", "accelerate")
DISTRIBUTED_KEY = "distributed"  # where rank 0 records the world in training_log.json


@dataclass(frozen=True)
class World:
    """This process's place in the torch.distributed world (from the launcher's environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> World:
        env = dict(os.environ if env is None else env)
        try:
            world = cls(rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)),
                        local_rank=int(env.get("LOCAL_RANK", 0)))
        except ValueError as exc:
            raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from None
        if world.world_size < 1 or not 0 <= world.rank < world.world_size:
            raise ValueError(f"RANK={world.rank} is not in a world of WORLD_SIZE={world.world_size}")
        return world

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def parse_launcher(launcher: str) -> tuple[str, int]:
    """("inprocess", 1), ("torchrun", N) or ("accelerate", N) from "inprocess" | "torchrun:N" |
    "accelerate:N"."""
    text = launcher.strip().lower()
    if text == INPROCESS:
        return INPROCESS, 1
    name, _, count = text.partition(":")
    if name not in LAUNCHERS or not count.strip().isdigit() or int(count) < 1:
        raise ValueError(f"launcher {launcher!r}: expected 'inprocess', 'torchrun:N' or 'accelerate:N' "
                         "with N >= 1 processes")
    return name, int(count)


def launch_command(launcher: str, module_args: Sequence[str], python: str | None = None) -> list[str]:
    """The command that runs `python -m carl_assets.cli` with `module_args` (`sft_arguments`: the `sft-rank`
    command) under the launcher, on this machine.

    ``--standalone`` (torchrun) and ``--main_process_port 0`` (accelerate) pick a free rendezvous port,
    so two runs on one machine do not collide. Multi-node runs use the launcher of their cluster
    (a Kubernetes job, a torchrun per node) with the same module arguments."""
    name, processes = parse_launcher(launcher)
    python = python or sys.executable
    if name == INPROCESS:
        return [python, "-m", MODULE, *module_args]
    if name == "torchrun":
        return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                "-m", MODULE, *module_args]
    # accelerate launch: --multi_gpu means "several local processes, torchrun underneath"; without CUDA the
    # Trainer's use_cpu makes accelerate join them over gloo (its --cpu flag would ask for mpirun instead).
    multi = ["--multi_gpu"] if processes > 1 else []
    return [python, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", "0", "-m", MODULE, *module_args]


def sft_arguments(model: str | os.PathLike[str], dataset: str | os.PathLike[str],
                  output: str | os.PathLike[str], config: SFTRunConfig, log_every: int = SFT_LOG_EVERY,
                  launcher: str = INPROCESS) -> list[str]:
    """Arguments of `carl sft-rank` for these inputs (what `launch_command` appends)."""
    return [COMMAND, "--model", str(model), "--dataset", str(dataset), "--output", str(output),
            "--config", config.model_dump_json(), "--log-every", str(int(log_every)), "--launcher", launcher]


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """Each rank's share of the global batch; it must split evenly (or the step would change size)."""
    if global_batch % world_size:
        raise ValueError(f"batch_size {global_batch} does not split evenly over {world_size} processes: "
                         f"use a multiple of {world_size}")
    return global_batch // world_size


def init_process_group(world: World) -> str | None:
    """On CPU with several processes, join the gloo group now (accelerate then reuses it); on CUDA leave
    the choice (nccl) to accelerate. Returns the backend in use, None for a single process."""
    if world.world_size == 1:
        return None
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(world.local_rank)
            return "nccl"  # accelerate initializes it itself
        dist.init_process_group(backend="gloo")
    return str(dist.get_backend())


def outcome_from_log(log: dict[str, Any]) -> SFTOutcome:
    """The SFTOutcome a `training_log.json` holds (the derived `crystallized` and extra keys dropped)."""
    names = {f.name for f in fields(SFTOutcome)}
    missing = sorted(n for n in names - set(log) if n not in ("final_accuracy", "output_dir"))
    if missing:
        raise ValueError(f"{TRAINING_LOG_FILE} lacks {', '.join(missing)}: it was not written by train_sft")
    return SFTOutcome(**{k: v for k, v in log.items() if k in names})


def sft_summary(outcome: SFTOutcome) -> dict[str, Any]:
    """The outcome numbers an SFT run reports (the in-process asset reports the same keys)."""
    return {
        "crystallized": outcome.crystallized,
        "triggered": outcome.triggered,
        "trigger_step": outcome.trigger_step,
        "steps": outcome.steps,
        "max_steps": outcome.max_steps,
        "final_accuracy": outcome.final_accuracy,
        "peak_entropy": outcome.peak_entropy,
        "peak_entropy_step": outcome.peak_entropy_step,
        "train_seconds": round(outcome.seconds, 2),
    }


def _open_pipes(world: World) -> Any | None:
    """Rank 0's Pipes context when Dagster launched this process; None otherwise (and on other ranks)."""
    if not world.is_main:
        return None
    if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        return None
    return open_dagster_pipes()


def _stderr_log(world: World) -> Callable[[str], None]:
    def log(message: str) -> None:
        print(f"[rank {world.rank}/{world.world_size}] {message}", file=sys.stderr, flush=True)

    return log


def run_sft(model_dir: str, dataset_dir: str, output_dir: str, config: SFTRunConfig,
            log_every: int = SFT_LOG_EVERY, launcher: str = INPROCESS,
            world: World | None = None) -> SFTOutcome:
    """Load, train (`train_sft` with this rank's share of each batch), and on rank 0 save + report."""
    world = world or World.from_env()
    local = per_rank_batch(config.batch_size, world.world_size)
    backend = init_process_group(world)
    pipes = _open_pipes(world)
    try:
        log = pipes.log.info if pipes is not None else _stderr_log(world)
        if world.is_main:
            log(f"SFT in a world of {world.world_size} process(es) (backend {backend or 'none'}), "
                f"{local} example(s) per rank per step, global batch {config.batch_size}")
        model, tokenizer = load_model_and_tokenizer(model_dir)
        dataset = load_training_dataset(dataset_dir)
        run_config = config.model_copy(update={"batch_size": local})
        logger = StepLogger(log, every=log_every, max_steps=config.max_steps, label="SFT")
        callbacks = [logger] if world.is_main else []
        outcome = train_sft(model, tokenizer, dataset, output_dir if world.is_main else None, run_config,
                            extra_callbacks=callbacks)
        if world.is_main:
            distributed = {"world_size": world.world_size, "backend": backend, "launcher": launcher,
                           "per_rank_batch_size": local, "global_batch_size": config.batch_size}
            path = Path(output_dir) / TRAINING_LOG_FILE
            record = json.loads(path.read_text())
            record["config"]["batch_size"] = config.batch_size  # the global batch, as the user set it
            record[DISTRIBUTED_KEY] = distributed
            path.write_text(json.dumps(record, indent=2, default=str) + "\n")
            if pipes is not None:
                _report(pipes, outcome, distributed, Path(output_dir))
        _barrier(world)
        return outcome
    finally:
        if pipes is not None:
            pipes.close()
        _leave_group(world)


def _report(pipes: Any, outcome: SFTOutcome, distributed: dict[str, Any], output_dir: Path) -> None:
    weights = sorted(p for p in output_dir.iterdir() if p.suffix == ".safetensors")
    summary = {**sft_summary(outcome), **{k: v for k, v in distributed.items() if v is not None}}
    # The data version Pipes reports is the weights' hash; the asset adds its config to its own.
    pipes.report_asset_materialization(metadata=summary, data_version=storage.content_hash(*weights))
    pipes.log.info(f"SFT finished: {outcome.steps} steps, crystallized {outcome.crystallized}, "
                   f"world size {distributed['world_size']}")


def _barrier(world: World) -> None:
    # Other ranks wait until rank 0 has saved, so the launcher sees every process end after the checkpoint.
    if world.world_size > 1:
        if dist.is_initialized():
            dist.barrier()


def _leave_group(world: World) -> None:
    if world.world_size > 1:
        if dist.is_initialized():
            dist.destroy_process_group()


def config_from_json(text: str) -> SFTRunConfig:
    """SFTRunConfig from a JSON object; unknown fields are named in the error."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config is not JSON: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config must be a JSON object of SFTRunConfig fields, "
                         f"got {type(values).__name__}")
    unknown = sorted(set(values) - set(SFTRunConfig.model_fields))
    if unknown:
        raise ValueError(f"--config has unknown SFTRunConfig field(s): {', '.join(unknown)}")
    return SFTRunConfig(**values)
