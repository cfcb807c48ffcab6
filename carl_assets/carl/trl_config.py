"""Run configs → TRL's configs: `trl_config` (the one place a run-config field is forwarded to TRL's
`SFTConfig` / `GRPOConfig`), the GRPO generation batch rule and the sampling keywords.

TRL (1.16, `GRPOConfig.__post_init__`) generates one *generation batch* of
``per_device_train_batch_size x num_processes x steps_per_generation`` completions per optimizer step
(``steps_per_generation`` defaults to ``gradient_accumulation_steps``) and requires it to hold whole
prompt groups: ``(per_device_train_batch_size x gradient_accumulation_steps x num_processes) %
num_generations == 0``. The per-device batch alone need not be a multiple of the group size: batch 1
x accumulation 8 x 8 generations is one prompt's group spread over 8 micro-batches (TRL #3020).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from carl_assets.carl.run_config import GRPORunConfig, SFTRunConfig, TrainerRunConfig
from carl_assets.models.device import dtype_name, resolve_device, resolve_dtype

TRL_GENERATION_RULE = (
    "TRL requires (per_device_batch_size x gradient_accumulation_steps x processes) to be a "
    "multiple of num_generations (each optimizer step generates whole prompt groups)"
)


def world_size() -> int:
    """Training processes of this run: the launcher's WORLD_SIZE (torchrun, accelerate), else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def generation_batch_size(
    batch_size: int, gradient_accumulation_steps: int, num_generations: int, processes: int | None = None
) -> int:
    """Completions TRL generates per optimizer step, ``batch_size x gradient_accumulation_steps x processes``.

    Raises ValueError when a value is below 1, when ``num_generations < 2`` (GRPO's advantages are
    relative within a group), or when that product is not a multiple of ``num_generations``, naming
    the numbers, TRL's rule and the nearest accepted accumulation."""
    processes = world_size() if processes is None else int(processes)
    for name, value in (
        ("batch_size", batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("processes", processes),
    ):
        if int(value) < 1:
            raise ValueError(f"GRPO {name} must be at least 1, not {value}")
    if num_generations < 2:
        raise ValueError(
            f"GRPO needs num_generations >= 2 (advantages are relative within a group), not {num_generations}"
        )
    total = int(batch_size) * int(gradient_accumulation_steps) * processes
    if total % num_generations:
        per_micro = int(batch_size) * processes
        step = num_generations // math.gcd(
            per_micro, num_generations
        )  # accumulation must be a multiple of this
        raise ValueError(
            f"GRPO batch_size {batch_size} x gradient_accumulation_steps {gradient_accumulation_steps} x "
            f"processes {processes} = {total} completions per step is not a multiple of num_generations "
            f"{num_generations}: {TRL_GENERATION_RULE}. E.g. gradient_accumulation_steps "
            f"{-(-int(gradient_accumulation_steps) // step) * step}, or a batch_size that divides into groups"
        )
    return total


def prompts_per_step(
    batch_size: int, gradient_accumulation_steps: int, num_generations: int, processes: int | None = None
) -> int:
    """Distinct prompts one optimizer step samples: the generation batch / num_generations (at least 1
    once `generation_batch_size` accepts the settings)."""
    return (
        generation_batch_size(batch_size, gradient_accumulation_steps, num_generations, processes)
        // num_generations
    )


def sampling_kwargs(
    temperature: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> dict[str, Any]:
    """GRPOConfig's sampling fields. ``min_p`` 0.0 becomes None (TRL's "off"). Raises ValueError for a
    temperature <= 0 (GRPO needs sampled, varied completions), top_p outside (0, 1], a negative top_k, or
    min_p outside [0, 1)."""
    if not temperature > 0:
        raise ValueError(f"GRPO temperature must be > 0 (completions are sampled), not {temperature}")
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] (1.0: off), not {top_p}")
    if int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), not {top_k}")
    if not 0.0 <= float(min_p) < 1.0:
        raise ValueError(f"min_p must lie in [0, 1) (0.0: off), not {min_p}")
    return {
        "temperature": float(temperature),
        "top_p": float(top_p),
        "top_k": int(top_k),
        "min_p": float(min_p) if min_p > 0 else None,
    }


# Run-config fields TRL takes unchanged, by their TRL name: the only place a field is forwarded.
SHARED_FIELDS = {
    "max_steps": "max_steps",
    "learning_rate": "learning_rate",
    "batch_size": "per_device_train_batch_size",
    "lr_scheduler_type": "lr_scheduler_type",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "weight_decay": "weight_decay",
    "seed": "seed",
}
SFT_FIELDS = {"completion_only_loss": "completion_only_loss", "assistant_only_loss": "assistant_only_loss"}
GRPO_FIELDS = {
    "num_generations": "num_generations",
    "max_completion_length": "max_completion_length",
    "beta": "beta",
}
# APOLLO projects the gradients of these linear layers (names of Llama/Qwen2/GPT-2 style blocks).
APOLLO_DEFAULT_TARGETS = [r".*attn.*", r".*mlp.*"]


