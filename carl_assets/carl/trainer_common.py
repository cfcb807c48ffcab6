"""What SFT and GRPO runs share: the per-step log, saving the trained model (LoRA adapters merged), the
progress logger and quiet TRL output. No Dagster import here.

trl is imported inside the functions that need it: it costs ~15 s to import on a busy 2-core box beyond
torch, transformers and datasets (which the Dagster asset modules load anyway), and every Dagster code
location load would pay that for the few assets that train.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from datasets.utils import logging as datasets_logging
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from carl_assets.carl.lora import is_peft_model, lora_config, merge_adapters
from carl_assets.carl.run_config import TrainerRunConfig
from carl_assets.models.loading import model_max_positions


def _clean(value: Any) -> Any:
    """JSON-able floats (NaN/inf become None)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _clean(value.item())
    return value


def step_logs(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trainer.state.log_history without the final summary record (which has `train_runtime`)."""
    rows = []
    for record in history:
        if "train_runtime" in record or "step" not in record:
            continue
        rows.append({k: _clean(v) for k, v in record.items()})
    return rows


def save_model(model: Any, tokenizer: Any, output_dir: str | os.PathLike[str] | None) -> str | None:
    if output_dir is None:
        return None
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


def no_printing(trainer: Any) -> None:
    """Drop the callback that prints every log dict to stdout (one line per step with logging_steps=1);
    the logs stay in `trainer.state.log_history`."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def fit_length(model: Any, max_length: int) -> int:
    """`max_length`, or the model's position table if that is shorter (GPT-2's absolute positions would
    raise an IndexError past it)."""
    limit = model_max_positions(model)
    return min(max_length, limit) if limit else max_length


def peft_config(model: Any, config: TrainerRunConfig) -> Any:
    """TRL's `peft_config` for the run (None: full fine-tune)."""
    return lora_config(
        model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules
    )


def merged(trainer: Any, model: Any) -> Any:
    """The trained model to save: LoRA adapters merged into the base weights (a plain checkpoint), or the
    model itself after a full fine-tune."""
    return merge_adapters(trainer.model) if is_peft_model(trainer.model) else model


# Steps between progress lines: an SFT step of a small model takes a second or less; a GRPO step samples
# and scores a group of completions first, so it reports more often.
SFT_LOG_EVERY = 25
GRPO_LOG_EVERY = 4


class StepLogger(TrainerCallback):
    """A transformers callback that reports progress through `log(str)` every `every` steps (and the last):
    step, loss, token accuracy or reward, learning rate and the time left at most (the budget; the gate
    may stop SFT sooner)."""

    def __init__(
        self, log: Any, every: int = SFT_LOG_EVERY, max_steps: int | None = None, label: str = "training"
    ):
        self.log, self.every, self.max_steps, self.label = log, max(1, int(every)), max_steps, label
        self.started = time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        step, total = int(state.global_step), int(self.max_steps or state.max_steps or 0)
        if not logs or (step % self.every and step != total):
            return
        parts = [f"{self.label} step {step}/{total}"]
        for key in ("loss", "mean_token_accuracy", "reward", "reward_std", "learning_rate"):
            if isinstance(logs.get(key), (int, float)):
                parts.append(f"{key} {logs[key]:.4g}")
        elapsed = time.perf_counter() - self.started
        if step and total > step:
            parts.append(f"about {elapsed / step * (total - step):.0f} s left at most")
        self.log(", ".join(parts))


@contextlib.contextmanager
def quiet_trl() -> Iterator[None]:
    """No dataset-map progress bars or deprecation chatter from TRL/transformers internals while training
    (asset logs stay readable); the previous settings come back afterwards."""
    loggers = [logging.getLogger(n) for n in ("trl", "transformers.trainer", "transformers.training_args")]
    levels = [lg.level for lg in loggers]
    bars = datasets_logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    datasets_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*checkpointing.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars:
            datasets_logging.enable_progress_bar()


def write_run_log(
    output_dir: str | os.PathLike[str] | None, name: str, outcome: dict[str, Any], config: TrainerRunConfig
) -> None:
    """`<output_dir>/<name>`: the outcome and the run config it ran with (nothing when output_dir is None)."""
    if output_dir is not None:
        (Path(output_dir) / name).write_text(
            json.dumps({**outcome, "config": config.model_dump(mode="json")}, indent=2, default=str) + "\n"
        )
