"""SFT until crystallization, then GRPO on the CARL reward (TRL), on CPU or an accelerator.

`train_sft` runs TRL's `SFTTrainer` with ``logging_steps=1`` (TRL averages ``mean_token_accuracy``
over the logging interval, so the gate needs every step) and the `PhaseTransitionGate` callback: it
stops when 3 of the last 5 logged accuracies reach the threshold, or at ``max_steps``.

`train_grpo` runs TRL's `GRPOTrainer` with the CARL composite reward of the policy itself
(`carl_assets.carl.make_carl_reward_fn`; any reward of `reward_fn.REWARD_NAMES` by name) and
``beta=0`` (no reference model, as in the seed). It returns the per-step reward curve and the reward
components TRL logged through ``log_metric``, and the per-completion rewards the reward function
computed. Its batch follows TRL's rule (`carl_assets.carl.trl_config`), its sampling takes top-p,
top-k and min-p.

Both train the given model in place (or LoRA adapters on it, `carl_assets.carl.lora`, merged before
saving), save it (safetensors) with its tokenizer to ``output_dir`` when given, and return an outcome
dataclass with the per-step log history. Precision: ``dtype`` "bf16" is TRL's mixed precision (autocast)
on the fp32 weights the caller loads (`models.device.training_weights_dtype`). No Dagster import here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from carl_assets.carl.trl_config import prompts_per_step, sampling_kwargs
from carl_assets.runtime import torch_threads

CARL_COMPONENTS = ("multiscale", "cloud_quality", "discontinuity", "phi_mean")
TRAINING_LOG_FILE = "training_log.json"
GRPO_LOG_FILE = "grpo_log.json"


# --------------------------------------------------------------------------------------------
# Configs and outcomes
# --------------------------------------------------------------------------------------------


@dataclass
class SFTRunConfig:
    """SFT hyper-parameters. The defaults let the offline ~1M-parameter model crystallize on the default
    48 templated examples in roughly 100-200 steps (a constant, fairly high learning rate; small batches)."""

    max_steps: int = 400
    learning_rate: float = 1.5e-3
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    max_length: int = 256
    completion_only_loss: bool | None = None  # None: TRL decides (True for prompt-completion data)
    assistant_only_loss: bool = False  # for "messages" data with a {% generation %} chat template
    gate_threshold: float = 0.99
    gate_window: int = 5
    gate_min_above: int = 3
    seed: int = 0
    threads: int | None = None  # torch CPU threads while training (None: leave as is)
    use_cpu: bool | None = None  # None: CPU unless CUDA is available
    optim: str = "adamw_torch"  # or "apollo_adamw" (the seed's APOLLO; needs the apollo-torch package)
    warmup_ratio: float = 0.0  # share of max_steps warming up (used when warmup_steps is 0)
    device: str | None = None  # "auto", "cpu", "cuda", "mps" (None: as use_cpu says)
    dtype: str = "fp32"  # training precision: "fp32", "bf16" (or "fp16": mixed precision, CUDA only)
    gradient_checkpointing: bool = False  # recompute activations: memory for time (real models)
    optim_target_modules: list[str] | None = None  # APOLLO: layers it projects (None: attention and MLP)
    lora_r: int = 0  # LoRA rank (0: full fine-tune); the adapters are merged into the saved checkpoint
    lora_alpha: float = 0.0  # LoRA scale numerator (0: 2 * lora_r)
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None  # None: the attention and MLP projections the model has


@dataclass
class GRPORunConfig:
    """GRPO hyper-parameters (few short steps by default: a CPU budget of well under a minute)."""

    max_steps: int = 8
    learning_rate: float = 1e-4
    batch_size: int = 8  # completions per device step; batch x accumulation x processes: whole groups
    num_generations: int = 4
    max_completion_length: int = 24
    max_prompts: int | None = None  # keep at most this many prompts (None: all)
    temperature: float = 1.0
    beta: float = 0.0
    seed: int = 0
    threads: int | None = None
    use_cpu: bool | None = None
    lr_scheduler_type: str = "linear"  # TRL's default, which the offline values were tuned with
    warmup_ratio: float = 0.0
    gradient_accumulation_steps: int = 1
    device: str | None = None  # "auto", "cpu", "cuda", "mps" (None: as use_cpu says)
    dtype: str = "fp32"  # training precision: "fp32", "bf16" (or "fp16": mixed precision, CUDA only)
    gradient_checkpointing: bool = False
    top_p: float = 1.0  # nucleus sampling (1.0: off)
    top_k: int = 0  # keep the k most likely tokens (0: off)
    min_p: float = 0.0  # drop tokens below min_p x the top probability (0.0: off)
    reward: str = "carl"  # the reward function, by name (`carl_assets.carl.reward_fn`)
    lora_r: int = 0  # LoRA rank (0: full fine-tune); the adapters are merged into the saved checkpoint
    lora_alpha: float = 0.0  # LoRA scale numerator (0: 2 * lora_r)
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None  # None: the attention and MLP projections the model has


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
    log_history: list[dict[str, Any]]  # one record per logged step (step, loss, mean_token_accuracy, entropy, ...)
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


@dataclass
class GRPOOutcome:
    steps: int
    seconds: float
    log_history: list[dict[str, Any]]  # one record per step: reward, reward_std, carl/<component>, loss, ...
    completions: list[dict[str, Any]] = field(default_factory=list)  # one per scored completion
    output_dir: str | None = None
    resumed_from_step: int = 0  # the trainer checkpoint this run continued from (0: from the start)

    @property
    def rewards(self) -> list[float]:
        return [float(r["reward"]) for r in self.log_history if r.get("reward") is not None]

    @property
    def reward_std(self) -> float:
        """Population std of every completion's CARL reward across the run (0.0 if none)."""
        values = [c["reward"] for c in self.completions]
        return float(np.std(values)) if values else 0.0

    @property
    def mean_step_reward_std(self) -> float:
        """Mean over steps of TRL's per-step `reward_std` (the spread GRPO's advantages see)."""
        stds = [float(r["reward_std"]) for r in self.log_history if r.get("reward_std") is not None]
        return float(np.mean(stds)) if stds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reward_std": self.reward_std, "mean_step_reward_std": self.mean_step_reward_std}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _use_cpu(flag: bool | None, device: str | None = None) -> bool:
    """Whether the Trainer runs on the CPU: the `device` asked for (resolved, so a missing one is a clear
    error), else `flag`, else CPU unless CUDA is available (MPS, when there, is used as TRL would)."""
    if device is not None:
        from carl_assets.models.device import resolve_device

        resolved = resolve_device(device)
        if resolved.type == "cuda" and resolved.index not in (None, 0):
            # The Trainer takes its GPU from the process (accelerate), not from an index.
            raise ValueError(f"training on device {device!r}: the Trainer always uses the first visible GPU; "
                             f"run with CUDA_VISIBLE_DEVICES={resolved.index} and device 'cuda'")
        return resolved.type == "cpu"
    if flag is not None:
        return flag
    import torch

    return not torch.cuda.is_available()


