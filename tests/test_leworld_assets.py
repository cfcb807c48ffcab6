"""The LeWorld assets materialize end to end in a temporary home with tiny sizes."""

import dagster as dg
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from carl_assets import storage
from carl_assets.defs import leworld
from carl_assets.defs.resources import build_resources, write_tables
from carl_assets.leworld.architecture import load_system
from tests.upstreams import with_upstreams

ASSETS = [leworld.leworld_memory, leworld.leworld_dataset, leworld.leworld_model, leworld.leworld_evaluation]
TINY = {
    "leworld_memory": {"num_words": 2048, "word_size": 8},
    "leworld_dataset": {
        "num_train": 48,
        "num_validation": 16,
        "seq_length": 6,
        "state_dim": 8,
        "char_dim": 4,
    },
    "leworld_model": {
        "phase1_epochs": 1,
        "phase2_epochs": 1,
        "phase3_epochs": 1,
        "batch_size": 16,
        "slm_d_model": 16,
        "blm_d_model": 16,
        "encoding_dim": 8,
        "info_dim": 4,
    },
    "leworld_evaluation": {"n_steps": 3},
}


def run_config(**overrides):
    ops = {name: {"config": dict(cfg, **overrides.get(name, {}))} for name, cfg in TINY.items()}
    return {"ops": ops}


def metadata(result, asset):
    events = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return events[-1].materialization.metadata


@pytest.mark.slow
def test_leworld_assets_materialize(tmp_path):
    resources = build_resources(tmp_path)
    artifacts = resources["artifacts"]
    result = dg.materialize(with_upstreams(*ASSETS), resources=resources, run_config=run_config())
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["leworld_dataset_is_well_formed"] and checks["leworld_model_is_sound"]
    assert "leworld_beats_persistence" in checks  # a tiny run may or may not beat it: reported, not forced

    bits = load_file(str(artifacts.require("leworld_memory", "memory.safetensors")))["bits"]
    assert bits.shape == (2048, 8) and bits.dtype == torch.uint8
    db = tmp_path / storage.DATABASE_NAME
    index = storage.read_table(db, "leworld_dataset_index")
    assert len(index) == 64 and set(index["split"]) == {"train", "validation"}
    assert (index["n_relevant"] == 2).all() and (index["end_1"] - index["start_1"]).between(16, 128).all()
    metrics = storage.read_table(db, "leworld_metrics")
    assert set(metrics["phase"]) == {1, 2, 3}
    assert {"slm_loss", "blm_loss", "total_loss", "loss_with_info", "val_one_step_mse"} <= set(
        metrics["metric"]
    )
    summary = storage.read_table(db, "leworld_evaluation")
    assert list(summary["system"]) == [
        "leworld",
        "persistence",
        "memory_ablated",
        "oracle_reads",
        "trained_without_memory",
    ]
    assert {"mse", "mae", "one_step_mse", "routing_entropy", "slm_usage", "leworld_beats"} <= set(
        summary.columns
    )
    steps = storage.read_table(db, "leworld_evaluation_steps")
    assert len(steps) == 15  # 5 systems × 3 horizons

    model = load_system(artifacts.require("leworld_model"))
    assert torch.equal(model.memory.memory, bits.float()) and model.memory_reads
    # 3 seeds × (with memory, trained without): each replicate saved, logged and evaluated.
    replicates = sorted(p.name for p in (artifacts.require("leworld_model") / "replicates").iterdir())
    assert replicates == [f"{v}_seed{s}" for v in ("memory", "no_memory") for s in range(3)]
    assert not load_system(artifacts.require("leworld_model") / "replicates" / "no_memory_seed0").memory_reads
    assert set(zip(metrics["variant"], metrics["seed"], strict=True)) == {
        (v, s) for v in ("memory", "no_memory") for s in range(3)
    }
    per_seed = storage.read_table(db, "leworld_evaluation_seeds")
    assert len(per_seed) == 6
    # The primary model is the memory replicate of the first seed; its baseline row the no-memory one.
    primary = per_seed[(per_seed["variant"] == "memory") & (per_seed["seed"] == 0)].iloc[0]
    assert primary["mse"] == pytest.approx(summary.loc[0, "mse"], rel=1e-6)
    blind = per_seed[(per_seed["variant"] == "no_memory") & (per_seed["seed"] == 0)].iloc[0]
    assert blind["mse"] == pytest.approx(summary.loc[4, "mse"], rel=1e-6)
    verdict = storage.read_table(db, "leworld_memory_verdict").set_index("metric")
    assert list(verdict.index) == ["mse", "one_step_mse"]
    row = verdict.loc["mse"]
    assert row["seeds"] == 3
    assert row["memory_mean"] == pytest.approx(per_seed.loc[per_seed["variant"] == "memory", "mse"].mean())
    assert row["no_memory_std"] == pytest.approx(
        per_seed.loc[per_seed["variant"] == "no_memory", "mse"].std(ddof=1)
    )
    assert not list((artifacts.require("leworld_model")).glob("*.pt"))
    evaluation = metadata(result, "leworld_evaluation")
    assert evaluation["beats_memory_ablated"].value == bool(summary.loc[0, "mse"] < summary.loc[2, "mse"])
    assert evaluation["memory_verdict"].value.startswith(row["verdict"] + ": rollout MSE")
    assert evaluation["memory_helps"].value == (row["gap"] > row["twice_spread"])
    assert evaluation["memory_gap"].value == pytest.approx(row["gap"]) and evaluation[
        "twice_spread"
    ].value == pytest.approx(row["twice_spread"])
    assert evaluation["with_memory_mse_std"].value == pytest.approx(row["memory_std"])
    assert evaluation["step_mse_plot"].value.startswith("![")
    # A model is not trained on a dataset generated from another memory.
    dg.materialize(
        with_upstreams(leworld.leworld_memory),
        resources=build_resources(tmp_path),
        run_config={"ops": {"leworld_memory": {"config": dict(TINY["leworld_memory"], populator="random")}}},
    )
    with pytest.raises(Exception) as excinfo:
        dg.materialize(
            with_upstreams(leworld.leworld_model),
            resources=build_resources(tmp_path),
            run_config={"ops": {"leworld_model": {"config": TINY["leworld_model"]}}},
        )
    assert "materialize leworld_dataset again" in repr(excinfo.value) + repr(excinfo.value.__cause__)
    model_meta = metadata(result, "leworld_model")
    assert model_meta["loss_plot"].value.startswith("![") and model_meta["slm_loss_plot"].value.startswith(
        "!["
    )


