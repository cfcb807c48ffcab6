"""The run configs of the training and evaluation assets (sft_dataset, sft_checkpoint,
crystallization_events, grpo_checkpoint, agent_evaluation): what a user sets in the launchpad, each field
resolved against the model's defaults (`carl_assets.models.defaults`) into the library's run config."""

from typing import Any

import dagster as dg
from pydantic import Field

from carl_assets.carl import SIGMA
from carl_assets.defs.common import PERFORMANCE_ONLY

DREAMS_SOURCE = "dreams"

DEVICE_DESCRIPTION = "where the model runs: 'auto' (CUDA, then MPS, then CPU), 'cpu', 'cuda' or 'mps'"
DTYPE_DESCRIPTION = ("precision: 'auto' (fp32 for the offline model; for a real one bf16 where the device computes it "
                     "natively and fast: a CUDA GPU with bf16, a CPU with AVX512-BF16/AMX where a quick matmul "
                     "measurement finds bf16 faster), 'bf16', 'fp16' or 'fp32'")
TRAINING_DTYPE_DESCRIPTION = ("training precision: 'auto' (fp32 for the offline model; for a real one fp32 on a CPU, "
                              "measured: bf16 autocast was no faster and lagged, models.defaults.CPU_TRAINING_DTYPE; "
                              "bf16 mixed precision on a CUDA GPU with bf16), 'bf16' (mixed precision on fp32 "
                              "weights), 'fp16' (mixed precision, CUDA only) or 'fp32'")
THREADS_DESCRIPTION = ("torch CPU threads (0: the model's default, 1 for the offline model, all the cores this "
                       "process may use for a real one: models.defaults.default_threads)")
LORA_DESCRIPTION = ("LoRA rank through peft (0: full fine-tune); the adapters are merged into the saved "
                    "checkpoint, a plain safetensors folder")


class TrainingRunConfig(dg.Config):
    """Settings SFT and GRPO share; 0, '' or None mean: the default for this base model (the offline
    model's tuned values, or values for a real 0.5-8B model: `carl_assets.models.defaults`)."""

    device: str = Field(default="auto", description=DEVICE_DESCRIPTION)
    dtype: str = Field(default="auto", description=TRAINING_DTYPE_DESCRIPTION)
    gradient_checkpointing: bool | None = Field(default=None, description="recompute activations in the backward "
                                                "pass (memory for time); None: off for the offline model, on for "
                                                "a real one")
    lr_scheduler_type: str = Field(default="", description="transformers schedule name ('constant', 'linear', "
                                   "'cosine', ...); '': the model's default")
    warmup_ratio: float | None = Field(default=None, description="share of the steps warming the learning rate "
                                       "up, in [0, 1); None: the model's default")
    gradient_accumulation_steps: int = Field(default=0, description="batches per optimizer step (0: the model's "
                                             "default)")
    lora_r: int = Field(default=0, description=LORA_DESCRIPTION)
    lora_alpha: float = Field(default=0.0, description="LoRA scale numerator, the update is scaled by alpha/r "
                              "(0: 2 x lora_r)")
    lora_dropout: float = Field(default=0.0, description="dropout on the LoRA input, in [0, 1)")
    lora_target_modules: list[str] = Field(default=[], description="module names LoRA adapts ([]: the attention "
                                           "and MLP projections the model has, e.g. q_proj ... down_proj)")

    def placement(self, offline: bool) -> tuple[Any, Any, Any]:
        """(device, dtype it trains in, dtype to load the weights in)."""
        from carl_assets.models.defaults import resolve_placement
        from carl_assets.models.device import training_weights_dtype

        device, dtype = resolve_placement(self.device, self.dtype, offline, purpose="training")
        return device, dtype, training_weights_dtype(dtype)

    def lora_values(self) -> dict[str, Any]:
        """The run config's LoRA fields (checked when the trainer builds the adapters)."""
        return {"lora_r": int(self.lora_r), "lora_alpha": float(self.lora_alpha),
                "lora_dropout": float(self.lora_dropout),
                "lora_target_modules": list(self.lora_target_modules) or None}

    def shared_run_values(self, defaults: Any, device: Any, dtype: Any) -> dict[str, Any]:
        """The run-config values this class holds, each resolved against `defaults` (SFT or GRPO)."""
        from carl_assets.models.device import dtype_name

        return {
            "device": str(device),
            "dtype": dtype_name(dtype),
            "gradient_checkpointing": defaults.gradient_checkpointing if self.gradient_checkpointing is None
            else bool(self.gradient_checkpointing),
            "lr_scheduler_type": self.lr_scheduler_type or defaults.lr_scheduler_type,
            "warmup_ratio": defaults.warmup_ratio if self.warmup_ratio is None else float(self.warmup_ratio),
            "gradient_accumulation_steps": self.gradient_accumulation_steps or defaults.gradient_accumulation_steps,
        }