def _clean(value: Any) -> Any:
    """JSON-able floats (NaN/inf become None)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _clean(value.item())
    return value


def _step_logs(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trainer.state.log_history without the final summary record (which has `train_runtime`)."""
    rows = []
    for record in history:
        if "train_runtime" in record or "step" not in record:
            continue
        rows.append({k: _clean(v) for k, v in record.items()})
    return rows


def _save(model: Any, tokenizer: Any, output_dir: str | os.PathLike[str] | None) -> str | None:
    if output_dir is None:
        return None
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


def _precision_args(dtype: str, use_cpu: bool, device: str | None = None) -> dict[str, Any]:
    """TRL's mixed-precision flags for a training dtype. Both are always set: left as None, TRL turns bf16
    on by itself on a GPU, which would change an fp32 run's numbers."""
    from carl_assets.models.device import dtype_name, resolve_dtype

    name = dtype_name(resolve_dtype(dtype, "cpu" if use_cpu else (device or "auto")))
    if name == "fp16" and use_cpu:
        raise ValueError("dtype 'fp16' trains with a loss scaler that needs a CUDA device; use 'bf16' or 'fp32' "
                         "on the CPU")
    return {"bf16": name == "bf16", "fp16": name == "fp16"}


def _warmup(config: Any) -> int | float:
    """Trainer `warmup_steps`: the steps if set, else the ratio (a float in [0, 1) means a share of max_steps)."""
    steps = int(getattr(config, "warmup_steps", 0) or 0)
    if steps:
        return steps
    ratio = float(config.warmup_ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), not {ratio}")
    return ratio if ratio > 0 else 0