@pytest.mark.slow
def test_memory_populators_and_data_version(tmp_path):
    resources = build_resources(tmp_path)
    versions = {}
    for populator in ("structured", "random"):
        cfg = run_config(leworld_memory={"populator": populator})
        result = dg.materialize(
            with_upstreams(leworld.leworld_memory),
            resources=resources,
            run_config={"ops": {"leworld_memory": cfg["ops"]["leworld_memory"]}},
        )
        versions[populator] = metadata(result, "leworld_memory")["data_version"].value
    assert versions["structured"] != versions["random"]

    experience = {
        "ops": {
            "leworld_memory": run_config(leworld_memory={"populator": "experience"})["ops"]["leworld_memory"]
        }
    }
    with pytest.raises(Exception) as excinfo:
        dg.materialize(with_upstreams(leworld.leworld_memory), resources=resources, run_config=experience)
    assert "memory_nodes" in repr(excinfo.value) + repr(excinfo.value.__cause__)
    del excinfo  # its traceback holds the failed run's DuckDB connection

    nodes = pd.DataFrame(
        {
            "node_id": ["a", "b"],
            "text": ["I walked by the river. It was calm.", "Debugging all night. Tired but clear."],
        }
    )
    write_tables(resources["duckdb"], {"memory_nodes": nodes})
    result = dg.materialize(
        with_upstreams(leworld.leworld_memory), resources=resources, run_config=experience
    )
    assert metadata(result, "leworld_memory")["experience_rows"].value == 4
    bits = load_file(str(resources["artifacts"].require("leworld_memory", "memory.safetensors")))["bits"]
    assert torch.equal(bits[4:8], bits[:4])  # the 4 sentence words tile the memory
    assert 0 < bits.float().mean() < 1


def test_every_leworld_config_field_is_described():
    for cls in (
        leworld.LeWorldMemoryConfig,
        leworld.LeWorldDatasetConfig,
        leworld.LeWorldModelConfig,
        leworld.LeWorldEvaluationConfig,
    ):
        for name, field in cls.model_fields.items():
            assert field.description and len(field.description) > 10, (
                f"{cls.__name__}.{name} has no description"
            )


def test_leworld_memory_declares_its_memory_graph_edge():
    assert dg.AssetKey("memory_graph") in leworld.leworld_memory.asset_deps[dg.AssetKey("leworld_memory")]


@pytest.mark.parametrize(
    "asset,bad,message",
    [
        ("leworld_memory", {"populator": "dreams"}, "unknown populator"),
        ("leworld_dataset", {"cue": "address"}, "unknown cue"),
    ],
)
def test_bad_leworld_config_names_the_field(tmp_path, asset, bad, message):
    assets = {
        "leworld_memory": [leworld.leworld_memory],
        "leworld_dataset": [leworld.leworld_memory, leworld.leworld_dataset],
    }[asset]
    names = [a.key.path[-1] for a in assets]
    config = {"ops": {n: {"config": dict(TINY[n], **(bad if n == asset else {}))} for n in names}}
    with pytest.raises(Exception) as excinfo:
        dg.materialize(with_upstreams(*assets), resources=build_resources(tmp_path), run_config=config)
    assert message in repr(excinfo.value) + repr(excinfo.value.__cause__)
    del excinfo