class SFTDatasetConfig(dg.Config):
    source: str = Field(
        default=DREAMS_SOURCE,
        description="'dreams' (default: the kept responses of the latest dream cycle, behavioural cloning), "
        "'templates' (short templated answers about memory nodes), or a dataset for SFT: a local "
        ".jsonl/.json/.parquet/.csv file, a save_to_disk folder or a Hugging Face dataset name.",
    )
    max_examples: int = Field(default=48, description="templates source: SFT examples (small: a tiny model must "
                              "memorise them to crystallize)")
    holdout_tasks: int = Field(default=12, description="agent tasks from memory nodes kept out of SFT")
    tasks: list[str] = Field(default=["feelings"], description="templated question kinds: 'feelings' and/or 'kind'")
    excerpt_chars: int = Field(default=120, description="memory excerpt length in each templated prompt")
    seed: int = Field(default=0, description="which nodes go to templated SFT and which are held out")
    grpo_prompts: int = Field(default=8, description="prompts held out of SFT for GRPO, so GRPO explores where "
                              "the model did not memorise an answer (dreams: whole scenarios; templates: "
                              "questions about other nodes)")


class SFTCheckpointConfig(TrainingRunConfig):
    start_from: str = Field(default="auto", description="weights SFT starts from: 'auto' (the checkpoint that "
                            "dreamed this cycle's data, else base_model), 'base_model', or '<asset>@<version>' "
                            "from artifact_versions (roll back to an earlier cycle)")
    max_steps: int = Field(default=0, description="step budget; training stops earlier when the gate fires "
                           "(0: 400 for the offline model, 300 for a real one)")
    learning_rate: float = Field(default=0.0, description="peak learning rate (0: the dream cycle's scheduled "
                                 "rate for dream data; for templated data 1.5e-3 for the offline model, 2e-5 "
                                 "for a real one)")
    optim: str = Field(default="adamw_torch", description="transformers optimizer name: 'adamw_torch' or "
                       "'apollo_adamw' (the seed's APOLLO; needs the apollo-torch package)")
    batch_size: int = Field(default=0, description="examples per device step (0: 8 for the offline model, 4 "
                            "(x4 accumulated) for a real one)")
    gate_threshold: float = Field(default=0.99, description="token accuracy the gate waits for")
    gate_window: int = Field(default=5, description="gate window (logged steps)")
    gate_min_above: int = Field(default=3, description="steps in the window at or above the threshold")
    max_length: int = Field(default=256, description="tokens per example (longer ones are truncated)")
    seed: int = Field(default=0, description="data order and dropout seed")
    log_every: int = Field(default=25, description="log step, loss, accuracy and time left every this many steps",
                           json_schema_extra=PERFORMANCE_ONLY)
    checkpoint_every: int = Field(default=25, description="save a trainer checkpoint every this many steps, so "
                                  "a killed run resumes from it when materialized again (0: never)",
                                  json_schema_extra=PERFORMANCE_ONLY)
    threads: int = Field(default=0, description=THREADS_DESCRIPTION)
    launcher: str = Field(default="inprocess", description="where SFT runs: 'inprocess' (this process), or "
                          "'torchrun:N' / 'accelerate:N' (N processes on this machine, through Dagster Pipes; "
                          "batch_size is the global batch, split over them)", json_schema_extra=PERFORMANCE_ONLY)

    def run_config(self, learning_rate: float, offline: bool = True, device: Any = "cpu",
                   dtype: Any = "fp32") -> Any:
        """The SFT run config with every 0/auto field filled from this model's defaults."""
        from carl_assets.carl.training import SFTRunConfig
        from carl_assets.models.defaults import resolve_threads, training_defaults

        defaults = training_defaults(offline).sft
        return SFTRunConfig(max_steps=self.max_steps or defaults.max_steps, learning_rate=learning_rate,
                            batch_size=self.batch_size or defaults.batch_size,
                            gate_threshold=self.gate_threshold, gate_window=self.gate_window,
                            gate_min_above=self.gate_min_above, max_length=self.max_length, seed=self.seed,
                            threads=resolve_threads(self.threads, offline), optim=self.optim,
                            **self.lora_values(), **self.shared_run_values(defaults, device, dtype))


