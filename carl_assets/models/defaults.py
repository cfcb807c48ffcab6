"""Training hyper-parameters that suit the base model: the offline ~1M-parameter one, or a real 0.5–8B one.

The offline values are the ones the default pipeline is tuned to (they must not drift: its results
depend on them). The real-model values follow common practice for SFT/GRPO of small instruct models
(and the reference's `carl train`: 300 steps, 8 generations, bf16, gradient checkpointing): a learning
rate two orders smaller, cosine decay with warm-up, an effective batch of 16 through accumulation.

Every model-dependent default lives here, keyed by whether the model is the offline one: training
hyper-parameters (`training_defaults`), the sampling of dreams, GRPO and the agent
(`dream_sampling_defaults`, `grpo_sampling_defaults`, `agent_sampling_defaults`), torch threads
(`default_threads`) and the precision a model runs in (`resolve_placement`). `model_defaults` gives a run
config's share of them by field name (`carl_assets.carl.run_config` fills its None fields from it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from carl_assets.models.device import available_cores, fast_dtype, native_bf16, resolve_device, resolve_dtype


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
    dtype: str  # training precision: "fp32", or "auto" (bf16 mixed precision on a CUDA GPU with bf16)
    sft: SFTDefaults
    grpo: GRPODefaults


OFFLINE_DEFAULTS = TrainingDefaults(
    offline=True,
    dtype="fp32",  # the tuned runs are fp32; bf16 on a 1M-parameter model costs accuracy for no speed
    sft=SFTDefaults(
        learning_rate=1.5e-3,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        batch_size=8,
        gradient_accumulation_steps=1,
        max_steps=400,
        gradient_checkpointing=False,
    ),
    # "linear" with no warm-up: what TRL used when these values were tuned (its default schedule)
    grpo=GRPODefaults(
        learning_rate=1e-4,
        lr_scheduler_type="linear",
        warmup_ratio=0.0,
        batch_size=8,
        gradient_accumulation_steps=1,
        max_steps=16,
        num_generations=4,
        max_completion_length=24,
        gradient_checkpointing=False,
    ),
)

REAL_MODEL_DEFAULTS = TrainingDefaults(
    offline=False,
    dtype="auto",  # bf16 mixed precision on a CUDA GPU that has it; on a CPU: CPU_TRAINING_DTYPE
    sft=SFTDefaults(
        learning_rate=2e-5,
        lr_scheduler_type="cosine",
        warmup_ratio=0.03,
        batch_size=4,
        gradient_accumulation_steps=4,
        max_steps=300,
        gradient_checkpointing=True,
    ),
    grpo=GRPODefaults(
        learning_rate=1e-6,
        lr_scheduler_type="linear",
        warmup_ratio=0.0,
        batch_size=8,
        gradient_accumulation_steps=4,
        max_steps=300,
        num_generations=8,
        max_completion_length=256,
        gradient_checkpointing=True,
    ),
)


def training_defaults(offline: bool) -> TrainingDefaults:
    """The hyper-parameters for the offline default model (`offline=True`) or for a real model."""
    return OFFLINE_DEFAULTS if offline else REAL_MODEL_DEFAULTS


def is_offline_model(folder: str | os.PathLike[str]) -> bool:
    """Whether the model folder records (in `carl_model.json`) that it is the offline default model.
    Checkpoints trained from it carry no record: ask the base model's folder. An asset's artifact folder
    (`artifacts/base_model`) is asked about its `current` version, as `resolve_model_source` loads it."""
    from carl_assets.models.loading import MODEL_INFO_FILE  # here: loading imports transformers

    info = Path(folder) / MODEL_INFO_FILE
    if not info.is_file() and not (Path(folder) / "config.json").exists():
        info = Path(folder) / "current" / MODEL_INFO_FILE
    if not info.is_file():
        return False
    return str(json.loads(info.read_text()).get("source", "")).lower() in ("offline", "")


PURPOSES = ("inference", "training")
# A real model trains in fp32 on a CPU, even one with native bf16. Measured on SmolLM2-135M (2-core
# AVX512-BF16 Xeon, SFT at lr 2e-5, 6 steps x 3 seeds, paired data order): bf16 autocast (TRL bf16=True on
# fp32 weights) was no faster, and its loss lagged fp32 in every seed, by 0.22 at step 6 (paired differences
# 0.215-0.221; the seeds' own spread 0.11): a 2e-5 update is below bf16's rounding of most weights, so the
# bf16 forward barely sees it.
CPU_TRAINING_DTYPE = "fp32"


def resolve_placement(
    device: str, dtype: str, offline: bool, purpose: str = "inference"
) -> tuple[torch.device, torch.dtype]:
    """The device and dtype an asset runs a model in: `device` resolved ("auto": CUDA, MPS, CPU), and
    `dtype` as asked, where "auto" (or "") is this model's default: fp32 for the offline model (its tuned
    runs); for a real model, bf16 where the device computes it natively and fast (a CUDA GPU with bf16, a
    CPU with AVX512-BF16/AMX where a quick matmul measurement finds bf16 faster: `models.device.fast_dtype`)
    and fp32 elsewhere. For `purpose="training"` a real
    model's "auto" is bf16 (mixed precision) on a CUDA GPU with bf16, and `CPU_TRAINING_DTYPE` (fp32,
    measured) on a CPU.

    Raises ValueError for an unknown purpose, device or dtype."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}: use one of {PURPOSES}")
    where = resolve_device(device)
    if (dtype or "auto").strip().lower() != "auto":
        return where, resolve_dtype(dtype, where)
    if offline:
        return where, resolve_dtype(OFFLINE_DEFAULTS.dtype, where)
    if purpose == "training":
        if where.type == "cpu":
            return where, torch.bfloat16 if CPU_TRAINING_DTYPE == "bf16" and native_bf16(
                where
            ) else torch.float32
        return where, resolve_dtype(REAL_MODEL_DEFAULTS.dtype, where)
    return where, fast_dtype(where)


