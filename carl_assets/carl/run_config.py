"""The run configs of the trainers (SFT, GRPO) and of the agent's sampling: each setting defined once.

A field left `None` takes the model's default: the value for the offline ~1M-parameter model or for a real
0.5-8B one, from the one table in `carl_assets.models.defaults` (`model_defaults`), filled in by one
function, `resolved(offline)`. The other fields have a plain default that holds for every model. Choices
are `Literal` types, or a `StrEnum` where `None` (the model's default) is allowed too: Dagster turns both
into an enum in the launchpad and rejects another value before a run starts (it cannot convert an
optional `Literal`).

The Dagster configs of the training assets inherit these classes (`carl_assets.defs.training_config`), so
a field is written once for the library, the launchpad and the YAML. `carl_assets.carl.trl_config.trl_config`
turns a resolved run config into TRL's `SFTConfig` / `GRPOConfig`. No Dagster import here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, Field

from carl_assets.carl.coherence import GATE_MIN_ABOVE, GATE_THRESHOLD, GATE_WINDOW
from carl_assets.carl.reward_fn import REWARD_NAMES
from carl_assets.dreams.generation import Sampling
from carl_assets.models.defaults import model_defaults, resolve_placement
from carl_assets.models.device import dtype_name
from carl_assets.settings import Settings

MODEL_DEFAULT = "None: the model's default (carl_assets.models.defaults.model_defaults)"
# Truncation is shared by three samplers, each with its own per-model defaults.
SAMPLER_DEFAULT = (
    "None: this sampler's default for the model (carl_assets.models.defaults: dream_sampling_defaults, "
    "grpo_sampling_defaults, agent_sampling_defaults)"
)


class Precision(StrEnum):
    """Floating-point precision of the weights or of the (mixed-precision) training."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Schedule(StrEnum):
    """transformers learning-rate schedules that need no further arguments."""

    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"
    inverse_sqrt = "inverse_sqrt"


Reward = StrEnum("Reward", {name: name for name in REWARD_NAMES})
Reward.__doc__ = "The GRPO reward, by name (carl_assets.carl.reward_fn.REWARD_NAMES)."

# A GPU by index for inference, up to eight (the most one node usually holds): a launchpad drop-down needs
# a fixed list, and a typo is then refused before the run starts.
Device = Literal[
    "auto", "cpu", "cuda", "mps", "cuda:0", "cuda:1", "cuda:2", "cuda:3",
    "cuda:4", "cuda:5", "cuda:6", "cuda:7",
]
Optimizer = Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "apollo_adamw"]


class RunSettings(Settings):
    """Base of every run config whose None fields take the model's default."""

    # Which part of `models.defaults.model_defaults` fills this config's None fields.
    DEFAULTS_FOR: ClassVar[str] = ""

    def resolved(self, offline: bool) -> Self:
        """A copy with every None field that has a model default filled in (`model_defaults`), for the
        offline model (`offline=True`) or a real one. Fields already set are kept."""
        table = model_defaults(self.DEFAULTS_FOR, offline)
        values = dict(self)
        values.update(
            {name: table[name] for name, value in values.items() if value is None and name in table}
        )
        return type(self).model_validate({**values, **self._derived(offline, values)})

    def _derived(self, offline: bool, values: dict[str, Any]) -> dict[str, Any]:
        """Values that follow from others once the table filled them (none by default)."""
        return {}


class Placement(RunSettings):
    """Where and how precisely a model runs, and the CPU threads torch uses: the same three fields on every
    asset that runs a model (the Dagster configs inherit this class). None: the model's default, resolved
    by `models.defaults.resolve_placement` / `resolve_threads` for what the asset does with the model."""

    device: Device = Field(
        default="auto",
        description="where the model runs: 'auto' (CUDA, then MPS, then CPU), 'cpu', 'cuda', 'cuda:N' "
        "(inference; training picks its GPU through CUDA_VISIBLE_DEVICES) or 'mps'",
    )
    dtype: Precision | None = Field(
        default=None,
        description="precision: 'fp32', 'bf16' or 'fp16' (training: mixed precision on fp32 weights; fp16 "
        "needs CUDA). None: the model's default for this use (models.defaults.resolve_placement): the "
        "offline model runs in fp32; a real one in bf16 where the device runs it natively and fast, and "
        "base_model saves it in bf16 on a GPU that has it, else fp32",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="torch CPU threads (performance only: not part of the data version); "
        + MODEL_DEFAULT
        + " (models.defaults.default_threads). On a machine shared with other jobs 1 can be many times "
        "faster",
    )


