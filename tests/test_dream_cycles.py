"""Dream cycles through the Dagster assets, tiny sizes: cycle n+1 dreams with and trains from cycle n's
weights, every checkpoint is a kept version, a rollback starts from a chosen earlier one, and the
provenance of a checkpoint returns the memory nodes its examples were dreamed from."""

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from datasets import load_from_disk
from safetensors.torch import load_file

from carl_assets import storage
from carl_assets.defs import crystallization, dreams, grpo, memory, models, sft, sft_training, steering
from carl_assets.defs.resources import build_resources
from carl_assets.provenance import PROVENANCE_TABLE, nodes_behind
from tests.tiny_run import TINY_BASE_MODEL
from tests.upstreams import with_upstreams

UPSTREAM = [memory.memory_graph, memory.emotion_training_pairs, models.base_model, steering.steering_vectors]
CYCLE = [
    dreams.dream_scenarios,
    sft.sft_dataset,
    sft_training.sft_checkpoint,
    crystallization.crystallization_events,
    grpo.grpo_checkpoint,
]
TINY = {
    "base_model": TINY_BASE_MODEL,
    "steering_vectors": {"batch_size": 64, "max_length": 64},
    "dream_scenarios": {
        "n_scenarios": 4,
        "responses_per_scenario": 2,
        "max_new_tokens": 6,
        "heldout_scenarios": 2,
        "excerpt_chars": 40,
    },
    "sft_dataset": {"holdout_tasks": 2},
    "sft_checkpoint": {"max_steps": 2, "batch_size": 2, "max_length": 768},
    "crystallization_events": {"require_crystallization": False},
    "grpo_checkpoint": {"max_steps": 1, "batch_size": 2, "num_generations": 2, "max_completion_length": 4},
}


def ops(names, **overrides):
    return {"ops": {n: {"config": dict(TINY[n], **overrides.get(n, {}))} for n in names if n in TINY}}


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def max_rel_diff(a, b):
    return max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-12)) for k in b)


@pytest.mark.slow
def test_two_cycles_chain_their_weights_and_roll_back(tmp_path):
    resources = build_resources(tmp_path)
    names = [a.key.to_user_string() for a in UPSTREAM + CYCLE]
    first = dg.materialize(with_upstreams(*UPSTREAM, *CYCLE), resources=resources, run_config=ops(names))
    assert first.success
    db = tmp_path / storage.DATABASE_NAME
    art = tmp_path / storage.ARTIFACTS_DIR
    cycles = storage.read_table(db, "dream_cycles")
    assert cycles["cycle"].tolist() == [0] and cycles.loc[0, "policy_asset"] == "base_model"
    grpo_v0 = (art / "grpo_checkpoint" / "current").resolve()

    # cycle 1: dreams with cycle 0's GRPO policy, SFT starts from it (a tiny rate: the weights barely move)
    second = dg.materialize(
        with_upstreams(*CYCLE),
        resources=resources,
        run_config=ops(
            [a.key.to_user_string() for a in CYCLE], sft_checkpoint={"learning_rate": 1e-12, "max_steps": 1}
        ),
    )
    assert second.success
    cycles = storage.read_table(db, "dream_cycles")
    assert cycles["cycle"].tolist() == [0, 1]
    assert (
        cycles.loc[1, "policy_asset"] == "grpo_checkpoint" and cycles.loc[1, "policy_version"] == grpo_v0.name
    )
    assert cycles.loc[1, "temperature"] < cycles.loc[0, "temperature"]  # the noise schedule falls
    assert cycles.loc[1, "learning_rate"] < cycles.loc[0, "learning_rate"]
    sft_v1 = (art / "sft_checkpoint" / "current").resolve()
    log = json.loads((sft_v1 / "training_log.json").read_text())
    assert log["started_from"] == f"grpo_checkpoint@{grpo_v0.name}" and log["dream_cycle"] == 1
    base = weights((art / "base_model" / "current").resolve())
    assert max_rel_diff(weights(sft_v1), weights(grpo_v0)) < 1e-6  # from cycle 0's weights ...
    assert max_rel_diff(weights(sft_v1), base) > 1e-4  # ... not from the base model's

    versions = storage.read_table(db, "artifact_versions")
    for asset in ("sft_checkpoint", "grpo_checkpoint", "sft_dataset"):
        kept = versions[versions["asset"] == asset]
        assert len(kept) == 2 and kept["current"].tolist() == [False, True]
        for path in kept["path"]:  # every kept version loads
            assert (Path(path) / ("dataset" if asset == "sft_dataset" else "model.safetensors")).exists()

    # provenance: the nodes behind cycle 1's SFT checkpoint are its dreams' source nodes plus cycle 0's
    provenance = storage.read_table(db, PROVENANCE_TABLE)
    behind = nodes_behind(provenance, "sft_checkpoint", sft_v1.name)
    scenarios = storage.read_table(db, "dream_scenarios")
    kept_nodes = set(scenarios[scenarios["kept"]]["seed_node_ids"].map(json.loads).explode())

    def nodes_of(version: str, part: str) -> set:
        return {
            n for ids in load_from_disk(str(art / "sft_dataset" / version / part))["node_ids"] for n in ids
        }

    v0, v1 = sorted(p.name for p in (art / "sft_dataset").iterdir() if p.name[0].isdigit())
    expected = nodes_of(v0, "dataset") | nodes_of(v0, "grpo_prompts") | nodes_of(v1, "dataset")
    # cycle 1's SFT data, and cycle 0's SFT data and GRPO prompts (the chain it started from); not cycle
    # 1's GRPO prompts, which only the next GRPO checkpoint saw
    assert set(behind["node_id"]) == expected and expected <= kept_nodes
    chain = behind.attrs["chain"]
    assert chain[0] == ("sft_checkpoint", sft_v1.name) and ("grpo_checkpoint", grpo_v0.name) in chain
    view = storage.read_table(db, "sft_example_nodes")
    assert set(view["node_id"]) <= kept_nodes and len(view) >= len(storage.read_table(db, "sft_dataset"))

    # roll back: the next cycle dreams with (and so trains from) the first GRPO version, not the newest
    rollback = dg.materialize(
        with_upstreams(*CYCLE[:3]),
        resources=resources,
        run_config=ops(
            [a.key.to_user_string() for a in CYCLE[:3]],
            dream_scenarios={"start_from": f"grpo_checkpoint@{grpo_v0.name}"},
        ),
    )
    assert rollback.success
    cycles = storage.read_table(db, "dream_cycles")
    assert cycles.loc[cycles["cycle"] == 2, "policy_version"].item() == grpo_v0.name
    log = json.loads(((art / "sft_checkpoint" / "current").resolve() / "training_log.json").read_text())
    assert log["started_from"] == f"grpo_checkpoint@{grpo_v0.name}"


