"""The training and evaluation assets materialize end to end in a temporary home with tiny sizes."""

import json

import dagster as dg
import pytest
from datasets import load_from_disk
from safetensors.torch import load_file

from carl_assets import storage
from carl_assets.defs import agent, crystallization, grpo, memory, models, sft, sft_training, steering
from carl_assets.defs.checkpoints import weights_problem
from carl_assets.defs.resources import build_resources
from tests.tiny_run import TINY_BASE_MODEL
from tests.upstreams import with_upstreams

UPSTREAM = [memory.memory_graph, models.base_model, memory.emotion_training_pairs, steering.steering_vectors]
ASSETS = [
    sft.sft_dataset,
    sft_training.sft_checkpoint,
    crystallization.crystallization_events,
    grpo.grpo_checkpoint,
    agent.agent_evaluation,
]
TINY = {
    "base_model": TINY_BASE_MODEL,
    "steering_vectors": {"max_length": 64},
    "sft_dataset": {"source": "templates", "max_examples": 8, "holdout_tasks": 3},
    "sft_checkpoint": {"max_steps": 6, "learning_rate": 1e-2, "batch_size": 4},
    # 6 steps never crystallize: let GRPO run anyway (the block is tested below)
    "crystallization_events": {"require_crystallization": False},
    "grpo_checkpoint": {"max_steps": 2, "batch_size": 4, "num_generations": 2, "max_completion_length": 8},
    "agent_evaluation": {"max_new_tokens": 8},
}


def run_config(**overrides):
    return {"ops": {name: {"config": dict(cfg, **overrides.get(name, {}))} for name, cfg in TINY.items()}}


def metadata(result, asset):
    events = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return {k: getattr(v, "value", v) for k, v in events[-1].materialization.metadata.items()}