def _schedule_args(config: Any) -> dict[str, Any]:
    """Learning-rate schedule and accumulation (GRPO; SFT names them in its own config)."""
    return {"lr_scheduler_type": config.lr_scheduler_type, "warmup_steps": _warmup(config),
            "gradient_accumulation_steps": int(config.gradient_accumulation_steps)}


def _common_args(config: Any) -> dict[str, Any]:
    """Trainer arguments shared by SFT and GRPO, from an `SFTRunConfig` or `GRPORunConfig`."""
    use_cpu = _use_cpu(config.use_cpu, config.device)
    # No checkpoints, no trackers, no progress bars: the asset saves the final model itself.
    return {
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": use_cpu,
        **_precision_args(config.dtype, use_cpu, config.device),
        "seed": config.seed,
        "data_seed": config.seed,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        # TRL turns activation (gradient) checkpointing on by default: pure recompute cost for small
        # models, so it is off unless asked for (real models: memory for time).
        "activation_checkpointing": bool(config.gradient_checkpointing),
    }


def _no_printing(trainer: Any) -> None:
    """Drop the callback that prints every log dict to stdout (one line per step with logging_steps=1);
    the logs stay in `trainer.state.log_history`."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


# APOLLO projects the gradients of these linear layers (names of Llama/Qwen2/GPT-2 style blocks).
APOLLO_DEFAULT_TARGETS = [r".*attn.*", r".*mlp.*"]


def _optimizer_args(optim: str, target_modules: list[str] | None) -> dict[str, Any]:
    if not optim.startswith("apollo"):
        return {"optim": optim}
    try:
        import apollo_torch  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"optim {optim!r} needs the apollo-torch package (pip install apollo-torch "
                          "bitsandbytes)") from exc
    return {"optim": optim, "optim_target_modules": target_modules or APOLLO_DEFAULT_TARGETS}


def _fit_length(model: Any, max_length: int) -> int:
    """`max_length`, or the model's position table if that is shorter (GPT-2's absolute positions would
    raise an IndexError past it)."""
    from carl_assets.models.loading import model_max_positions

    limit = model_max_positions(model)
    return min(max_length, limit) if limit else max_length


def _peft_config(model: Any, config: Any) -> Any:
    """TRL's `peft_config` for the run (None: full fine-tune)."""
    from carl_assets.carl.lora import lora_config

    return lora_config(model, int(config.lora_r), float(config.lora_alpha) or None, float(config.lora_dropout),
                       config.lora_target_modules)


def _merged(trainer: Any, model: Any) -> Any:
    """The trained model to save: LoRA adapters merged into the base weights (a plain checkpoint), or the
    model itself after a full fine-tune."""
    from carl_assets.carl.lora import is_peft_model, merge_adapters

    return merge_adapters(trainer.model) if is_peft_model(trainer.model) else model


def prompt_lengths(tokenizer: Any, dataset: Any, limit: int = 512) -> list[int]:
    """Token counts of the first `limit` prompts of a prompt-completion dataset (chat template applied
    for conversational prompts); [] for other formats."""
    if "prompt" not in dataset.column_names:
        return []
    lengths = []
    for prompt in dataset.select(range(min(len(dataset), limit)))["prompt"]:
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
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
        raise ValueError(f"every SFT prompt is at least max_length={max_length} tokens (shortest "
                         f"{min(lengths)}): no completion token would be trained; raise max_length or shorten "
                         "the prompts")
    if too_long:
        import logging

        logging.getLogger("carl_assets.carl").warning(
            "%d of %d SFT prompts are at least max_length=%d tokens: their completions are cut away",
            len(too_long), len(lengths), max_length)


