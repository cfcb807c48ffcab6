"""Training hyper-parameters that suit the base model: the offline ~1M-parameter one, or a real 0.5–8B one.

The offline values are the ones the default pipeline is tuned to (they must not drift: its results
depend on them). The real-model values follow common practice for SFT/GRPO of small instruct models
(and the seed's `carl train`: 300 steps, 8 generations, bf16, gradient checkpointing): a learning
rate two orders smaller, cosine decay with warm-up, an effective batch of 16 through accumulation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from carl_assets.models.device import resolve_device, resolve_dtype


@dataclass(frozen=True)
class SFTDefaults:
    learning_rate: float
    lr_scheduler_type: str
    warmup_ratio: float
    batch_size: int
    gradient_accumulation_steps: int
    max_steps: int
    gradient_checkpointing: bool


@dataclass(frozen=True)
class GRPODefaults:
    learning_rate: float
    lr_scheduler_type: str
    warmup_ratio: float
    batch_size: int  # completions per device step: a multiple of num_generations
    gradient_accumulation_steps: int
    max_steps: int
    num_generations: int
    max_completion_length: int
    gradient_checkpointing: bool


@dataclass(frozen=True)
class TrainingDefaults:
    offline: bool
    dtype: str  # "fp32", or "auto" (bf16 on a CUDA device that has it)
    sft: SFTDefaults
    grpo: GRPODefaults


OFFLINE_DEFAULTS = TrainingDefaults(
    offline=True,
    dtype="fp32",  # the tuned runs are fp32; bf16 on a 1M-parameter model costs accuracy for no speed
    sft=SFTDefaults(learning_rate=1.5e-3, lr_scheduler_type="constant", warmup_ratio=0.0, batch_size=8,
                    gradient_accumulation_steps=1, max_steps=400, gradient_checkpointing=False),
    # "linear" with no warm-up: what TRL used when these values were tuned (its default schedule)
    grpo=GRPODefaults(learning_rate=1e-4, lr_scheduler_type="linear", warmup_ratio=0.0, batch_size=8,
                      gradient_accumulation_steps=1, max_steps=16, num_generations=4, max_completion_length=24,
                      gradient_checkpointing=False),
)

REAL_MODEL_DEFAULTS = TrainingDefaults(
    offline=False,
    dtype="auto",
    sft=SFTDefaults(learning_rate=2e-5, lr_scheduler_type="cosine", warmup_ratio=0.03, batch_size=4,
                    gradient_accumulation_steps=4, max_steps=300, gradient_checkpointing=True),
    grpo=GRPODefaults(learning_rate=1e-6, lr_scheduler_type="linear", warmup_ratio=0.0, batch_size=8,
                      gradient_accumulation_steps=4, max_steps=300, num_generations=8, max_completion_length=256,
                      gradient_checkpointing=True),
)


def training_defaults(offline: bool) -> TrainingDefaults:
    """The hyper-parameters for the offline default model (`offline=True`) or for a real model."""
    return OFFLINE_DEFAULTS if offline else REAL_MODEL_DEFAULTS


def is_offline_model(folder: str | os.PathLike[str]) -> bool:
    """Whether the model folder records (in `carl_model.json`) that it is the offline default model.
    Checkpoints trained from it carry no record: ask the base model's folder."""
    from carl_assets.models.loading import MODEL_INFO_FILE  # here: loading imports transformers

    info = Path(folder) / MODEL_INFO_FILE
    if not info.is_file():
        return False
    return str(json.loads(info.read_text()).get("source", "")).lower() in ("offline", "")


def resolve_placement(device: str, dtype: str, offline: bool) -> tuple[torch.device, torch.dtype]:
    """The device and dtype an asset runs a model in: `device` resolved ("auto": CUDA, MPS, CPU), and
    `dtype` as asked, where "auto" (or "") is this model's default: fp32 for the offline model (its tuned
    runs), else bf16 on a CUDA device that supports it and fp32 elsewhere."""
    where = resolve_device(device)
    wanted = dtype if (dtype or "auto").strip().lower() != "auto" else training_defaults(offline).dtype
    return where, resolve_dtype(wanted, where)


@dataclass(frozen=True)
class DreamSamplingDefaults:
    """How a model dreams: the noise schedule's temperature range and the truncation of each next-token
    distribution (`carl_assets.dreams.generation.Sampling`: top_k 0, top_p 1.0, min_p 0.0 are "off")."""

    temperature_start: float
    temperature_end: float
    top_k: int
    top_p: float
    min_p: float


# The offline model's tuned values: untruncated sampling from 1.3 down to 0.7 (its ~2k vocabulary has no
# long tail to fall into).
OFFLINE_DREAM_SAMPLING = DreamSamplingDefaults(temperature_start=1.3, temperature_end=0.7, top_k=0, top_p=1.0,
                                               min_p=0.0)
# A real model (SmolLM2-135M-Instruct, 49k vocabulary, checked by reading samples of a dream prompt): at 1.3
# untruncated it writes word salad; at 1.0 with top-p 0.9 and min-p 0.05 it writes varied, plain English,
# and 0.6 at the end of the schedule is close to its greedy answers without repeating them.
REAL_DREAM_SAMPLING = DreamSamplingDefaults(temperature_start=1.0, temperature_end=0.6, top_k=0, top_p=0.9,
                                            min_p=0.05)


def dream_sampling_defaults(offline: bool) -> DreamSamplingDefaults:
    """The dream temperature schedule and truncation for the offline model or for a real one."""
    return OFFLINE_DREAM_SAMPLING if offline else REAL_DREAM_SAMPLING
