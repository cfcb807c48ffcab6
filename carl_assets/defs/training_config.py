"""The run configs of the training and evaluation assets (sft_dataset, sft_checkpoint,
crystallization_events, grpo_checkpoint, agent_evaluation): what a user sets in the launchpad.

The trainer settings are not repeated here: `SFTCheckpointConfig`, `GRPOCheckpointConfig` and
`AgentEvaluationConfig` inherit the library's run configs (`carl_assets.carl.run_config`), so each field,
its type (Literal/enum choices become launchpad dropdowns, checked before a run starts), its description
and its default are written once, and the YAML keeps one flat level (``sft_checkpoint: {config:
{max_steps: 8}}``). A field left None takes the model's default (`carl_assets.models.defaults`). Only the
asset's own settings (where to start, how to launch, how often to log and checkpoint, what its checks
require) are defined here.
"""

from typing import Any, ClassVar

import dagster as dg
import torch
from pydantic import BaseModel, Field

from carl_assets.carl import SIGMA
from carl_assets.carl.run_config import AgentSampling, GRPORunConfig, Placement, SFTRunConfig
from carl_assets.carl.sft_data import SFTDataConfig
from carl_assets.carl.trainer_common import GRPO_LOG_EVERY, SFT_LOG_EVERY
from carl_assets.defs.common import library_config
from carl_assets.models.device import dtype_name, resolve_dtype, training_weights_dtype
from carl_assets.settings import PERFORMANCE_ONLY

DREAMS_SOURCE = "dreams"


def _resolved_run(
    config: dg.Config, cls: type[Any], offline: bool, device: Any, dtype: Any, **replace: Any
) -> Any:
    """The trainer's library run config `cls` from `config`, with `device`, `dtype` and `replace` (each when
    not None) in place of the configured values, then every None field resolved for this model."""
    given = {
        "device": None if device is None else torch.device(device).type,
        "dtype": None if dtype is None else _dtype_name(dtype),
        **replace,
    }
    run = library_config(config, cls)
    return run.model_copy(update={k: v for k, v in given.items() if v is not None}).resolved(offline)


def _training_placement(run: Any) -> tuple[torch.device, torch.dtype, torch.dtype]:
    """(device, dtype it trains in, dtype to load the weights in) of a resolved trainer run config."""
    dtype = resolve_dtype(str(run.dtype), run.device)
    return torch.device(run.device), dtype, training_weights_dtype(dtype)


class SFTDatasetConfig(dg.Config, SFTDataConfig):
    """sft_dataset: where the examples come from and how many prompts GRPO keeps; `SFTDataConfig`: how
    the templated examples and the held-out agent tasks are drawn (the library's settings, defined there)."""

    source: str = Field(
        default=DREAMS_SOURCE,
        description="'dreams' (default: the kept responses of the latest dream cycle, behavioural cloning), "
        "'templates' (short templated answers about memory nodes), or a dataset for SFT: a local "
        ".jsonl/.json/.parquet/.csv file, a save_to_disk folder or a Hugging Face dataset name.",
    )
    grpo_prompts: int = Field(
        default=8,
        description="prompts held out of SFT for GRPO, so GRPO explores where "
        "the model did not memorise an answer (dreams: whole scenarios; templates: "
        "questions about other nodes)",
    )


class TrainerProgress(BaseModel):
    """How SFT and GRPO report and save as they go: progress lines, and trainer checkpoints so that a killed
    run resumes (performance-only fields: neither changes what is trained)."""

    # The interval `log_every` None stands for, per trainer (carl_assets.carl.trainer_common).
    LOG_EVERY: ClassVar[int] = SFT_LOG_EVERY

    checkpoint_every: int = Field(
        default=25,
        description="save a trainer checkpoint every this many steps, so "
        "a killed run resumes from it when materialized again (0: never)",
        json_schema_extra=PERFORMANCE_ONLY,
    )
    log_every: int | None = Field(
        default=None,
        ge=1,
        description="log step, loss or reward, token accuracy and time left every this many steps (None: "
        "the trainer's interval, carl_assets.carl.trainer_common)",
        json_schema_extra=PERFORMANCE_ONLY,
    )

    def log_interval(self) -> int:
        """Steps between progress lines: `log_every`, else this trainer's interval."""
        return self.log_every or self.LOG_EVERY