def test_provenance_follows_the_chain_of_cycles():
    rows = pd.DataFrame(
        [
            {
                "asset": "sft_checkpoint",
                "version": "s0",
                "node_id": "a",
                "examples": 2,
                "parent_asset": "base_model",
                "parent_version": "b0",
            },
            {
                "asset": "grpo_checkpoint",
                "version": "g0",
                "node_id": "a",
                "examples": 2,
                "parent_asset": "sft_checkpoint",
                "parent_version": "s0",
            },
            {
                "asset": "sft_checkpoint",
                "version": "s1",
                "node_id": "b",
                "examples": 3,
                "parent_asset": "grpo_checkpoint",
                "parent_version": "g0",
            },
            {
                "asset": "sft_checkpoint",
                "version": "other",
                "node_id": "z",
                "examples": 9,
                "parent_asset": "base_model",
                "parent_version": "b0",
            },
        ]
    )
    behind = nodes_behind(rows, "sft_checkpoint", "s1")
    assert dict(zip(behind["node_id"], behind["examples"], strict=True)) == {"a": 4, "b": 3}
    assert behind.attrs["chain"] == [
        ("sft_checkpoint", "s1"),
        ("grpo_checkpoint", "g0"),
        ("sft_checkpoint", "s0"),
    ]
    with pytest.raises(LookupError, match="no provenance"):
        nodes_behind(rows, "grpo_checkpoint", "missing")


def test_rollback_spec_names_what_is_wrong(tmp_path):
    from carl_assets.defs.dreams import parse_checkpoint_spec, resolve_policy
    from carl_assets.defs.resources import ArtifactStore

    assert parse_checkpoint_spec("grpo_checkpoint@v1") == ("grpo_checkpoint", "v1")
    with pytest.raises(ValueError, match="unknown checkpoint"):
        parse_checkpoint_spec("leworld_model@x")
    store = ArtifactStore(home=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="base_model"):
        resolve_policy(store, "auto")
    with store.write_dir("base_model") as folder:
        (folder / "config.json").write_text("{}")
    asset, version, path = resolve_policy(store, "auto")
    assert asset == "base_model" and path == (tmp_path / "artifacts" / "base_model" / version)
    with pytest.raises(FileNotFoundError, match="no version 'nope'"):
        resolve_policy(store, "base_model@nope")
