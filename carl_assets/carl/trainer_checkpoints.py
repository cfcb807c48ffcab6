"""Trainer checkpoints: an interrupted SFT or GRPO run resumes where it was.

The Trainer saves full checkpoints (weights, optimizer, scheduler, RNG, log) into ``checkpoint-<step>/``
folders; `latest_checkpoint` finds the newest complete one, `prepare_resume` clears half-written ones
after it, `checkpoint_args` are the Trainer arguments that save them and `train_or_load` runs or
finishes a run from one. No Dagster import here.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.trainer_callback import TrainerState

from carl_assets.carl.trainer_common import step_logs

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_FILE = "trainer_state.json"
GRPO_COMPLETIONS_FILE = "carl_completions.json"  # the scored completions up to a GRPO checkpoint's step
DEFAULT_SAVE_STEPS = 25


@dataclass
class TrainerCheckpoint:
    """A complete trainer checkpoint: its folder, the optimizer step it holds and the log up to it."""

    path: Path
    step: int
    log_history: list[dict[str, Any]]


def _checkpoint_step(folder: Path) -> int | None:
    name = folder.name
    if (
        not folder.is_dir()
        or not name.startswith(CHECKPOINT_PREFIX)
        or not name[len(CHECKPOINT_PREFIX) :].isdigit()
    ):
        return None
    return int(name[len(CHECKPOINT_PREFIX) :])


def _complete(folder: Path, require: tuple[str, ...]) -> TrainerCheckpoint | None:
    """The checkpoint in `folder` if every part of it is there, else None. The Trainer writes weights,
    optimizer, scheduler and RNG state first and `trainer_state.json` last, in place: a process killed
    mid-save leaves a folder whose state file is missing or cut short."""
    try:
        state = json.loads((folder / TRAINER_STATE_FILE).read_text())
        step = int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    has_weights = any(folder.glob("*.safetensors")) or (folder / "pytorch_model.bin").is_file()
    needed = ("optimizer.pt", "scheduler.pt", *require)
    if not has_weights or not all((folder / name).is_file() for name in needed):
        return None
    return TrainerCheckpoint(path=folder, step=step, log_history=list(state.get("log_history") or []))


def latest_checkpoint(
    checkpoint_dir: str | os.PathLike[str] | None, require: tuple[str, ...] = ()
) -> TrainerCheckpoint | None:
    """The newest complete trainer checkpoint (`checkpoint-<step>/`) under `checkpoint_dir`, or None.
    Half-written ones (see `_complete`) are passed over; `require` names extra files it must hold."""
    if checkpoint_dir is None or not Path(checkpoint_dir).is_dir():
        return None
    folders = [(step, p) for p in Path(checkpoint_dir).iterdir() if (step := _checkpoint_step(p)) is not None]
    for _, folder in sorted(folders, reverse=True):
        found = _complete(folder, require)
        if found is not None:
            return found
    return None


def prepare_resume(
    checkpoint_dir: str | os.PathLike[str] | None, require: tuple[str, ...] = ()
) -> TrainerCheckpoint | None:
    """The checkpoint to resume from; half-written checkpoints after it are removed, so the Trainer's
    rotation (`save_total_limit`) and a later save of the same step never meet them."""
    found = latest_checkpoint(checkpoint_dir, require)
    if checkpoint_dir is not None and Path(checkpoint_dir).is_dir():
        for folder in Path(checkpoint_dir).iterdir():
            step = _checkpoint_step(folder)
            if step is not None and (found is None or step > found.step):
                shutil.rmtree(folder, ignore_errors=True)
    return found


def checkpoint_args(checkpoint_dir: str | os.PathLike[str] | None, save_steps: int) -> dict[str, Any]:
    """Trainer arguments that save a full checkpoint (weights, optimizer, scheduler, RNG) every
    `save_steps` steps; two are kept, so a kill while the newest is written leaves the one before."""
    if checkpoint_dir is None or save_steps < 1:
        return {}
    return {
        "save_strategy": "steps",
        "save_steps": int(save_steps),
        "save_total_limit": 2,
        "save_only_model": False,
    }


def _load_finished(trainer: Any, checkpoint: TrainerCheckpoint) -> None:
    """The run had already ended at its last checkpoint (the step budget or the gate): take its weights
    and state instead of training on (`train(resume_from_checkpoint=...)` would run one more step)."""
    trainer._load_from_checkpoint(str(checkpoint.path))
    trainer.state = TrainerState.load_from_json(str(checkpoint.path / TRAINER_STATE_FILE))


def train_or_load(trainer: Any, resume: Any, finished: bool) -> tuple[int, list[dict[str, Any]]]:
    """Train (from the resume checkpoint, if any), or, when that checkpoint already ended the run, load it
    instead of training a step more; (steps run, the per-step log)."""
    if finished:
        _load_finished(trainer, resume)
    else:
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume.path))
    return int(trainer.state.global_step), step_logs(trainer.state.log_history)