class TrainerRunConfig(Placement):
    """The settings SFT and GRPO share."""

    PURPOSE: ClassVar[str] = "training"

    max_steps: int | None = Field(default=None, ge=1, description="optimizer steps at most; " + MODEL_DEFAULT)
    learning_rate: float | None = Field(
        default=None, gt=0, description="peak learning rate; " + MODEL_DEFAULT
    )
    lr_scheduler_type: Schedule | None = Field(
        default=None, description="learning-rate schedule; " + MODEL_DEFAULT
    )
    warmup_ratio: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="share of the steps warming the learning rate up; " + MODEL_DEFAULT,
    )
    batch_size: int | None = Field(
        default=None, ge=1, description="examples (GRPO: completions) per device step; " + MODEL_DEFAULT
    )
    gradient_accumulation_steps: int | None = Field(
        default=None, ge=1, description="batches per optimizer step; " + MODEL_DEFAULT
    )
    gradient_checkpointing: bool | None = Field(
        default=None,
        description="recompute activations in the backward pass (memory for time); " + MODEL_DEFAULT,
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay")
    seed: int = Field(default=0, description="data order, dropout and sampling seed")
    lora_r: int = Field(
        default=0,
        ge=0,
        description="LoRA rank through peft (0: full fine-tune); the adapters "
        "are merged into the saved checkpoint, a plain safetensors folder",
    )
    lora_alpha: float | None = Field(
        default=None,
        gt=0,
        description="LoRA scale numerator, the update is scaled by alpha/r (None: 2 x lora_r)",
    )
    lora_dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the LoRA input")
    lora_target_modules: list[str] | None = Field(
        default=None,
        description="module names LoRA adapts (None: the attention and MLP projections the model has)",
    )

    def _derived(self, offline: bool, values: dict[str, Any]) -> dict[str, Any]:
        """The device resolved ('auto': CUDA, MPS, CPU) and the precision it trains in there."""
        if str(values["device"]).startswith("cuda:"):
            # Trainer and accelerate place the model on the process's current GPU, whatever index is asked.
            raise ValueError(
                f"device {values['device']!r}: training runs on the GPU CUDA_VISIBLE_DEVICES makes first; "
                "set that variable and device 'cuda' (or 'auto')"
            )
        device, dtype = resolve_placement(
            values["device"], values["dtype"] or "auto", offline, purpose=self.PURPOSE
        )
        return {"device": device.type, "dtype": Precision(dtype_name(dtype))}


class SFTRunConfig(TrainerRunConfig):
    """SFT until the crystallization gate fires (`carl_assets.carl.sft_trainer.train_sft`)."""

    DEFAULTS_FOR: ClassVar[str] = "sft"

    optim: Optimizer = Field(
        default="adamw_torch",
        description="transformers optimizer; 'apollo_adamw' is the "
        "reference's APOLLO (needs the apollo-torch package)",
    )
    optim_target_modules: list[str] | None = Field(
        default=None, description="APOLLO: the layers it projects (None: attention and MLP)"
    )
    max_length: int = Field(default=256, ge=1, description="tokens per example (longer ones are truncated)")
    gate_threshold: float = Field(
        default=GATE_THRESHOLD, description="token accuracy the crystallization gate waits for"
    )
    gate_window: int = Field(default=GATE_WINDOW, ge=1, description="gate window (logged steps)")
    gate_min_above: int = Field(
        default=GATE_MIN_ABOVE, ge=1, description="steps in the window at or above the threshold"
    )
    completion_only_loss: bool | None = Field(
        default=None,
        description="loss on the completion tokens only (None: TRL decides, True for prompt-completion data)",
    )
    assistant_only_loss: bool = Field(
        default=False,
        description="loss on the assistant turns only ('messages' "
        "data with a {% generation %} chat template)",
    )


class Truncation(BaseModel):
    """The sampling truncation every sampler here takes (GRPO, the agent, dreams), defined once: top-p
    (nucleus, Holtzman et al. 2020), top-k and min-p (Nguyen et al. 2024), applied by transformers'
    logits processors. None: the sampler's default for the model (`models.defaults`)."""

    top_p: float | None = Field(
        default=None, gt=0, le=1, description="nucleus truncation (1.0: off); " + SAMPLER_DEFAULT
    )
    top_k: int | None = Field(
        default=None, ge=0, description="keep the k likeliest tokens (0: off); " + SAMPLER_DEFAULT
    )
    min_p: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="drop tokens below min_p x the likeliest one's probability (0.0: off); "
        + SAMPLER_DEFAULT,
    )


