"""Run settings → TRL's GRPOConfig terms: the generation batch rule and the sampling keywords.

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
from typing import Any

TRL_GENERATION_RULE = ("TRL requires (per_device_batch_size x gradient_accumulation_steps x processes) to be a "
                       "multiple of num_generations (each optimizer step generates whole prompt groups)")


def world_size() -> int:
    """Training processes of this run: the launcher's WORLD_SIZE (torchrun, accelerate), else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def generation_batch_size(batch_size: int, gradient_accumulation_steps: int, num_generations: int,
                          processes: int | None = None) -> int:
    """Completions TRL generates per optimizer step, ``batch_size x gradient_accumulation_steps x processes``.

    Raises ValueError when a value is below 1, when ``num_generations < 2`` (GRPO's advantages are
    relative within a group), or when that product is not a multiple of ``num_generations``, naming
    the numbers, TRL's rule and the nearest accepted accumulation."""
    processes = world_size() if processes is None else int(processes)
    for name, value in (("batch_size", batch_size), ("gradient_accumulation_steps", gradient_accumulation_steps),
                        ("processes", processes)):
        if int(value) < 1:
            raise ValueError(f"GRPO {name} must be at least 1, not {value}")
    if num_generations < 2:
        raise ValueError(f"GRPO needs num_generations >= 2 (advantages are relative within a group), not "
                         f"{num_generations}")
    total = int(batch_size) * int(gradient_accumulation_steps) * processes
    if total % num_generations:
        per_micro = int(batch_size) * processes
        step = num_generations // math.gcd(per_micro, num_generations)  # accumulation must be a multiple of this
        raise ValueError(
            f"GRPO batch_size {batch_size} x gradient_accumulation_steps {gradient_accumulation_steps} x "
            f"processes {processes} = {total} completions per step is not a multiple of num_generations "
            f"{num_generations}: {TRL_GENERATION_RULE}. E.g. gradient_accumulation_steps "
            f"{-(-int(gradient_accumulation_steps) // step) * step}, or a batch_size that divides into groups")
    return total




def prompts_per_step(batch_size: int, gradient_accumulation_steps: int, num_generations: int,
                     processes: int | None = None) -> int:
    """Distinct prompts one optimizer step samples: the generation batch / num_generations (at least 1
    once `generation_batch_size` accepts the settings)."""
    return generation_batch_size(batch_size, gradient_accumulation_steps, num_generations,
                                 processes) // num_generations


def sampling_kwargs(temperature: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> dict[str, Any]:
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
    return {"temperature": float(temperature), "top_p": float(top_p), "top_k": int(top_k),
            "min_p": float(min_p) if min_p > 0 else None}