def trl_config(
    config: TrainerRunConfig,
    output_dir: str | os.PathLike[str],
    max_length: int | None = None,
    checkpointing: dict[str, Any] | None = None,
) -> Any:
    """TRL's `SFTConfig` for a resolved `SFTRunConfig`, or its `GRPOConfig` for a resolved `GRPORunConfig`.

    Every step is logged (``logging_steps=1``: the gate reads each one; TRL averages over the interval),
    nothing is reported or printed, precision flags are always set (left None, TRL turns bf16 on by itself
    on a GPU), and activation checkpointing is as configured (TRL's default is on). `max_length`: SFT's
    token limit when the model's position table is shorter than ``config.max_length``. `checkpointing`:
    the save-strategy arguments of a resumable run. Raises ValueError for a field still None (resolve the
    config first: `resolved(offline)`), fp16 on the CPU, or a warm-up ratio outside [0, 1)."""
    # trl is imported here: it costs ~15 s on a busy 2-core box beyond torch and transformers, which every
    # Dagster code location load would pay for the few assets that train.
    from trl import GRPOConfig, SFTConfig

    values = config.model_dump(mode="json")
    unset = sorted(
        name
        for name in type(config).model_fields
        if values[name] is None
        and name in {*SHARED_FIELDS, *GRPO_FIELDS, "warmup_ratio", "dtype", "gradient_checkpointing"}
    )
    if unset:
        raise ValueError(
            f"run config fields {', '.join(unset)} are not set: resolve the model's defaults "
            "first (config.resolved(offline))"
        )
    use_cpu = _use_cpu(config.device)
    own = SFT_FIELDS if isinstance(config, SFTRunConfig) else GRPO_FIELDS
    args = {trl_name: values[name] for name, trl_name in {**SHARED_FIELDS, **own}.items()}
    args.update(
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=use_cpu,
        data_seed=config.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        warmup_steps=_warmup(config.warmup_ratio),
        activation_checkpointing=bool(config.gradient_checkpointing),
        **_precision_args(values["dtype"], use_cpu, config.device),
    )
    args.update(checkpointing or {})  # a resumable run saves checkpoints: replaces save_strategy "no"
    if isinstance(config, GRPORunConfig):
        args.update(
            log_completions=False,
            **sampling_kwargs(config.temperature, config.top_p, config.top_k, config.min_p),
        )
        return GRPOConfig(output_dir=str(Path(output_dir)), **args)
    args.update(
        max_length=max_length or config.max_length,
        **_optimizer_args(config.optim, config.optim_target_modules),
    )
    return SFTConfig(output_dir=str(Path(output_dir)), **args)


def _use_cpu(device: str) -> bool:
    """Whether the Trainer runs on the CPU: `device` resolved ("auto": CUDA, MPS, CPU), so a missing one is
    a clear error. Raises ValueError for a CUDA index other than 0 (the Trainer takes its GPU from the
    process)."""
    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index not in (None, 0):
        raise ValueError(
            f"training on device {device!r}: the Trainer always uses the first visible GPU; "
            f"run with CUDA_VISIBLE_DEVICES={resolved.index} and device 'cuda'"
        )
    return resolved.type == "cpu"


def _precision_args(dtype: str, use_cpu: bool, device: str) -> dict[str, Any]:
    """TRL's mixed-precision flags for a training dtype (both always set)."""
    name = dtype_name(resolve_dtype(dtype, "cpu" if use_cpu else device))
    if name == "fp16" and use_cpu:
        raise ValueError(
            "dtype 'fp16' trains with a loss scaler that needs a CUDA device; use 'bf16' or 'fp32' on the CPU"
        )
    return {"bf16": name == "bf16", "fp16": name == "fp16"}


def _warmup(ratio: float) -> float | int:
    """Trainer `warmup_steps` for a warm-up share of max_steps (a float in [0, 1) is read as that share)."""
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), not {ratio}")
    return float(ratio) if ratio > 0 else 0


def _optimizer_args(optim: str, target_modules: list[str] | None) -> dict[str, Any]:
    """The optimizer's name, and for APOLLO the layers it projects (ImportError naming the packages when
    apollo-torch is missing)."""
    if not optim.startswith("apollo"):
        return {"optim": optim}
    try:
        import apollo_torch  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"optim {optim!r} needs the apollo-torch package (pip install apollo-torch bitsandbytes)"
        ) from exc
    return {"optim": optim, "optim_target_modules": target_modules or APOLLO_DEFAULT_TARGETS}