@pytest.mark.slow
def test_training_assets_materialize(tmp_path):
    resources = build_resources(tmp_path)
    result = dg.materialize(with_upstreams(*UPSTREAM, *ASSETS), resources=resources, run_config=run_config())
    assert result.success
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["sft_dataset_chat_formatted"] and checks["sft_checkpoint_weights_finite"]
    assert checks["sft_crystallized"] is False  # failed, as a warning: GRPO still ran
    assert checks["grpo_checkpoint_weights_finite"]
    grpo_meta = metadata(result, "grpo_checkpoint")
    assert checks["grpo_reward_spread"] == (grpo_meta["mean_frac_reward_zero_std"] < 0.5)
    db = tmp_path / storage.DATABASE_NAME
    art = tmp_path / storage.ARTIFACTS_DIR
    current = {name: art / name / "current" for name in ("sft_dataset", "sft_checkpoint", "grpo_checkpoint")}

    sft = storage.read_table(db, "sft_dataset")
    tasks = storage.read_table(db, "agent_tasks")
    assert len(sft) == 8 and len(tasks) == 3
    assert set(sft["node_id"]).isdisjoint(tasks["node_id"])
    on_disk = load_from_disk(str(current["sft_dataset"] / "dataset"))
    grpo_prompts = load_from_disk(str(current["sft_dataset"] / "grpo_prompts"))
    grpo_nodes = {n for ids in grpo_prompts["node_ids"] for n in ids}
    assert (
        len(grpo_prompts) == 8
        and grpo_nodes.isdisjoint(sft["node_id"])
        and grpo_nodes.isdisjoint(tasks["node_id"])
    )
    assert len(on_disk) == 8 and on_disk[0]["completion"][0]["role"] == "assistant"

    for name in ("sft_checkpoint", "grpo_checkpoint"):
        assert (current[name] / "config.json").exists()
        assert metadata(result, name)["dagster/uri"] == str(current[name].resolve())
        weights = load_file(str(current[name] / "model.safetensors"))
        assert weights and all(t.isfinite().all() for t in weights.values())
    sft_meta = metadata(result, "sft_checkpoint")
    log = json.loads((current["sft_checkpoint"] / "training_log.json").read_text())
    assert log["started_from"].startswith("base_model@")
    assert sft_meta["steps"] == log["steps"] <= 6 and "accuracy_curve" in sft_meta
    assert sft_meta["crystallized"] == log["crystallized"]

    events = storage.read_table(db, "crystallization_events")
    training_log = storage.read_table(db, "training_log")
    assert len(events) == 1 and events.loc[0, "run_id"] == result.run_id
    assert events.loc[0, "checkpoint_version"] == current["sft_checkpoint"].resolve().name
    assert events.loc[0, "max_steps"] == 6 and events.loc[0, "threshold"] == pytest.approx(0.99)
    assert len(training_log) == log["steps"] and training_log["mean_token_accuracy"].between(0, 1).all()

    rewards = storage.read_table(db, "grpo_rewards")
    completions = storage.read_table(db, "grpo_completions")
    assert list(rewards["step"]) == [1, 2] and rewards["reward"].notna().all()
    assert len(completions) == 8
    grpo_meta = metadata(result, "grpo_checkpoint")
    assert grpo_meta["reward_std"] == pytest.approx(float(completions["reward"].std(ddof=0)))
    assert grpo_meta["rewards_vary"] == (grpo_meta["reward_std"] > 0) and "reward_curve" in grpo_meta

    evaluation = storage.read_table(db, "agent_evaluation")
    summary = storage.read_table(db, "agent_evaluation_summary")
    assert sorted(evaluation["checkpoint"].unique()) == ["grpo_checkpoint", "sft_checkpoint"]
    assert len(evaluation) == 2 * 3
    for row in summary.itertuples():
        part = evaluation[evaluation.checkpoint == row.checkpoint]
        assert row.act_rate == pytest.approx(part["acted"].mean())
        assert row.mean_reward == pytest.approx(part["reward"].mean())
    assert (evaluation["response"].isna() == ~evaluation["acted"]).all()
    # the readout of each agent turn: every checkpoint x task x emotion x readout layer
    readout = storage.read_table(db, "agent_readout")
    manifest = json.loads((art / "steering_vectors" / "current" / "manifest.json").read_text())
    assert len(readout) == 2 * 3 * len(manifest["concepts"]) * len(manifest["layers"])
    assert readout["projection"].notna().all() and "readout_heatmap" in metadata(result, "agent_evaluation")

    # a second SFT run appends a crystallization event (one row per run)
    again = dg.materialize(
        with_upstreams(*ASSETS[1:3]),
        resources=resources,
        run_config={
            "ops": {
                "sft_checkpoint": {"config": dict(TINY["sft_checkpoint"], max_steps=3)},
                "crystallization_events": {"config": TINY["crystallization_events"]},
            }
        },
    )
    assert again.success
    events = storage.read_table(db, "crystallization_events")
    assert sorted(events["run_id"]) == sorted([result.run_id, again.run_id])
    assert sorted(events["max_steps"]) == [3, 6]
    assert len(storage.read_table(db, "training_log")) == log["steps"] + 3
    versions = storage.read_table(db, "artifact_versions")
    assert (versions["asset"] == "sft_checkpoint").sum() == 2  # both SFT runs kept, the newest current
    assert versions[versions["asset"] == "sft_checkpoint"]["current"].tolist() == [False, True]


@pytest.mark.slow
def test_grpo_without_within_group_spread_holds_the_evaluation_back(tmp_path):
    """Near-greedy sampling makes every completion of a group the same: no advantage, no signal."""
    resources = build_resources(tmp_path)
    cfg = run_config(grpo_checkpoint={"temperature": 1e-4})
    result = dg.materialize(
        with_upstreams(*UPSTREAM, *ASSETS), resources=resources, run_config=cfg, raise_on_error=False
    )
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    spread = checks["grpo_reward_spread"]
    assert spread.passed is False and spread.metadata["mean_frac_reward_zero_std"].value == pytest.approx(1.0)
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "grpo_checkpoint" in done and "agent_evaluation" not in done