def _train_or_load(trainer: Any, resume: Any, finished: bool) -> tuple[int, list[dict[str, Any]]]:
    """Train (from the resume checkpoint, if any), or, when that checkpoint already ended the run, load it
    instead of training a step more; (steps run, the per-step log)."""
    if finished:
        _load_finished(trainer, resume)
    else:
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume.path))
    return int(trainer.state.global_step), _step_logs(trainer.state.log_history)


def _step_logger_class() -> type:
    from transformers import TrainerCallback

    class _StepLogger(TrainerCallback):
        """Logs step, loss, accuracy or reward and the time left every `every` steps (and the last)."""

        def __init__(self, log: Any, every: int = 25, max_steps: int | None = None, label: str = "training"):
            self.log, self.every, self.max_steps, self.label = log, max(1, int(every)), max_steps, label
            self.started = time.perf_counter()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
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

    return _StepLogger


def StepLogger(log: Any, every: int = 25, max_steps: int | None = None, label: str = "training") -> Any:  # noqa: N802
    """A transformers callback that reports progress through `log(str)` every `every` steps: step, loss,
    token accuracy or reward, learning rate and the time left at most (the budget; the gate may stop
    SFT sooner). The class is made on first use, so importing this module does not import transformers."""
    return _step_logger_class()(log, every=every, max_steps=max_steps, label=label)


@contextlib.contextmanager
def _quiet_trl() -> Iterator[None]:
    """No dataset-map progress bars or deprecation chatter from TRL/transformers internals while training
    (asset logs stay readable); the previous settings come back afterwards."""
    import logging
    import warnings

    from datasets.utils import logging as datasets_logging

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


# --------------------------------------------------------------------------------------------
# Trainer checkpoints: an interrupted run resumes where it was
# --------------------------------------------------------------------------------------------

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
    if not folder.is_dir() or not name.startswith(CHECKPOINT_PREFIX) or not name[len(CHECKPOINT_PREFIX):].isdigit():
        return None
    return int(name[len(CHECKPOINT_PREFIX):])


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


def latest_checkpoint(checkpoint_dir: str | os.PathLike[str] | None,
                      require: tuple[str, ...] = ()) -> TrainerCheckpoint | None:
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


def _prepare_resume(checkpoint_dir: str | os.PathLike[str] | None,
                    require: tuple[str, ...] = ()) -> TrainerCheckpoint | None:
    """The checkpoint to resume from; half-written checkpoints after it are removed, so the Trainer's
    rotation (`save_total_limit`) and a later save of the same step never meet them."""
    found = latest_checkpoint(checkpoint_dir, require)
    if checkpoint_dir is not None and Path(checkpoint_dir).is_dir():
        for folder in Path(checkpoint_dir).iterdir():
            step = _checkpoint_step(folder)
            if step is not None and (found is None or step > found.step):
                shutil.rmtree(folder, ignore_errors=True)
    return found


def _checkpoint_args(checkpoint_dir: str | os.PathLike[str] | None, save_steps: int) -> dict[str, Any]:
    """Trainer arguments that save a full checkpoint (weights, optimizer, scheduler, RNG) every
    `save_steps` steps; two are kept, so a kill while the newest is written leaves the one before."""
    if checkpoint_dir is None or save_steps < 1:
        return {}
    return {"save_strategy": "steps", "save_steps": int(save_steps), "save_total_limit": 2,
            "save_only_model": False}


