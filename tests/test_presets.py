"""Run-config presets: each validates against the jobs' config schema, the preset jobs open with it as their
default config, `carl materialize --preset` lays --config over it, and the `real` preset's shape runs end to
end on a tiny model (base_model.model overridden to a folder, as a launchpad edit would)."""

from __future__ import annotations

import dagster as dg
import pytest

from carl_assets.defs import build_definitions
from carl_assets.defs.jobs import RETRAINING_ASSETS
from carl_assets.defs.pipeline_cli import with_preset
from carl_assets.defs.presets import (
    PRESETS,
    REAL_MODEL,
    merge_run_config,
    preset_names,
    preset_run_config,
)


@pytest.fixture(scope="module")
def defs(tmp_path_factory):
    return build_definitions(tmp_path_factory.mktemp("home"))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_against_the_whole_graphs_schema(defs, name):
    resolved = dg.validate_run_config(defs.resolve_job_def("carl_all"), preset_run_config(name))
    for op, value in PRESETS[name]["ops"].items():  # every value the preset sets is what the run gets
        for field, expected in value["config"].items():
            assert resolved["ops"][op]["config"][field] == expected, (op, field)


def test_a_misspelt_field_fails_validation_naming_it(defs):
    bad = merge_run_config(
        preset_run_config("real"), {"ops": {"dream_scenarios": {"config": {"n_scenario": 3}}}}
    )
    with pytest.raises(dg.DagsterInvalidConfigError, match="n_scenario"):
        dg.validate_run_config(defs.resolve_job_def("carl_all"), bad)


def test_preset_jobs_open_with_the_preset_and_take_edits(defs):
    job = defs.resolve_job_def("carl_all_real")
    opened = dg.validate_run_config(job, {})  # what the launchpad starts from
    assert opened["ops"]["base_model"]["config"]["model"] == REAL_MODEL
    assert (
        opened["ops"]["dream_scenarios"]["config"]["n_scenarios"]
        == (PRESETS["real"]["ops"]["dream_scenarios"]["config"]["n_scenarios"])
    )
    edited = dg.validate_run_config(job, {"ops": {"base_model": {"config": {"model": "/some/folder"}}}})
    assert edited["ops"]["base_model"]["config"]["model"] == "/some/folder"
    # an edit of one asset leaves the preset's other assets as they were
    assert (
        edited["ops"]["sft_checkpoint"]["config"]["max_steps"]
        == (PRESETS["real"]["ops"]["sft_checkpoint"]["config"]["max_steps"])
    )
    retraining = defs.resolve_job_def("retraining_real")
    keys = {k.to_user_string() for k in retraining.asset_layer.executable_asset_keys}
    assert keys == set(RETRAINING_ASSETS)
    assert (
        dg.validate_run_config(retraining, {})["ops"]["sft_checkpoint"]["config"]["max_steps"]
        == (PRESETS["real"]["ops"]["sft_checkpoint"]["config"]["max_steps"])
    )


def test_preset_run_config_restricts_to_assets_and_copies():
    config = preset_run_config("real", ["base_model", "not_an_asset"])
    assert config == {"ops": {"base_model": {"config": {"model": REAL_MODEL}}}}
    config["ops"]["base_model"]["config"]["model"] = "changed"
    assert PRESETS["real"]["ops"]["base_model"]["config"]["model"] == REAL_MODEL  # the preset is untouched
    assert preset_run_config("offline") == {"ops": {}}
    with pytest.raises(KeyError, match="offline, real"):
        preset_run_config("fast")
    assert preset_names() == ["offline", "real"]


def test_merge_lays_the_override_over_the_base_mapping_by_mapping():
    base = {"ops": {"a": {"config": {"x": 1, "y": [1, 2]}}, "b": {"config": {"z": 3}}}}
    over = {"ops": {"a": {"config": {"y": [9]}}}, "loggers": {"console": {}}}
    assert merge_run_config(base, over) == {
        "ops": {"a": {"config": {"x": 1, "y": [9]}}, "b": {"config": {"z": 3}}},
        "loggers": {"console": {}},
    }
    assert base["ops"]["a"]["config"]["y"] == [1, 2]  # inputs unchanged


