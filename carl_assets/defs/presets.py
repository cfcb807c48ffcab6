"""Run-config presets: named budgets for the whole graph, as Dagster run config.

- `offline`: today's defaults (the ~1M-parameter model built here; every asset's own defaults), so the
  preset is empty.
- `real`: the packaged SmolLM2-135M-Instruct (`base_model.model: smollm2-135m-instruct`) with budgets
  small enough that every asset of `carl_all`, LeWorld included, finishes within 15 minutes on a 2-core
  CPU (measured per asset: README "On a real model"). Only the values that differ from the assets'
  defaults are listed; the rest (threads, dtype, sampling for a real model) follow each asset's
  per-model defaults.

A preset is the `config=` of a job (`carl_all_real`, `retraining_real`: the launchpad opens pre-filled,
every value editable, as dagster-nanochat's price tiers are one job each) and `carl materialize --preset`.
Nothing here is private Dagster API: presets are plain run-config dicts.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

REAL_MODEL = "smollm2-135m-instruct"

OFFLINE: dict[str, Any] = {"ops": {}}

# Budgets per asset for SmolLM2-135M on 2 CPU cores; the seconds each took are in the README's table.
REAL: dict[str, Any] = {
    "ops": {
        "base_model": {"config": {"model": REAL_MODEL}},
        # A 30-layer forward per unique text is steering's cost: 16 pairs per polarity (steering needs 10),
        # the 8 emotions with most pairs, texts cut to 128 tokens.
        "emotion_training_pairs": {"config": {"max_examples_per_emotion": 16}},
        "steering_vectors": {"config": {"max_length": 128, "top_n_emotions": 8, "max_heldout_per_polarity": 8,
                                        "batch_size": 16}},
        # Measured 304 CPU-s at 12 prompts x 32 tokens (busy box): 8 x 24 is about half.
        "scorer_validation": {"config": {"n_prompts": 8, "max_tokens": 24, "n_bootstrap": 500}},
        "dream_scenarios": {"config": {"n_scenarios": 12, "responses_per_scenario": 4, "max_new_tokens": 40,
                                       "heldout_scenarios": 4, "batch_size": 4}},
        "sft_dataset": {"config": {"grpo_prompts": 4}},
        # max_length is a ceiling (batches pad to their longest example), set above the longest dream prompt.
        # LoRA r16: ~1.7x faster a step than a full fine-tune here (helper F, fp32, 2 threads); a 135M
        # model's activations fit in memory, so no gradient checkpointing (it recomputes the forward).
        # Dream rows are ~300-400 tokens: 8 steps of 2 rows.
        "sft_checkpoint": {"config": {"max_steps": 8, "batch_size": 2, "gradient_accumulation_steps": 1,
                                      "lora_r": 16, "gradient_checkpointing": False, "max_length": 768,
                                      "log_every": 2, "checkpoint_every": 0}},
        # A dozen steps cannot reach the gate's 0.99 token accuracy on a real model's varied answers: the
        # sft_crystallized check then warns instead of holding GRPO back.
        "crystallization_events": {"config": {"require_crystallization": False}},
        "grpo_checkpoint": {"config": {"max_steps": 3, "batch_size": 4, "num_generations": 4,
                                       "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
                                       "lora_r": 16, "max_completion_length": 24,
                                       "max_prompts": 4, "log_every": 1, "checkpoint_every": 0}},
        "agent_evaluation": {"config": {"max_tasks": 6, "max_new_tokens": 32}},
        # LeWorld does not use the language model; one seed instead of three keeps it a small share.
        "leworld_model": {"config": {"seeds": 1}},
    }
}

PRESETS: dict[str, dict[str, Any]] = {"offline": OFFLINE, "real": REAL}


def preset_names() -> list[str]:
    """The presets `carl materialize --preset` accepts."""
    return sorted(PRESETS)


def preset_run_config(name: str, assets: Iterable[str] | None = None) -> dict[str, Any]:
    """A deep copy of preset `name`'s run config ({"ops": {asset: {"config": {...}}}}), restricted to the
    ops of `assets` when given (a job's run config may not name ops outside its selection).

    Raises KeyError naming the known presets for an unknown `name`.
    """
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    config = copy.deepcopy(PRESETS[name])
    if assets is not None:
        keep = set(assets)
        config["ops"] = {op: value for op, value in config.get("ops", {}).items() if op in keep}
    return config


def merge_run_config(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `override` laid over it, mapping by mapping (a value in `override` wins; lists and
    scalars are replaced, not merged). Neither input is modified."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_run_config(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# The run tag a preset job carries (`carl_all_real`, `retraining_real`): the assets read it to refuse a
# combination the preset was not made for.
PRESET_TAG = "carl/preset"


def check_preset_model(run_tags: Mapping[str, str], base_is_offline: bool) -> None:
    """Refuse a run of the `real` preset on the offline base model: `retraining_real` does not rebuild
    base_model, so on a home where base_model is the ~1M-parameter offline model it would train that model
    with budgets sized for SmolLM2-135M and make it the newest policy.

    Raises ValueError naming what to run instead."""
    if run_tags.get(PRESET_TAG) == "real" and base_is_offline:
        raise ValueError(
            f"this run uses the `real` preset, made for {REAL_MODEL}, but the current base_model is the "
            "offline model. Materialize the real base model first (`carl materialize --job carl_all_real`, "
            f"or base_model.model: {REAL_MODEL}), or run the offline job `retraining` instead."
        )