class SFTCheckpointConfig(dg.Config, SFTRunConfig, TrainerProgress):
    """sft_checkpoint: the `SFTRunConfig` fields, where learning_rate None means the dream cycle's scheduled
    rate for dream data (else the model's default), and where and how this asset runs it."""

    start_from: str = Field(
        default="auto",
        description="weights SFT starts from: 'auto' (the checkpoint that "
        "dreamed this cycle's data, else base_model), 'base_model', or '<asset>@<version>' "
        "from artifact_versions (roll back to an earlier cycle)",
    )
    launcher: str = Field(
        default="inprocess",
        description="where SFT runs: 'inprocess' (this process), or "
        "'torchrun:N' / 'accelerate:N' (N processes on this machine, through Dagster Pipes; "
        "batch_size is the global batch, split over them)",
        json_schema_extra=PERFORMANCE_ONLY,
    )

    def run_config(
        self, learning_rate: float | None = None, offline: bool = True, device: Any = None, dtype: Any = None
    ) -> SFTRunConfig:
        """The library's SFT run config with every None field resolved for this model; `learning_rate`,
        `device` and `dtype`, when given, replace the configured ones (the dream cycle's rate; a placement
        already resolved)."""
        return _resolved_run(self, SFTRunConfig, offline, device, dtype, learning_rate=learning_rate)

    def placement(self, offline: bool) -> tuple[torch.device, torch.dtype, torch.dtype]:
        """(device, dtype it trains in, dtype to load the weights in)."""
        return _training_placement(self.run_config(offline=offline))


class CrystallizationConfig(dg.Config):
    require_crystallization: bool = Field(
        default=True,
        description="hold GRPO back (the sft_crystallized check "
        "fails as an error) when SFT did not crystallize; False lets GRPO run "
        "anyway, the check then only warns",
    )


class GRPOCheckpointConfig(dg.Config, GRPORunConfig, TrainerProgress):
    """grpo_checkpoint: the `GRPORunConfig` fields, and what this asset's check requires and how it logs."""

    LOG_EVERY: ClassVar[int] = GRPO_LOG_EVERY

    max_frac_reward_zero_std: float = Field(
        default=0.5,
        description="the grpo_reward_spread check fails (and "
        "holds the evaluation back) when on average this share of groups "
        "or more had no reward spread",
    )

    def run_config(self, offline: bool = True, device: Any = None, dtype: Any = None) -> GRPORunConfig:
        """The library's GRPO run config with every None field resolved for this model (`device` and
        `dtype`, when given, replace the configured ones)."""
        return _resolved_run(self, GRPORunConfig, offline, device, dtype)

    def placement(self, offline: bool) -> tuple[torch.device, torch.dtype, torch.dtype]:
        """(device, dtype it trains in, dtype to load the weights in)."""
        return _training_placement(self.run_config(offline=offline))


class AgentEvaluationConfig(dg.Config, AgentSampling, Placement):
    """agent_evaluation: the agent's `AgentSampling` and `Placement` fields, and its gate and budget."""

    gate_threshold: float = Field(
        default=SIGMA, description="abstain when phi mean is below this (sigma = 3/16)"
    )
    max_new_tokens: int = Field(default=32, ge=1, description="tokens generated per task")
    max_tasks: int | None = Field(
        default=None, ge=1, description="evaluate at most this many held-out tasks (None: all)"
    )

    def sampling(self, offline: bool) -> AgentSampling:
        """The agent's sampling: each field as set, else the model's default."""
        return library_config(self, AgentSampling).resolved(offline)


def _dtype_name(dtype: Any) -> str:
    """'fp32', 'bf16' or 'fp16' for a torch dtype or such a name."""
    return dtype_name(resolve_dtype(dtype)) if isinstance(dtype, str) else dtype_name(dtype)
