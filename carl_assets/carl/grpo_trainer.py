"""GRPO on a reward of the policy itself (TRL's `GRPOTrainer`), on CPU or an accelerator.

`train_grpo` runs with the CARL composite reward of the policy (`carl_assets.carl.make_carl_reward_fn`;
any reward of `reward_fn.REWARD_NAMES` by name) and ``beta=0`` by default (no reference model, as in the
reference). It returns the per-step reward curve and the reward components TRL logged through
``log_metric``, and the per-completion rewards the reward function computed. Its batch follows TRL's rule
(`carl_assets.carl.trl_config`), its sampling takes top-p, top-k and min-p. It trains the model in place
(or LoRA adapters, merged before saving) and saves it with `grpo_log.json` to ``output_dir`` when given.
No Dagster import here.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import concatenate_datasets
from transformers import TrainerCallback

from carl_assets.carl.reward_fn import make_reward_fn
from carl_assets.carl.run_config import GRPORunConfig
from carl_assets.carl.trainer_checkpoints import (
    CHECKPOINT_PREFIX,
    DEFAULT_SAVE_STEPS,
    GRPO_COMPLETIONS_FILE,
    TrainerCheckpoint,
    checkpoint_args,
    prepare_resume,
    train_or_load,
)
from carl_assets.carl.trainer_common import (
    merged,
    no_printing,
    peft_config,
    quiet_trl,
    save_model,
    write_run_log,
)
from carl_assets.carl.trl_config import prompts_per_step, trl_config
from carl_assets.runtime import torch_threads

CARL_COMPONENTS = ("multiscale", "cloud_quality", "discontinuity", "phi_mean")
GRPO_LOG_FILE = "grpo_log.json"


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
        return {
            **asdict(self),
            "reward_std": self.reward_std,
            "mean_step_reward_std": self.mean_step_reward_std,
        }


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
    score = make_reward_fn(config.reward, model, tokenizer)

    def reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        rewards = score(prompts, completions, **kwargs)
        state = kwargs.get("trainer_state")
        step = int(getattr(state, "global_step", 0)) + 1  # the optimizer step these completions feed
        for i, (completion, value) in enumerate(zip(completions, rewards, strict=True)):
            comps = score.last_components[i] if i < len(score.last_components) else None
            text = (
                completion[-1]["content"] if isinstance(completion, list) and completion else str(completion)
            )
            scored.append(
                {
                    "step": step,
                    "index": i,
                    "group": i // config.num_generations,
                    "completion": text,
                    "reward": float(value),
                    **{k: (None if comps is None else float(comps[k])) for k in CARL_COMPONENTS},
                }
            )
        return rewards

    reward.__name__ = score.__name__  # TRL's columns: rewards/<name>/mean
    return reward


def _completions_saver(scored: list[dict[str, Any]]) -> Any:
    """A callback that writes the completions scored so far into each checkpoint as it is saved (they
    are not part of the Trainer's state)."""

    class _CompletionsSaver(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            if folder.is_dir():
                rows = [c for c in scored if int(c["step"]) <= int(state.global_step)]
                tmp = folder / f".{GRPO_COMPLETIONS_FILE}.tmp"
                tmp.write_text(json.dumps(rows, default=str))
                os.replace(
                    tmp, folder / GRPO_COMPLETIONS_FILE
                )  # the checkpoint counts only once this is whole

    return _CompletionsSaver()


def train_grpo(
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    output_dir: str | os.PathLike[str] | None,
    config: GRPORunConfig | None = None,
    extra_callbacks: list[Any] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    save_steps: int = DEFAULT_SAVE_STEPS,
) -> GRPOOutcome:
    """TRL GRPO with a reward of the policy itself (``config.reward``: the CARL composite for the offline
    model, or any name in `carl_assets.carl.reward_fn.REWARD_NAMES`).

    ``config`` fields left None take the offline model's defaults (`GRPORunConfig.resolved(offline=True)`);
    resolve it with ``offline=False`` first for a real model. Any batch TRL accepts trains: ``batch_size x
    gradient_accumulation_steps x processes`` a multiple of ``num_generations``
    (`carl_assets.carl.trl_config.generation_batch_size`; ValueError with TRL's rule otherwise). Sampling:
    ``temperature``, ``top_p``, ``top_k``, ``min_p``. With ``lora_r > 0`` only LoRA adapters train and are
    merged into the saved weights. ``train_dataset`` needs a "prompt" column (plain text or chat
    messages), or "messages" (the prompt is everything before the final assistant turn). Returns the
    per-step log (reward, reward_std, ``carl/<component>`` means, loss, ...) and every scored completion's
    reward and components. Saves the model, tokenizer and `grpo_log.json` to ``output_dir`` if given.

    ``checkpoint_dir`` and ``save_steps``: as in `train_sft` (full trainer checkpoints, resume from the
    newest complete one); each checkpoint also holds the completions scored up to its step, so a
    resumed run's outcome still lists every completion of the run.
    """
    config = (config or GRPORunConfig()).resolved(offline=True)
    dataset = _prompts(train_dataset, config)
    scored: list[dict[str, Any]] = []
    reward_fn = _recording_reward(model, tokenizer, config, scored)
    saving = bool(checkpoint_args(checkpoint_dir, save_steps))
    resume = prepare_resume(checkpoint_dir, require=(GRPO_COMPLETIONS_FILE,))
    if resume is not None:
        done = json.loads((resume.path / GRPO_COMPLETIONS_FILE).read_text())
        scored.extend(c for c in done if int(c["step"]) <= resume.step)
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="carl-grpo-") as scratch,
        torch_threads(config.threads),
        quiet_trl(),
    ):
        args = trl_config(
            config,
            checkpoint_dir if checkpoint_dir is not None else scratch,
            checkpointing=checkpoint_args(checkpoint_dir, save_steps),
        )
        callbacks = [*([_completions_saver(scored)] if saving else []), *(extra_callbacks or [])]
        steps, history, model = _run(model, tokenizer, dataset, config, args, reward_fn, callbacks, resume)
    model.eval()
    outcome = GRPOOutcome(
        steps=steps,
        seconds=time.perf_counter() - started,
        log_history=history,
        completions=scored,
        resumed_from_step=0 if resume is None else resume.step,
    )
    outcome.output_dir = save_model(model, tokenizer, output_dir)
    write_run_log(output_dir, GRPO_LOG_FILE, outcome.to_dict(), config)
    return outcome