def test_cli_preset_with_config_over_it():
    assert with_preset(None, {"ops": {"x": 1}}) == {"ops": {"x": 1}}
    run = with_preset("real", {"ops": {"base_model": {"config": {"model": "/m"}}}})
    assert run["ops"]["base_model"]["config"] == {"model": "/m"}
    assert run["ops"]["dream_scenarios"] == PRESETS["real"]["ops"]["dream_scenarios"]
    assert with_preset("offline", {}) == {"ops": {}}


# The training chain of the graph, whose budgets depend on each other (dream prompts fit SFT's max_length,
# GRPO's batch holds its generations); the other assets' preset values are validated above.
TRAINING_CHAIN = [
    "memory_graph",
    "emotion_training_pairs",
    "base_model",
    "dream_scenarios",
    "sft_dataset",
    "sft_checkpoint",
    "crystallization_events",
    "grpo_checkpoint",
]


@pytest.mark.slow
def test_real_preset_runs_on_a_tiny_model(tmp_path, tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    folder = tmp_path / "tiny"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    defs = build_definitions(tmp_path / "home")
    job = defs.resolve_job_def("carl_all_real")
    known = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    selection = [dg.AssetKey(a) for a in TRAINING_CHAIN if a in known]
    # The launchpad edit a user would make: only the model changes, every budget is the preset's.
    result = job.execute_in_process(
        run_config={"ops": {"base_model": {"config": {"model": str(folder)}}}},
        asset_selection=selection,
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    failures = [e.step_key for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert result.success, failures
    made = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert made == {k.to_user_string() for k in selection}
    real = PRESETS["real"]["ops"]
    meta = {
        e.asset_key.to_user_string(): {
            k: getattr(v, "value", v) for k, v in e.materialization.metadata.items()
        }
        for e in result.get_asset_materialization_events()
    }
    assert meta["sft_checkpoint"]["run/max_steps"] == real["sft_checkpoint"]["config"]["max_steps"]
    assert meta["grpo_checkpoint"]["run/max_steps"] == real["grpo_checkpoint"]["config"]["max_steps"]
    assert (
        meta["grpo_checkpoint"]["run/num_generations"] == real["grpo_checkpoint"]["config"]["num_generations"]
    )


def test_asset_configs_reuse_the_library_run_configs(defs):
    """Each trainer setting is defined once, in the library run config the asset config inherits: the
    asset classes add only their own fields, the launchpad shows a choice as an enum and refuses another
    value before the run starts, and performance-only fields stay out of the data version."""
    from carl_assets.carl.run_config import AgentSampling, GRPORunConfig, Placement, SFTRunConfig
    from carl_assets.defs.common import config_values
    from carl_assets.defs.training_config import (
        AgentEvaluationConfig,
        GRPOCheckpointConfig,
        SFTCheckpointConfig,
    )

    for asset_config, library in (
        (SFTCheckpointConfig, [SFTRunConfig]),
        (GRPOCheckpointConfig, [GRPORunConfig]),
        (AgentEvaluationConfig, [AgentSampling, Placement]),
    ):
        inherited = set().union(*(cls.model_fields for cls in library))
        assert inherited <= set(asset_config.model_fields)
        assert not set(asset_config.__annotations__) & inherited, asset_config  # nothing redefined
    job = defs.resolve_job_def("carl_all")
    schema = SFTCheckpointConfig.to_config_schema().as_field().config_type.fields  # what the launchpad shows
    assert schema["optim"].config_type.kind.name == "ENUM"
    assert schema["lr_scheduler_type"].config_type.inner_type.kind.name == "ENUM"  # or None
    assert schema["max_steps"].default_value is None
    for bad in (
        {"sft_checkpoint": {"optim": "adamw"}},
        {"grpo_checkpoint": {"reward": "nonsense"}},
        {"agent_evaluation": {"dtype": "int8"}},
    ):
        ((op, config),) = bad.items()
        with pytest.raises(dg.DagsterInvalidConfigError, match="not in enum"):
            dg.validate_run_config(job, {"ops": {op: {"config": config}}})
    assert config_values(
        SFTCheckpointConfig(threads=2, log_every=1, checkpoint_every=0, launcher="torchrun:2")
    ) == config_values(SFTCheckpointConfig())
    assert config_values(SFTCheckpointConfig(max_steps=9)) != config_values(SFTCheckpointConfig())