class CrystallizationConfig(dg.Config):
    require_crystallization: bool = Field(default=True, description="hold GRPO back (the sft_crystallized check "
                                          "fails as an error) when SFT did not crystallize; False lets GRPO run "
                                          "anyway, the check then only warns")


class GRPOCheckpointConfig(TrainingRunConfig):
    max_steps: int = Field(default=0, description="GRPO steps (0: 16 for the offline model, 300 for a real one)")
    learning_rate: float = Field(default=0.0, description="AdamW learning rate (0: 1e-4 for the offline model, "
                                 "1e-6 for a real one)")
    batch_size: int = Field(default=0, description="completions per device step; batch_size x "
                            "gradient_accumulation_steps x processes must be a multiple of num_generations, TRL's "
                            "rule (0: 8, or the next multiple of num_generations)")
    num_generations: int = Field(default=0, description="completions per prompt, the GRPO group (0: 4 for the "
                                 "offline model, 8 for a real one)")
    max_completion_length: int = Field(default=0, description="tokens per completion (0: 24 for the offline "
                                       "model, 256 for a real one)")
    temperature: float | None = Field(default=None, description="sampling temperature (None: the model's default, "
                                      "1.0 for the offline model, 0.8 for a real one)")
    top_p: float | None = Field(default=None, description="nucleus truncation (1.0: off; None: the model's default, "
                                "off for the offline model, 0.9 for a real one)")
    top_k: int | None = Field(default=None, description="keep the k likeliest tokens (0: off; None: the model's "
                              "default, off for both)")
    min_p: float | None = Field(default=None, description="drop tokens below min_p x the likeliest one's "
                                "probability (0.0: off; None: the model's default, off offline, 0.05 for a real "
                                "model)")
    reward: str = Field(default="auto", description="the GRPO reward, by name: 'carl' (the seed's composite), a "
                        "CARL component or a confidence score (carl_assets.carl.reward_fn.REWARD_NAMES); 'auto': "
                        "the model's, chosen by scorer_validation (carl for the offline model, self_certainty "
                        "for a real one: models.defaults.scorer_defaults)")
    max_prompts: int = Field(default=0, description="use at most this many SFT prompts (0: all)")
    max_frac_reward_zero_std: float = Field(default=0.5, description="the grpo_reward_spread check fails (and "
                                            "holds the evaluation back) when on average this share of groups "
                                            "or more had no reward spread")
    seed: int = Field(default=0, description="sampling and data order seed")
    log_every: int = Field(default=4, description="log step, reward and time left every this many steps",
                           json_schema_extra=PERFORMANCE_ONLY)
    checkpoint_every: int = Field(default=25, description="save a trainer checkpoint every this many steps, so "
                                  "a killed run resumes from it when materialized again (0: never)",
                                  json_schema_extra=PERFORMANCE_ONLY)
    threads: int = Field(default=0, description=THREADS_DESCRIPTION)

    def run_config(self, offline: bool = True, device: Any = "cpu", dtype: Any = "fp32") -> Any:
        """The GRPO run config with every 0/auto field filled from this model's defaults."""
        from carl_assets.carl.training import GRPORunConfig
        from carl_assets.models.defaults import (
            grpo_sampling_defaults,
            resolve_threads,
            training_defaults,
        )

        defaults = training_defaults(offline).grpo
        sampling = grpo_sampling_defaults(offline)
        generations = self.num_generations or defaults.num_generations
        # The default batch holds whole groups: the default size rounded up to a multiple of the group.
        batch = self.batch_size or -(-max(defaults.batch_size, generations) // generations) * generations
        return GRPORunConfig(max_steps=self.max_steps or defaults.max_steps,
                             learning_rate=self.learning_rate or defaults.learning_rate, batch_size=batch,
                             num_generations=generations,
                             max_completion_length=self.max_completion_length or defaults.max_completion_length,
                             temperature=_or(self.temperature, sampling.temperature),
                             top_p=_or(self.top_p, sampling.top_p), top_k=_or(self.top_k, sampling.top_k),
                             min_p=_or(self.min_p, sampling.min_p), reward=_reward_name(self.reward, offline),
                             max_prompts=self.max_prompts or None, seed=self.seed, beta=0.0,
                             threads=resolve_threads(self.threads, offline), **self.lora_values(),
                             **self.shared_run_values(defaults, device, dtype))


def _reward_name(reward: str, offline: bool) -> str:
    """The GRPO reward's name: as set, or the model's default for 'auto' / ''."""
    from carl_assets.models.defaults import scorer_defaults

    name = reward.strip().lower()
    return scorer_defaults(offline).grpo_reward if name in ("", "auto") else name


def _or(value: Any, default: Any) -> Any:
    """`value` unless it is None (then the model's default)."""
    return default if value is None else value


class AgentEvaluationConfig(dg.Config):
    gate_threshold: float = Field(default=SIGMA, description="abstain when phi mean is below this (sigma = 3/16)")
    max_new_tokens: int = Field(default=32, description="tokens generated per task")
    max_tasks: int = Field(default=0, description="evaluate at most this many held-out tasks (0: all)")
    threads: int = Field(default=0, description=THREADS_DESCRIPTION)
    device: str = Field(default="auto", description=DEVICE_DESCRIPTION)
    dtype: str = Field(default="auto", description=DTYPE_DESCRIPTION)
    temperature: float | None = Field(default=None, description="answer sampling temperature, 0: greedy (None: "
                                      "the model's default, greedy for the offline model as in the seed, 0.7 "
                                      "for a real one)")
    top_p: float | None = Field(default=None, description="nucleus truncation (1.0: off; None: the model's "
                                "default, off offline, 0.9 for a real one)")
    top_k: int | None = Field(default=None, description="keep the k likeliest tokens (0: off; None: off)")
    min_p: float | None = Field(default=None, description="drop tokens below min_p x the likeliest one's "
                                "probability (0.0: off; None: off)")
    seed: int = Field(default=0, description="sampling seed (task i samples with seed + i)")

    def sampling(self, offline: bool) -> Any:
        """The agent's `AgentSampling`: each field as set, else the model's default."""
        from carl_assets.carl.agent import AgentSampling
        from carl_assets.models.defaults import agent_sampling_defaults

        d = agent_sampling_defaults(offline)
        return AgentSampling(temperature=_or(self.temperature, d.temperature), top_p=_or(self.top_p, d.top_p),
                             top_k=_or(self.top_k, d.top_k), min_p=_or(self.min_p, d.min_p), seed=self.seed)