@dataclass(frozen=True)
class DreamSamplingDefaults:
    """How a model dreams: the noise schedule's temperature range and first SFT learning rate (the last is
    a tenth of it, as the reference's 1e-4 -> 1e-5), and the truncation of each next-token distribution
    (`carl_assets.dreams.generation.Sampling`: top_k 0, top_p 1.0, min_p 0.0 are "off")."""

    lr_start: float
    temperature_start: float
    temperature_end: float
    top_k: int
    top_p: float
    min_p: float


# The offline model's tuned values: untruncated sampling from 1.3 down to 0.7 (its ~2k vocabulary has no
# long tail to fall into), at the larger rate its SFT is tuned to (it does not crystallize on its dreams at
# the reference's 1e-4 within a CPU budget).
OFFLINE_DREAM_SAMPLING = DreamSamplingDefaults(
    lr_start=OFFLINE_DEFAULTS.sft.learning_rate,
    temperature_start=1.3, temperature_end=0.7, top_k=0, top_p=1.0, min_p=0.0
)
# A real model (SmolLM2-135M-Instruct, 49k vocabulary, checked by reading samples of a dream prompt): at 1.3
# untruncated it writes word salad; at 1.0 with top-p 0.9 and min-p 0.05 it writes varied, plain English,
# and 0.6 at the end of the schedule is close to its greedy answers without repeating them.
# The learning rate is the reference's noise schedule for a real model.
REAL_DREAM_SAMPLING = DreamSamplingDefaults(
    lr_start=1e-4,
    temperature_start=1.0, temperature_end=0.6, top_k=0, top_p=0.9, min_p=0.05
)