def _prompts(train_dataset: Any, config: GRPORunConfig) -> Any:
    """The prompts GRPO samples from, repeated when fewer than one optimizer step takes: TRL's sampler
    drops an incomplete generation batch, so it would train nothing (each group still samples its own
    completions). Raises ValueError for a dataset without prompts or a batch TRL refuses."""
    needed = prompts_per_step(config.batch_size, config.gradient_accumulation_steps, config.num_generations)
    dataset = _prompt_only(train_dataset, config.max_prompts, config.seed)
    if len(dataset) == 0:
        raise ValueError("the GRPO dataset has no prompts")
    if len(dataset) < needed:
        dataset = concatenate_datasets([dataset] * -(-needed // len(dataset)))
    return dataset


def _run(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    config: GRPORunConfig,
    args: Any,
    reward_fn: Any,
    callbacks: list[Any],
    resume: TrainerCheckpoint | None,
) -> tuple[int, list[dict[str, Any]], Any]:
    """Train (or finish from `resume`): (steps run, the per-step log, the trained model, adapters merged)."""
    from trl import GRPOTrainer  # ~15 s to import: see carl_assets.carl.trainer_common

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward_fn],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config(model, config),
    )
    no_printing(trainer)
    finished = resume is not None and resume.step >= config.max_steps
    steps, history = train_or_load(trainer, resume, finished=finished)
    return steps, history, merged(trainer, model)
