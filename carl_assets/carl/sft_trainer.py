"""SFT until crystallization (TRL's `SFTTrainer` with the `PhaseTransitionGate`), on CPU or an accelerator.

`train_sft` logs every step (``logging_steps=1``: TRL averages ``mean_token_accuracy`` over the logging
interval, so the gate needs every step) and stops when 3 of the last 5 logged accuracies reach the
threshold, or at ``max_steps``. It trains the given model in place (or LoRA adapters on it, merged before
saving), saves it (safetensors) with its tokenizer and `training_log.json` to ``output_dir`` when given,
and returns an `SFTOutcome`. Precision: ``dtype`` "bf16" is TRL's mixed precision (autocast) on the fp32
weights the caller loads (`models.device.training_weights_dtype`). No Dagster import here.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from carl_assets.carl.crystallization_gate import PhaseTransitionGate
from carl_assets.carl.run_config import SFTRunConfig
from carl_assets.carl.trainer_checkpoints import (
    DEFAULT_SAVE_STEPS,
    TrainerCheckpoint,
    checkpoint_args,
    prepare_resume,
    train_or_load,
)
from carl_assets.carl.trainer_common import (
    fit_length,
    merged,
    no_printing,
    peft_config,
    quiet_trl,
    save_model,
    write_run_log,
)
from carl_assets.carl.trl_config import trl_config
from carl_assets.runtime import torch_threads

TRAINING_LOG_FILE = "training_log.json"


@dataclass
class SFTOutcome:
    triggered: bool
    trigger_step: int
    window_values: list[float]
    peak_entropy: float
    peak_entropy_step: int
    threshold: float
    max_steps: int
    steps: int  # optimizer steps actually run
    seconds: float
    log_history: list[
        dict[str, Any]
    ]  # one record per logged step (step, loss, mean_token_accuracy, entropy, ...)
    final_accuracy: float | None = None
    output_dir: str | None = None
    resumed_from_step: int = 0  # the trainer checkpoint this run continued from (0: from the start)

    @property
    def crystallized(self) -> bool:
        """The gate fired before the step budget ran out."""
        return self.triggered and 0 < self.trigger_step <= self.max_steps

    def accuracy_curve(self) -> tuple[list[int], list[float]]:
        rows = [r for r in self.log_history if r.get("mean_token_accuracy") is not None]
        return [int(r["step"]) for r in rows], [float(r["mean_token_accuracy"]) for r in rows]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "crystallized": self.crystallized}


def prompt_lengths(tokenizer: Any, dataset: Any, limit: int = 512) -> list[int]:
    """Token counts of the first `limit` prompts of a prompt-completion dataset (chat template applied
    for conversational prompts); [] for other formats."""
    if "prompt" not in dataset.column_names:
        return []
    lengths = []
    for prompt in dataset.select(range(min(len(dataset), limit)))["prompt"]:
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=True
            )
            ids = ids["input_ids"]
        else:
            ids = tokenizer(str(prompt))["input_ids"]
        lengths.append(len(ids))
    return lengths


def _check_prompts_fit(tokenizer: Any, dataset: Any, max_length: int) -> None:
    """SFT truncates prompt + completion to `max_length` tokens: a prompt that long leaves no completion
    token to learn, and TRL then fails deep inside with 'num_samples=0'. Say so up front."""
    lengths = prompt_lengths(tokenizer, dataset)
    too_long = [n for n in lengths if n >= max_length]
    if lengths and len(too_long) == len(lengths):
        raise ValueError(
            f"every SFT prompt is at least max_length={max_length} tokens (shortest "
            f"{min(lengths)}): no completion token would be trained; raise max_length (the asset's "
            "sft_checkpoint.max_length) above the shortest prompt, or shorten the prompts "
            "(dream_scenarios.max_memories, dream_scenarios.excerpt_chars)"
        )
    if too_long:
        logging.getLogger("carl_assets.carl").warning(
            "%d of %d SFT prompts are at least max_length=%d tokens: their completions are cut away",
            len(too_long),
            len(lengths),
            max_length,
        )


def train_sft(
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    output_dir: str | os.PathLike[str] | None,
    config: SFTRunConfig | None = None,
    extra_callbacks: list[Any] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    save_steps: int = DEFAULT_SAVE_STEPS,
) -> SFTOutcome:
    """TRL SFT with the crystallization gate: stops when the gate fires or at ``config.max_steps``.

    ``config`` fields left None take the offline model's defaults (`SFTRunConfig.resolved(offline=True)`);
    resolve it with ``offline=False`` first for a real model. With ``config.lora_r > 0`` only LoRA adapters
    (`carl_assets.carl.lora`) train; they are merged into the base weights before saving, so ``output_dir``
    holds a plain checkpoint (no adapter files) and `model` is the merged model afterwards.

    ``train_dataset`` is a `datasets.Dataset` in any format TRL's SFT accepts ("messages",
    "prompt"/"completion" (plain or conversational), or "text"). The trained model and tokenizer are
    saved to ``output_dir`` (if not None) with `training_log.json` (the outcome and the config) beside them.

    ``checkpoint_dir``: full trainer checkpoints (weights, optimizer, scheduler, RNG, log) are saved
    there every ``save_steps`` steps (0: none), and when it already holds one the run resumes from the
    newest complete one (``outcome.resumed_from_step``): the data order, the optimizer and the gate's
    window continue as the uninterrupted run would have. Use one folder per run definition (model,
    data, config); the caller removes it once the result is safe. Raises ValueError for an empty dataset
    or prompts that leave no completion token within ``max_length``.
    """
    config = (config or SFTRunConfig()).resolved(offline=True)
    if len(train_dataset) == 0:
        raise ValueError("the SFT dataset is empty")
    max_length = fit_length(model, config.max_length)
    _check_prompts_fit(tokenizer, train_dataset, max_length)
    gate = PhaseTransitionGate(
        threshold=config.gate_threshold, window=config.gate_window, min_above=config.gate_min_above
    )
    resume = prepare_resume(checkpoint_dir)
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="carl-sft-") as scratch,
        torch_threads(config.threads),
        quiet_trl(),
    ):
        args = trl_config(
            config,
            checkpoint_dir if checkpoint_dir is not None else scratch,
            max_length,
            checkpoint_args(checkpoint_dir, save_steps),
        )
        steps, history, model = _run(
            model, tokenizer, train_dataset, config, args, gate, resume, extra_callbacks
        )
    model.eval()
    outcome = _outcome(gate, config, steps, history, time.perf_counter() - started, resume)
    outcome.output_dir = save_model(model, tokenizer, output_dir)
    write_run_log(output_dir, TRAINING_LOG_FILE, outcome.to_dict(), config)
    return outcome


def _run(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    config: SFTRunConfig,
    args: Any,
    gate: Any,
    resume: TrainerCheckpoint | None,
    extra_callbacks: list[Any] | None,
) -> tuple[int, list[dict[str, Any]], Any]:
    """Train (or finish from `resume`): (steps run, the per-step log, the trained model, adapters merged)."""
    from trl import SFTTrainer  # ~15 s to import: see carl_assets.carl.trainer_common

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[gate, *(extra_callbacks or [])],
        peft_config=peft_config(model, config),
    )
    no_printing(trainer)
    if resume is not None:
        gate.restore(resume.log_history)
    finished = resume is not None and (resume.step >= config.max_steps or gate.triggered)
    steps, history = train_or_load(trainer, resume, finished=finished)
    return steps, history, merged(trainer, model)


def _outcome(
    gate: Any,
    config: SFTRunConfig,
    steps: int,
    history: list[dict[str, Any]],
    seconds: float,
    resume: TrainerCheckpoint | None,
) -> SFTOutcome:
    """The run's `SFTOutcome` from the gate's summary and the per-step log."""
    accuracies = [r["mean_token_accuracy"] for r in history if r.get("mean_token_accuracy") is not None]
    summary = gate.summary()
    return SFTOutcome(
        triggered=bool(summary["triggered"]),
        trigger_step=int(summary["trigger_step"]),
        window_values=[float(v) for v in summary["window_values"]],
        peak_entropy=float(summary["peak_entropy"]),
        peak_entropy_step=int(summary["peak_entropy_step"]),
        threshold=float(config.gate_threshold),
        max_steps=int(config.max_steps),
        steps=steps,
        seconds=seconds,
        log_history=history,
        final_accuracy=float(accuracies[-1]) if accuracies else None,
        resumed_from_step=0 if resume is None else resume.step,
    )