def dream_sampling_defaults(offline: bool) -> DreamSamplingDefaults:
    """The dream temperature schedule and truncation for the offline model or for a real one."""
    return OFFLINE_DREAM_SAMPLING if offline else REAL_DREAM_SAMPLING


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling of GRPO completions or agent answers: temperature (0: greedy decoding) and truncation
    (top_k 0, top_p 1.0, min_p 0.0 are "off"; Hugging Face `generate` and TRL's GRPOConfig meanings)."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float


# The offline model's GRPO ran at TRL's defaults (temperature 1.0, no truncation) when it was tuned.
OFFLINE_GRPO_SAMPLING = SamplingDefaults(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)
# A real model's completions get the dream schedule's truncation (top-p 0.9, min-p 0.05, readable English
# on SmolLM2-135M) at a temperature inside that schedule's range, so a group still varies.
REAL_GRPO_SAMPLING = SamplingDefaults(temperature=0.8, top_p=0.9, top_k=0, min_p=0.05)
# The reference's agent step decodes greedily; the offline model keeps that (its answers are memorised).
OFFLINE_AGENT_SAMPLING = SamplingDefaults(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)
# Greedy decoding makes a small real model repeat itself; common practice samples at 0.7 with top-p 0.9.
REAL_AGENT_SAMPLING = SamplingDefaults(temperature=0.7, top_p=0.9, top_k=0, min_p=0.0)


def grpo_sampling_defaults(offline: bool) -> SamplingDefaults:
    """How GRPO samples its completions, for the offline model or a real one."""
    return OFFLINE_GRPO_SAMPLING if offline else REAL_GRPO_SAMPLING


def agent_sampling_defaults(offline: bool) -> SamplingDefaults:
    """How the agent generates its answers (temperature 0: greedy), for the offline model or a real one."""
    return OFFLINE_AGENT_SAMPLING if offline else REAL_AGENT_SAMPLING


# The offline ~1M-parameter model: torch's thread pool costs more than it saves (one thread ran its SFT
# several times faster on a shared 2-core box). A real model's matrix products use every core.
OFFLINE_THREADS = 1


def default_threads(offline: bool) -> int:
    """torch intra-op threads of an asset whose config leaves `threads` None: 1 for the
    offline model, else `models.device.available_cores()` (affinity mask, capped by a cgroup quota)."""
    return OFFLINE_THREADS if offline else available_cores()


def resolve_threads(threads: int | None, offline: bool) -> int:
    """`threads` when positive, else (None or 0) `default_threads(offline)`. Raises ValueError when
    negative."""
    if threads is not None and threads < 0:
        raise ValueError(f"threads must be None (the model's default) or a positive count, not {threads}")
    return int(threads) if threads else default_threads(offline)


@dataclass(frozen=True)
class ScorerDefaults:
    """Which score filters dreams (`dream_scenarios.scorer`) and rewards GRPO, per model, as chosen by the
    `scorer_validation` measurement (notes in the README, "Scorer validation")."""

    dream_scorer: str
    grpo_reward: str


# Measured by scorer_validation (24 dream prompts, 48 tokens; pooled AUC, coherent vs corrupted answers):
# the offline model keeps the reference's CARL, which its tuned results depend on and which separates
# there (0.85 [0.80, 0.90]); on SmolLM2-135M-Instruct CARL is at chance (0.49 [0.39, 0.57]) and
# self-certainty is the best (0.80 [0.74, 0.86]; mean log-probability 0.74, negative entropy 0.69).
OFFLINE_SCORERS = ScorerDefaults(dream_scorer="carl", grpo_reward="carl")
REAL_SCORERS = ScorerDefaults(dream_scorer="self_certainty", grpo_reward="self_certainty")


def scorer_defaults(offline: bool) -> ScorerDefaults:
    """The dream filter's scorer and the GRPO reward for the offline model or for a real one."""
    return OFFLINE_SCORERS if offline else REAL_SCORERS


def model_defaults(kind: str, offline: bool) -> dict[str, Any]:
    """This table's model-dependent defaults for one run config, by field name: `kind` "sft" or "grpo"
    (`training_defaults`, the torch threads; GRPO adds its sampling and reward) or "agent" (its sampling).
    `carl_assets.carl.run_config.RunSettings.resolved` fills a config's None fields from it.

    Raises KeyError naming the kinds for another `kind`."""
    training = training_defaults(offline)
    threads = {"threads": default_threads(offline)}
    tables: dict[str, Callable[[], dict[str, Any]]] = {
        "sft": lambda: {**asdict(training.sft), **threads},
        "grpo": lambda: {
            **asdict(training.grpo),
            **asdict(grpo_sampling_defaults(offline)),
            "reward": scorer_defaults(offline).grpo_reward,
            **threads,
        },
        "agent": lambda: asdict(agent_sampling_defaults(offline)),
    }
    if kind not in tables:
        raise KeyError(f"no model defaults for {kind!r}: use one of {sorted(tables)}")
    return tables[kind]()
