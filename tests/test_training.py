"""SFT until crystallization, GRPO on the CARL reward, SFT data from the memory graph, dataset loading."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset

from carl_assets.carl.sft_data import (
    SFTDataConfig,
    build_sft_examples,
    chat_prompt,
    feelings_answer,
    is_chat_formatted,
    sft_examples_from_records,
    to_hf_dataset,
)
from carl_assets.carl.training import (
    GRPO_LOG_FILE,
    TRAINING_LOG_FILE,
    GRPORunConfig,
    SFTRunConfig,
    load_training_dataset,
    train_grpo,
    train_sft,
)
from carl_assets.carl.trl_config import generation_batch_size, prompts_per_step, sampling_kwargs, trl_config
from carl_assets.models.defaults import OFFLINE_DEFAULTS, REAL_MODEL_DEFAULTS, model_defaults


def _constant_answer_dataset(n: int = 8) -> Dataset:
    """Prompts that differ, one fixed short answer: a tiny model learns it in a few dozen steps."""
    return Dataset.from_dict(
        {
            "prompt": [
                chat_prompt(f"Memory number {i} about the garden.", "Is this a memory?") for i in range(n)
            ],
            "completion": [[{"role": "assistant", "content": "Yes."}] for _ in range(n)],
        }
    )


@pytest.fixture()
def fresh_tiny(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    return copy.deepcopy(model), tokenizer


def test_sft_crystallizes_and_stops_before_max_steps(fresh_tiny, tmp_path):
    model, tokenizer = fresh_tiny
    config = SFTRunConfig(max_steps=150, learning_rate=1e-2, batch_size=4, seed=0)
    outcome = train_sft(model, tokenizer, _constant_answer_dataset(), tmp_path / "sft", config)

    assert outcome.triggered and outcome.crystallized
    assert 3 <= outcome.trigger_step < config.max_steps
    assert outcome.steps == outcome.trigger_step  # stopped right at the gate
    assert sum(v >= 0.99 for v in outcome.window_values) >= 3
    assert len(outcome.window_values) <= 5
    # logging_steps=1: one accuracy per optimizer step, 1..steps
    steps, acc = outcome.accuracy_curve()
    assert steps == list(range(1, outcome.steps + 1))
    assert all(0.0 <= a <= 1.0 for a in acc)
    assert acc[0] < 0.99  # it really learned: the untrained model is not already right
    assert outcome.peak_entropy > 0 and 1 <= outcome.peak_entropy_step <= outcome.steps
    # saved: weights (safetensors), tokenizer and the log
    out = tmp_path / "sft"
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    log = json.loads((out / TRAINING_LOG_FILE).read_text())
    assert log["trigger_step"] == outcome.trigger_step and log["crystallized"] is True
    assert len(log["log_history"]) == outcome.steps


def test_sft_without_crystallization_runs_to_max_steps(fresh_tiny):
    model, tokenizer = fresh_tiny
    config = SFTRunConfig(max_steps=4, learning_rate=1e-3, batch_size=4, gate_threshold=1.01)
    outcome = train_sft(model, tokenizer, _constant_answer_dataset(), None, config)
    assert not outcome.triggered and not outcome.crystallized
    assert outcome.trigger_step == -1 and outcome.window_values == []
    assert outcome.steps == 4
    assert [r["step"] for r in outcome.log_history] == [1, 2, 3, 4]
    assert all("mean_token_accuracy" in r and "entropy" in r for r in outcome.log_history)
    assert outcome.output_dir is None


def test_sft_rejects_empty_dataset(fresh_tiny):
    model, tokenizer = fresh_tiny
    with pytest.raises(ValueError, match="empty"):
        train_sft(model, tokenizer, _constant_answer_dataset().select([]), None, SFTRunConfig(max_steps=1))


def test_sft_refuses_prompts_longer_than_max_length_naming_the_setting(fresh_tiny):
    """Every prompt at least max_length tokens leaves nothing to train (case real-08: a 4-node graph's
    offline tokenizer splits prompts into many tokens): the error names the setting to change."""
    model, tokenizer = fresh_tiny
    with pytest.raises(ValueError, match=r"sft_checkpoint\.max_length") as raised:
        config = SFTRunConfig(max_steps=1, max_length=4)
        train_sft(model, tokenizer, _constant_answer_dataset(2), None, config)
    assert "at least max_length=4 tokens" in str(raised.value)


def test_grpo_with_the_carl_reward(fresh_tiny, tmp_path):
    model, tokenizer = fresh_tiny
    dataset = _constant_answer_dataset(4)
    config = GRPORunConfig(max_steps=2, batch_size=4, num_generations=2, max_completion_length=8, seed=0)
    outcome = train_grpo(model, tokenizer, dataset, tmp_path / "grpo", config)

    assert outcome.steps == 2
    assert len(outcome.completions) == 2 * config.batch_size
    rewards = np.array([c["reward"] for c in outcome.completions])
    assert np.isfinite(rewards).all() and (rewards >= 0).all() and (rewards <= 1).all()
    # TRL's logged step reward is the mean of the rewards our function returned for that step
    for record in outcome.log_history:
        step_rewards = [c["reward"] for c in outcome.completions if c["step"] == record["step"]]
        assert len(step_rewards) == config.batch_size
        assert record["reward"] == pytest.approx(float(np.mean(step_rewards)), abs=1e-5)
        assert 0.0 <= record["carl/phi_mean"] <= 1.0  # components logged through log_metric
        assert math.isfinite(record["carl/multiscale"])
    scored = [c for c in outcome.completions if c["phi_mean"] is not None]
    assert scored, "no completion was scored"
    assert outcome.reward_std == pytest.approx(float(np.std(rewards)))
    assert (tmp_path / "grpo" / "model.safetensors").exists()
    assert json.loads((tmp_path / "grpo" / GRPO_LOG_FILE).read_text())["steps"] == 2


def test_grpo_config_validation(fresh_tiny):
    model, tokenizer = fresh_tiny
    with pytest.raises(ValueError, match="multiple of num_generations"):
        train_grpo(
            model,
            tokenizer,
            _constant_answer_dataset(4),
            None,
            GRPORunConfig(batch_size=6, num_generations=4),
        )
    with pytest.raises(ValueError, match="'prompt'"):
        train_grpo(model, tokenizer, Dataset.from_dict({"text": ["a", "b"]}), None, GRPORunConfig())


CASE_12_PROMPTS = [
    "Write one calm sentence about the lake.",
    "Write one warm sentence about a friend.",
    "Write one sentence about rain.",
    "Write one sentence about a long walk.",
]


def test_generation_batch_follows_trls_rule():
    assert (
        generation_batch_size(1, 8, 8, processes=1) == 8
    )  # case 12: one prompt's group over 8 micro-batches
    assert generation_batch_size(2, 1, 4, processes=2) == 4  # two processes fill one group
    assert generation_batch_size(8, 4, 8, processes=1) == 32
    assert prompts_per_step(4, 2, 2, processes=1) == 4
    with pytest.raises(
        ValueError,
        match=r"6 x gradient_accumulation_steps 1 x processes 1 = 6 .*TRL requires.*"
        r"E\.g\. gradient_accumulation_steps 2",
    ):
        generation_batch_size(6, 1, 4, processes=1)
    with pytest.raises(ValueError, match=r"= 6 completions.*gradient_accumulation_steps 8"):
        generation_batch_size(1, 6, 4, processes=1)  # accumulation: the next multiple of 4
    with pytest.raises(ValueError, match="num_generations >= 2"):
        generation_batch_size(8, 1, 1, processes=1)
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be at least 1"):
        generation_batch_size(8, 0, 2, processes=1)


def test_sampling_kwargs_map_off_values_to_trls():
    assert sampling_kwargs(1.0) == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": None}
    assert sampling_kwargs(0.8, 0.9, 20, 0.05) == {
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
    }
    for bad, match in (
        ((0.0,), "temperature must be > 0"),
        ((1.0, 0.0), "top_p must lie"),
        ((1.0, 1.0, -1), "top_k must be >= 0"),
        ((1.0, 1.0, 0, 1.0), "min_p must lie"),
    ):
        with pytest.raises(ValueError, match=match):
            sampling_kwargs(*bad)


@pytest.fixture()
def gpt2_like(tmp_path):
    """Case 09/12's model: a GPT-2-like base model (no pad token, no chat template), loaded as the project
    loads it (pads with eos)."""
    from carl_assets.models.loading import load_model_and_tokenizer
    from tests.data.gpt2_like import save_gpt2_like

    save_gpt2_like(tmp_path / "gpt2_like")
    return load_model_and_tokenizer(tmp_path / "gpt2_like")


def test_grpo_trains_batch_1_x_accumulation_8_x_8_generations(gpt2_like):
    """Case 12: TRL trains this (generation batch 8 = one prompt's group); it used to be refused."""
    model, tokenizer = gpt2_like
    config = GRPORunConfig(
        max_steps=1,
        batch_size=1,
        gradient_accumulation_steps=8,
        num_generations=8,
        max_completion_length=4,
        seed=0,
    )
    outcome = train_grpo(model, tokenizer, Dataset.from_dict({"prompt": CASE_12_PROMPTS}), None, config)
    assert outcome.steps == 1
    assert len(outcome.completions) == 8  # one generation batch: 8 completions of one prompt
    assert {c["group"] for c in outcome.completions} == {0}
    assert outcome.log_history[0]["reward"] == pytest.approx(
        np.mean([c["reward"] for c in outcome.completions]), abs=1e-5
    )


def test_grpo_refuses_what_trl_refuses_with_its_rule(gpt2_like):
    model, tokenizer = gpt2_like
    dataset = Dataset.from_dict({"prompt": CASE_12_PROMPTS})
    with pytest.raises(
        ValueError, match=r"batch_size 6 x .* not a multiple of num_generations 4.*TRL requires"
    ):
        train_grpo(model, tokenizer, dataset, None, GRPORunConfig(batch_size=6, num_generations=4))
    with pytest.raises(ValueError, match=r"num_generations\n.*greater than or equal to 2"):  # before training
        train_grpo(model, tokenizer, dataset, None, GRPORunConfig(batch_size=8, num_generations=1))


def test_grpo_pads_fewer_prompts_than_one_generation_batch(fresh_tiny):
    """1 prompt, 2 x accumulation 2 with groups of 2: a step takes 2 prompts, so the one prompt is repeated
    (TRL's sampler would otherwise drop the incomplete batch and train nothing)."""
    model, tokenizer = fresh_tiny
    config = GRPORunConfig(
        max_steps=1,
        batch_size=2,
        gradient_accumulation_steps=2,
        num_generations=2,
        max_completion_length=4,
        top_p=0.9,
        min_p=0.05,
        seed=0,
    )
    outcome = train_grpo(model, tokenizer, _constant_answer_dataset(1), None, config)
    assert outcome.steps == 1 and len(outcome.completions) == 4
    assert {c["group"] for c in outcome.completions} == {0, 1}


def test_grpo_reward_by_name(fresh_tiny):
    model, tokenizer = fresh_tiny
    config = GRPORunConfig(
        max_steps=1, batch_size=4, num_generations=2, max_completion_length=6, reward="self_certainty", seed=0
    )
    outcome = train_grpo(model, tokenizer, _constant_answer_dataset(2), None, config)
    assert "rewards/self_certainty/mean" in outcome.log_history[0]
    with pytest.raises(
        ValueError, match=r"reward\n.*Input should be 'carl'"
    ):  # a choice: refused on creation
        train_grpo(model, tokenizer, _constant_answer_dataset(2), None, GRPORunConfig(reward="nonsense"))


def _nodes() -> pd.DataFrame:
    rows = []
    for i in range(30):
        tags = {"warmth": (i % 10) + 1, "joy": 5, "calm": (3 * i) % 11} if i % 7 else {}
        rows.append(
            {
                "node_id": f"n{i:02d}",
                "kind": ["journal", "lesson"][i % 2],
                "text": f"Entry {i}. A walk by the river and a long talk, with words enough to cut here.",
                "tags_json": json.dumps(tags),
                "n_tags": len(tags),
                "source_line": i + 1,
            }
        )
    return pd.DataFrame(rows)


def test_feelings_answer_ranks_by_score_then_name():
    assert feelings_answer({"joy": 5, "warmth": 9, "calm": 9}) == "Mostly calm, then warmth."
    assert feelings_answer({"awe": 3}) == "Only awe."
    assert feelings_answer({}) is None


def test_sft_examples_from_the_memory_graph():
    nodes = _nodes()
    config = SFTDataConfig(
        max_examples=10, holdout_tasks=5, tasks=("feelings", "kind"), excerpt_chars=40, seed=1
    )
    examples, tasks = build_sft_examples(nodes, config)
    again, _ = build_sft_examples(nodes, config)
    pd.testing.assert_frame_equal(examples, again)  # deterministic
    assert len(examples) == 10 and len(tasks) == 5
    assert set(examples["node_id"]).isdisjoint(tasks["node_id"])  # held out
    assert set(examples["task"]) <= {"feelings", "kind"}
    ok, reason = is_chat_formatted(examples)
    assert ok, reason
    by_node = nodes.set_index("node_id")
    for row in examples.itertuples():
        node = by_node.loc[row.node_id]
        if row.task == "feelings":
            assert row.assistant == feelings_answer(json.loads(node.tags_json))
        else:
            assert row.assistant in {"A journal entry.", "A lesson I learned."}
        assert len(row.user.split("\n\nInstruction: ")[0]) <= 40 + 4  # excerpt + " ..."
    untagged = {f"n{i:02d}" for i in range(0, 30, 7)}
    assert not untagged & set(examples.loc[examples.task == "feelings", "node_id"])
    dataset = to_hf_dataset(examples)
    assert dataset[0]["prompt"][-1]["role"] == "user" and dataset[0]["completion"][0]["role"] == "assistant"


def test_sft_examples_from_other_records_and_bad_config():
    frame = sft_examples_from_records([{"observation": "o", "instruction": "i", "expected": "e"}])
    assert frame.loc[0, "assistant"] == "e" and is_chat_formatted(frame)[0]
    with pytest.raises(ValueError, match="lacks"):
        sft_examples_from_records([{"observation": "o"}])
    with pytest.raises(ValueError, match="unknown SFT task"):
        build_sft_examples(_nodes(), SFTDataConfig(tasks=("poetry",)))
    assert not is_chat_formatted(frame.iloc[:0])[0]


def test_load_training_dataset_from_files_and_folders(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "data.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    folder = tmp_path / "saved"
    Dataset.from_list(rows).save_to_disk(str(folder))
    for spec in (jsonl, parquet, folder):
        loaded = load_training_dataset(str(spec))
        assert loaded.column_names == ["prompt", "completion"] and loaded["completion"] == ["b", "d"]
    with pytest.raises(FileNotFoundError):
        load_training_dataset(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "data.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match="unsupported"):
        load_training_dataset(str(bad))


@pytest.mark.slow
def test_apollo_optimizer_trains(tiny_model_and_tokenizer):
    """`optim: apollo_adamw` (the reference's APOLLO, on CPU through bitsandbytes) takes steps that lower the
    loss."""
    pytest.importorskip("apollo_torch")
    import copy

    from datasets import Dataset

    from carl_assets.carl.training import SFTRunConfig, train_sft

    model, tokenizer = tiny_model_and_tokenizer
    data = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": "How was the day?"}]] * 8,
            "completion": [[{"role": "assistant", "content": "Warm and clear."}]] * 8,
        }
    )
    outcome = train_sft(
        copy.deepcopy(model),
        tokenizer,
        data,
        None,
        SFTRunConfig(max_steps=12, batch_size=4, learning_rate=1e-2, optim="apollo_adamw"),
    )
    losses = [r["loss"] for r in outcome.log_history if r.get("loss") is not None]
    assert outcome.steps == 12 and losses[-1] < losses[0]


def test_none_means_the_models_default_from_the_one_table():
    """Every None field of a run config is filled from models.defaults, for the offline model or a real one;
    a field that is set stays, and resolving twice changes nothing."""
    for offline, table in ((True, OFFLINE_DEFAULTS), (False, REAL_MODEL_DEFAULTS)):
        sft = SFTRunConfig(device="cpu").resolved(offline)
        assert (
            sft.max_steps,
            sft.learning_rate,
            sft.lr_scheduler_type,
            sft.warmup_ratio,
            sft.batch_size,
            sft.gradient_accumulation_steps,
            sft.gradient_checkpointing,
        ) == (
            table.sft.max_steps,
            table.sft.learning_rate,
            table.sft.lr_scheduler_type,
            table.sft.warmup_ratio,
            table.sft.batch_size,
            table.sft.gradient_accumulation_steps,
            table.sft.gradient_checkpointing,
        )
        assert sft.resolved(offline) == sft
    # The drift the issue found: the library's GRPO default (8 steps) disagreed with the offline table (16).
    assert GRPORunConfig().resolved(offline=True).max_steps == 16 == model_defaults("grpo", True)["max_steps"]
    mine = GRPORunConfig(max_steps=3, temperature=1.5, num_generations=3).resolved(offline=False)
    assert (mine.max_steps, mine.temperature, mine.num_generations, mine.batch_size) == (3, 1.5, 3, 9)
    assert (mine.reward, mine.top_p, mine.min_p) == ("self_certainty", 0.9, 0.05)  # the real model's
    assert SFTRunConfig(threads=3).resolved(offline=True).threads == 3
    assert SFTRunConfig().resolved(offline=True).threads == 1
    with pytest.raises(KeyError, match="no model defaults for 'dpo'"):
        model_defaults("dpo", True)


def test_run_configs_refuse_bad_values_when_made():
    for bad in (
        {"optim": "adamw"},
        {"lr_scheduler_type": "cosine_annealing"},
        {"dtype": "int8"},
        {"device": "gpu"},
        {"warmup_ratio": 1.0},
        {"max_steps": 0},
        {"lora_dropout": 1.0},
        {"max_length_typo": 3},
    ):
        with pytest.raises(ValueError):
            SFTRunConfig(**bad)
    for bad in ({"reward": "nonsense"}, {"top_p": 0.0}, {"num_generations": 1}, {"max_prompts": 0}):
        with pytest.raises(ValueError):
            GRPORunConfig(**bad)


def test_trl_config_carries_each_run_setting(tmp_path):
    """One mapping onto TRL's configs: each set value arrives under TRL's name."""
    sft = SFTRunConfig(
        device="cpu",
        max_steps=7,
        learning_rate=3e-4,
        lr_scheduler_type="cosine",
        warmup_ratio=0.25,
        batch_size=3,
        gradient_accumulation_steps=2,
        weight_decay=0.01,
        seed=5,
        max_length=96,
        optim="adafactor",
        completion_only_loss=True,
    ).resolved(offline=True)
    args = trl_config(sft, tmp_path, max_length=64)
    assert (args.max_steps, args.learning_rate, args.lr_scheduler_type, args.warmup_steps) == (
        7,
        3e-4,
        "cosine",
        0.25,
    )
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.weight_decay) == (
        3,
        2,
        0.01,
    )
    assert (args.seed, args.data_seed, args.max_length, args.optim, args.completion_only_loss) == (
        5,
        5,
        64,
        "adafactor",
        True,
    )
    assert (args.logging_steps, args.use_cpu, args.bf16, args.save_strategy) == (1, True, False, "no")
    grpo = GRPORunConfig(
        device="cpu",
        max_steps=2,
        batch_size=6,
        num_generations=3,
        max_completion_length=9,
        temperature=0.7,
        top_p=0.8,
        top_k=5,
        min_p=0.0,
        beta=0.02,
    ).resolved(offline=True)
    args = trl_config(grpo, tmp_path, checkpointing={"save_strategy": "steps", "save_steps": 2})
    assert (
        args.max_steps,
        args.per_device_train_batch_size,
        args.num_generations,
        args.max_completion_length,
        args.beta,
    ) == (2, 6, 3, 9, 0.02)
    assert (args.temperature, args.top_p, args.top_k, args.min_p) == (0.7, 0.8, 5, None)  # min_p 0: TRL's off
    assert (args.save_strategy, args.save_steps, args.learning_rate) == ("steps", 2, 1e-4)