class GRPORunConfig(TrainerRunConfig, Truncation):
    """GRPO on a reward of the policy itself (`carl_assets.carl.grpo_trainer.train_grpo`)."""

    DEFAULTS_FOR: ClassVar[str] = "grpo"

    num_generations: int | None = Field(
        default=None, ge=2, description="completions per prompt, the GRPO group; " + MODEL_DEFAULT
    )
    max_completion_length: int | None = Field(
        default=None, ge=1, description="tokens per completion; " + MODEL_DEFAULT
    )
    temperature: float | None = Field(
        default=None, gt=0, description="sampling temperature; " + MODEL_DEFAULT
    )
    reward: Reward | None = Field(
        default=None,
        description="the GRPO reward: 'carl' (the reference's "
        "composite), a CARL component or a confidence score; None: the model's, "
        "chosen by scorer_validation (models.defaults.scorer_defaults)",
    )
    beta: float = Field(
        default=0.0,
        ge=0,
        description="KL penalty to the starting policy (0: none, no reference model, as in the reference)",
    )
    max_prompts: int | None = Field(
        default=None, ge=1, description="use at most this many prompts (None: all)"
    )

    def _derived(self, offline: bool, values: dict[str, Any]) -> dict[str, Any]:
        """As the base, and a default batch that holds whole groups: the table's batch size rounded up to
        a multiple of num_generations (TRL's rule, `carl_assets.carl.trl_config.generation_batch_size`)."""
        derived = super()._derived(offline, values)
        if self.batch_size is None:
            groups = values["num_generations"]
            derived["batch_size"] = -(-max(values["batch_size"], groups) // groups) * groups
        return derived


class AgentSampling(RunSettings, Truncation):
    """How the agent generates: ``temperature`` 0 decodes greedily (the reference's agent step); above 0 it
    samples, truncated by ``top_k`` (0: off), ``top_p`` (1.0: off) and ``min_p`` (0.0: off), with torch's
    RNG seeded by ``seed`` (plus the task's index in `evaluate_agent`) so a run repeats."""

    DEFAULTS_FOR: ClassVar[str] = "agent"

    temperature: float | None = Field(
        default=None, ge=0, description="answer sampling temperature, 0: greedy; " + MODEL_DEFAULT
    )
    seed: int = Field(default=0, description="sampling seed (task i samples with seed + i)")

    def generate_kwargs(self) -> dict[str, Any]:
        """`generate` keywords: greedy, or sampling with every truncation set explicitly (a model's own
        generation_config must not add a top-k or top-p of its own). Fields still None take the offline
        model's defaults, as `train_sft` / `train_grpo` do: resolve for a real model first."""
        s = self.resolved(offline=True)
        if s.temperature == 0:
            return {"do_sample": False}
        truncation = Sampling(top_k=int(s.top_k), top_p=float(s.top_p), min_p=float(s.min_p))
        return {"do_sample": True, "temperature": float(s.temperature), **truncation.generate_kwargs()}


GREEDY = AgentSampling(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)