def _completions_saver(scored: list[dict[str, Any]]) -> Any:
    """A callback that writes the completions scored so far into each checkpoint as it is saved (they
    are not part of the Trainer's state)."""
    from transformers import TrainerCallback

    class _CompletionsSaver(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            if folder.is_dir():
                rows = [c for c in scored if int(c["step"]) <= int(state.global_step)]
                tmp = folder / f".{GRPO_COMPLETIONS_FILE}.tmp"
                tmp.write_text(json.dumps(rows, default=str))
                os.replace(tmp, folder / GRPO_COMPLETIONS_FILE)  # the checkpoint counts only once this is whole

    return _CompletionsSaver()


def _load_finished(trainer: Any, checkpoint: TrainerCheckpoint) -> None:
    """The run had already ended at its last checkpoint (the step budget or the gate): take its weights
    and state instead of training on (`train(resume_from_checkpoint=...)` would run one more step)."""
    from transformers.trainer_callback import TrainerState

    trainer._load_from_checkpoint(str(checkpoint.path))
    trainer.state = TrainerState.load_from_json(str(checkpoint.path / TRAINER_STATE_FILE))


# --------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------


def train_sft(model: Any, tokenizer: Any, train_dataset: Any, output_dir: str | os.PathLike[str] | None,
              config: SFTRunConfig | None = None, extra_callbacks: list[Any] | None = None,
              checkpoint_dir: str | os.PathLike[str] | None = None,
              save_steps: int = DEFAULT_SAVE_STEPS) -> SFTOutcome:
    """TRL SFT with the crystallization gate: stops when the gate fires or at ``config.max_steps``.

    With ``config.lora_r > 0`` only LoRA adapters (`carl_assets.carl.lora`) train; they are merged into
    the base weights before saving, so ``output_dir`` holds a plain checkpoint (no adapter files) and
    `model` is the merged model afterwards.

    ``train_dataset`` is a `datasets.Dataset` in any format TRL's SFT accepts ("messages",
    "prompt"/"completion" (plain or conversational), or "text"). The trained model and tokenizer are
    saved to ``output_dir`` (if not None) with `training_log.json` (the outcome) beside them.

    ``checkpoint_dir``: full trainer checkpoints (weights, optimizer, scheduler, RNG, log) are saved
    there every ``save_steps`` steps (0: none), and when it already holds one the run resumes from the
    newest complete one (``outcome.resumed_from_step``): the data order, the optimizer and the gate's
    window continue as the uninterrupted run would have. Use one folder per run definition (model,
    data, config); the caller removes it once the result is safe.
    """
    from trl import SFTConfig, SFTTrainer

    from carl_assets.carl.coherence import PhaseTransitionGate

    config = config or SFTRunConfig()
    if config.max_steps < 1:
        raise ValueError("max_steps must be at least 1")
    if len(train_dataset) == 0:
        raise ValueError("the SFT dataset is empty")
    _check_prompts_fit(tokenizer, train_dataset, _fit_length(model, config.max_length))
    gate = PhaseTransitionGate(threshold=config.gate_threshold, window=config.gate_window,
                               min_above=config.gate_min_above)
    resume = _prepare_resume(checkpoint_dir)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="carl-sft-") as scratch, torch_threads(config.threads), _quiet_trl():
        trainer_args = {**_common_args(config),
                        **_checkpoint_args(checkpoint_dir, save_steps)}
        args = SFTConfig(
            output_dir=str(checkpoint_dir) if checkpoint_dir is not None else scratch,
            max_steps=config.max_steps,
            learning_rate=config.learning_rate,
            lr_scheduler_type=config.lr_scheduler_type,
            warmup_steps=_warmup(config),
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            weight_decay=config.weight_decay,
            max_length=_fit_length(model, config.max_length),
            completion_only_loss=config.completion_only_loss,
            assistant_only_loss=config.assistant_only_loss,
            **_optimizer_args(config.optim, config.optim_target_modules),
            **trainer_args,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                             callbacks=[gate, *(extra_callbacks or [])], peft_config=_peft_config(model, config))
        _no_printing(trainer)
        if resume is not None:
            gate.restore(resume.log_history)
        steps, history = _train_or_load(trainer, resume, finished=resume is not None and (
            resume.step >= config.max_steps or gate.triggered))
        model = _merged(trainer, model)
    model.eval()
    seconds = time.perf_counter() - started
    accuracies = [r["mean_token_accuracy"] for r in history if r.get("mean_token_accuracy") is not None]
    summary = gate.summary()
    outcome = SFTOutcome(
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
    outcome.output_dir = _save(model, tokenizer, output_dir)
    if output_dir is not None:
        (Path(output_dir) / TRAINING_LOG_FILE).write_text(
            json.dumps({**outcome.to_dict(), "config": asdict(config)}, indent=2, default=str) + "\n")
    return outcome


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------


def _prompt_only(dataset: Any, max_prompts: int | None, seed: int) -> Any:
    """GRPO needs a "prompt" column; a "messages" dataset gives its turns before the last assistant one."""
    columns = set(dataset.column_names)
    if "prompt" not in columns:
        if "messages" not in columns:
            raise ValueError(f"GRPO needs a 'prompt' (or 'messages') column; got {sorted(columns)}")

        def to_prompt(example: dict[str, Any]) -> dict[str, Any]:
            messages = list(example["messages"])
            while messages and messages[-1].get("role") == "assistant":
                messages.pop()
            return {"prompt": messages}

        dataset = dataset.map(to_prompt)
    dataset = dataset.select_columns(["prompt"])
    if max_prompts is not None and len(dataset) > max_prompts:
        dataset = dataset.shuffle(seed=seed).select(range(max_prompts))
    return dataset


def _recording_reward(model: Any, tokenizer: Any, config: GRPORunConfig, scored: list[dict[str, Any]]) -> Any:
    """The run's reward function (`config.reward`, by name: `carl_assets.carl.reward_fn.REWARD_NAMES`),
    appending every completion's step, group, text, reward and CARL components to `scored` (TRL itself
    logs only their means). Raises ValueError naming the known rewards for an unknown name."""
    from carl_assets.carl.reward_fn import make_reward_fn

    score = make_reward_fn(config.reward, model, tokenizer)

    def reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        rewards = score(prompts, completions, **kwargs)
        state = kwargs.get("trainer_state")
        step = int(getattr(state, "global_step", 0)) + 1  # the optimizer step these completions feed
        for i, (completion, value) in enumerate(zip(completions, rewards, strict=True)):
            comps = score.last_components[i] if i < len(score.last_components) else None
            text = completion[-1]["content"] if isinstance(completion, list) and completion else str(completion)
            scored.append({"step": step, "index": i, "group": i // config.num_generations,
                           "completion": text, "reward": float(value),
                           **{k: (None if comps is None else float(comps[k])) for k in CARL_COMPONENTS}})
        return rewards

    reward.__name__ = score.__name__  # TRL's columns: rewards/<name>/mean
    return reward


def train_grpo(model: Any, tokenizer: Any, train_dataset: Any, output_dir: str | os.PathLike[str] | None,
               config: GRPORunConfig | None = None, extra_callbacks: list[Any] | None = None,
               checkpoint_dir: str | os.PathLike[str] | None = None,
               save_steps: int = DEFAULT_SAVE_STEPS) -> GRPOOutcome:
    """TRL GRPO with a reward of the policy itself (``config.reward``: the CARL composite by default, or any
    name in `carl_assets.carl.reward_fn.REWARD_NAMES`) and ``beta=0``.

    Any batch TRL accepts trains: ``batch_size x gradient_accumulation_steps x processes`` a multiple of
    ``num_generations`` (`carl_assets.carl.trl_config.generation_batch_size`; ValueError with TRL's rule
    otherwise). Sampling: ``temperature``, ``top_p``, ``top_k``, ``min_p``. With ``lora_r > 0`` only LoRA
    adapters train and are merged into the saved weights. ``train_dataset`` needs a "prompt" column (plain text or chat messages), or "messages" (the
    prompt is everything before the final assistant turn). Returns the per-step log (reward,
    reward_std, ``carl/<component>`` means, loss, ...) and every scored completion's reward and
    components. Saves the model, tokenizer and `grpo_log.json` to ``output_dir`` if given.

    ``checkpoint_dir`` and ``save_steps``: as in `train_sft` (full trainer checkpoints, resume from the
    newest complete one); each checkpoint also holds the completions scored up to its step, so a
    resumed run's outcome still lists every completion of the run.
    """
    from trl import GRPOConfig, GRPOTrainer

    config = config or GRPORunConfig()
    prompts_needed = prompts_per_step(config.batch_size, config.gradient_accumulation_steps,
                                      config.num_generations)
    sampling = sampling_kwargs(config.temperature, config.top_p, config.top_k, config.min_p)
    dataset = _prompt_only(train_dataset, config.max_prompts, config.seed)
    if len(dataset) == 0:
        raise ValueError("the GRPO dataset has no prompts")
    if len(dataset) < prompts_needed:
        # TRL's sampler drops an incomplete generation batch: with fewer prompts than one optimizer step
        # takes, it would train nothing. Repeat them (each group still samples its own completions).
        from datasets import concatenate_datasets

        dataset = concatenate_datasets([dataset] * -(-prompts_needed // len(dataset)))
    scored: list[dict[str, Any]] = []
    reward_fn = _recording_reward(model, tokenizer, config, scored)
    saving = bool(_checkpoint_args(checkpoint_dir, save_steps))
    resume = _prepare_resume(checkpoint_dir, require=(GRPO_COMPLETIONS_FILE,))
    if resume is not None:
        done = json.loads((resume.path / GRPO_COMPLETIONS_FILE).read_text())
        scored.extend(c for c in done if int(c["step"]) <= resume.step)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="carl-grpo-") as scratch, torch_threads(config.threads), _quiet_trl():
        trainer_args = {**_common_args(config), **_checkpoint_args(checkpoint_dir, save_steps)}
        args = GRPOConfig(
            output_dir=str(checkpoint_dir) if checkpoint_dir is not None else scratch,
            max_steps=config.max_steps,
            learning_rate=config.learning_rate,
            per_device_train_batch_size=config.batch_size,
            num_generations=config.num_generations,
            max_completion_length=config.max_completion_length,
            **sampling,
            beta=config.beta,
            log_completions=False,
            **_schedule_args(config),
            **trainer_args,
        )
        savers = [_completions_saver(scored)] if saving else []
        trainer = GRPOTrainer(model=model, reward_funcs=[reward_fn], args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[*savers, *(extra_callbacks or [])],
                              peft_config=_peft_config(model, config))
        _no_printing(trainer)
        steps, history = _train_or_load(trainer, resume,
                                        finished=resume is not None and resume.step >= config.max_steps)
        model = _merged(trainer, model)
    model.eval()
    outcome = GRPOOutcome(steps=steps, seconds=time.perf_counter() - started, log_history=history,
                          completions=scored, resumed_from_step=0 if resume is None else resume.step)
    outcome.output_dir = _save(model, tokenizer, output_dir)
    if output_dir is not None:
        (Path(output_dir) / GRPO_LOG_FILE).write_text(
            json.dumps({**outcome.to_dict(), "config": asdict(config)}, indent=2, default=str) + "\n")
    return outcome


# --------------------------------------------------------------------------------------------
# Datasets for `carl train`
# --------------------------------------------------------------------------------------------

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_training_dataset(spec: str, split: str = "train") -> Any:
    """A `datasets.Dataset` from a local .jsonl/.json/.parquet/.csv file, a folder written by
    `save_to_disk`, or a named Hugging Face dataset (which needs the hub or its cache)."""
    from datasets import load_dataset, load_from_disk

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
                raise ValueError(f"dataset folder {path} has no split {split!r} (has {sorted(loaded.keys())})")
            loaded = loaded[split]
        return loaded
    looks_like_path = spec.startswith(("/", ".", "~")) or path.suffix.lower() in _FILE_BUILDERS or spec.count("/") > 1
    if looks_like_path:
        raise FileNotFoundError(f"dataset file {spec!r} does not exist")
    return load_dataset(spec, split=split)