@pytest.mark.slow
def test_grpo_is_held_back_when_sft_did_not_crystallize(tmp_path):
    resources = build_resources(tmp_path)
    cfg = run_config(crystallization_events={"require_crystallization": True})
    result = dg.materialize(
        with_upstreams(*UPSTREAM[:2], *ASSETS[:4]),
        resources=resources,
        run_config={
            "ops": {
                k: cfg["ops"][k]
                for k in (
                    "base_model",
                    "sft_dataset",
                    "sft_checkpoint",
                    "crystallization_events",
                    "grpo_checkpoint",
                )
            }
        },
        raise_on_error=False,
    )
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["sft_crystallized"].passed is False
    assert checks["sft_crystallized"].severity == dg.AssetCheckSeverity.ERROR
    # the failed check says why and what to change
    assert "never fired" in checks["sft_crystallized"].description
    assert "require_crystallization: false" in checks["sft_crystallized"].description
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert {"sft_checkpoint", "crystallization_events"} <= done  # the failed run is still recorded
    assert "grpo_checkpoint" not in done
    assert storage.read_table(tmp_path / storage.DATABASE_NAME, "crystallization_events")[
        "crystallized"
    ].tolist() == [False]


@pytest.mark.slow
def test_bad_sft_data_blocks_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "completion": [{"role": "assistant", "content": ""}],
            }
        )
        + "\n"
    )
    resources = build_resources(tmp_path / "home")
    cfg = run_config(sft_dataset={"source": str(bad)})
    result = dg.materialize(
        with_upstreams(*UPSTREAM[:2], *ASSETS[:2]),
        resources=resources,
        run_config={"ops": {k: cfg["ops"][k] for k in ("base_model", "sft_dataset", "sft_checkpoint")}},
        raise_on_error=False,
    )
    assert not result.success
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["sft_dataset_chat_formatted"] is False and [k for k, ok in checks.items() if not ok] == [
        "sft_dataset_chat_formatted"
    ]
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "sft_dataset" in done and "sft_checkpoint" not in done


def test_weights_check_finds_non_finite_values(tmp_path):
    import torch
    from safetensors.torch import save_file

    assert weights_problem(tmp_path) == "no safetensors weights"
    save_file(
        {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}, str(tmp_path / "model.safetensors")
    )
    assert "b has non-finite" in weights_problem(tmp_path)
    save_file({"a": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    assert weights_problem(tmp_path) is None


@pytest.mark.slow
def test_lora_and_a_small_per_device_batch_through_the_assets(tmp_path):
    """LoRA on both trainers (merged: the versions are plain checkpoints), GRPO at batch 1 x accumulation 4
    with groups of 4 (TRL's rule, not batch % generations) and a reward chosen by name."""
    resources = build_resources(tmp_path)
    lora = {"lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"]}
    cfg = run_config(
        sft_checkpoint=dict(lora, max_steps=2),
        grpo_checkpoint=dict(
            lora,
            max_steps=1,
            batch_size=1,
            gradient_accumulation_steps=4,
            num_generations=4,
            reward="mean_logprob",
            top_p=0.9,
            min_p=0.05,
        ),
    )
    ops = ("base_model", "sft_dataset", "sft_checkpoint", "crystallization_events", "grpo_checkpoint")
    result = dg.materialize(
        with_upstreams(*UPSTREAM[:2], *ASSETS[:4]),
        resources=resources,
        run_config={"ops": {k: cfg["ops"][k] for k in ops}},
    )
    assert result.success
    art = tmp_path / storage.ARTIFACTS_DIR
    for name in ("sft_checkpoint", "grpo_checkpoint"):
        folder = art / name / "current"
        assert metadata(result, name)["run/lora_r"] == 4
        assert not list(folder.glob("adapter_*"))
        assert not any("lora_" in k for k in load_file(str(folder / "model.safetensors")))
    grpo = metadata(result, "grpo_checkpoint")
    assert (grpo["run/reward"], grpo["run/top_p"], grpo["run/min_p"]) == ("mean_logprob", 0.9, 0.05)
    completions = storage.read_table(tmp_path / storage.DATABASE_NAME, "grpo_completions")
    assert len(completions) == 4 and set(completions["group"]) == {0}  # one prompt's group per step
    assert (completions["reward"] <= 0).all()  # a mean log-probability is never positive
