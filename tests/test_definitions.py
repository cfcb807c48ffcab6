"""The one Definitions object: the asset graph of DESIGN.md, its groups, checks, jobs and schedule."""

from __future__ import annotations

import dagster as dg
import pytest

from carl_assets.defs import build_definitions

# asset -> (group, upstream assets) as DESIGN.md lays the graph out (dreams not yet built).
EXPECTED = {
    "memory_graph": ("memory", set()),
    "emotion_training_pairs": ("memory", {"memory_graph"}),
    "base_model": ("training", {"memory_graph"}),
    "steering_vectors": ("steering", {"emotion_training_pairs", "base_model"}),
    "sft_dataset": ("training", {"memory_graph"}),
    "sft_checkpoint": ("training", {"base_model", "sft_dataset"}),
    "crystallization_events": ("training", {"sft_checkpoint"}),
    "grpo_checkpoint": ("training", {"sft_checkpoint"}),
    "agent_evaluation": ("evaluation", {"grpo_checkpoint", "sft_checkpoint"}),
    "leworld_memory": ("leworld", set()),
    "leworld_dataset": ("leworld", {"leworld_memory"}),
    "leworld_model": ("leworld", {"leworld_dataset"}),
    "leworld_evaluation": ("leworld", {"leworld_model"}),
}


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    defs = build_definitions(tmp_path_factory.mktemp("home"))
    return defs, defs.resolve_asset_graph()


@pytest.mark.parametrize("asset", sorted(EXPECTED))
def test_asset_in_graph_with_its_group_and_upstreams(graph, asset):
    _, asset_graph = graph
    key = dg.AssetKey(asset)
    assert key in asset_graph.get_all_asset_keys(), f"{asset} is not defined"
    node = asset_graph.get(key)
    group, upstream = EXPECTED[asset]
    assert node.group_name == group
    assert {k.to_user_string() for k in node.parent_keys} >= upstream


def test_every_asset_has_a_description(graph):
    _, asset_graph = graph
    for key in asset_graph.get_all_asset_keys():
        assert asset_graph.get(key).description, f"{key.to_user_string()} has no description"


def test_checks_jobs_and_schedule(graph):
    defs, asset_graph = graph
    check_targets = {k.asset_key.to_user_string() for k in asset_graph.asset_check_keys}
    assert {"emotion_training_pairs", "steering_vectors"} <= check_targets
    assert defs.resolve_job_def("carl_all") is not None
    readout = defs.resolve_job_def("amygdala_readout")
    assert {"memory_graph", "emotion_training_pairs", "base_model", "steering_vectors"} <= {
        k.to_user_string() for k in readout.asset_layer.executable_asset_keys
    }
    schedule = defs.resolve_schedule_def("weekly_retrain")
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED


def test_workspace_loads_definitions_module():
    import definitions

    assert isinstance(definitions.defs, dg.Definitions)


def test_memory_file_sensor_requests_a_run_once_per_change(graph, tmp_path, monkeypatch):
    defs, _ = graph
    sensor = defs.resolve_sensor_def("memory_file_changed")
    monkeypatch.delenv("CARL_MEMORY_SOURCE", raising=False)
    assert isinstance(sensor(dg.build_sensor_context()), dg.SkipReason)

    memory = tmp_path / "memory.jsonl"
    memory.write_text('{"type":"entity","name":"a","entityType":"journal","observations":["x"]}\n')
    monkeypatch.setenv("CARL_MEMORY_SOURCE", f"jsonl:{memory}")
    context = dg.build_sensor_context()
    first = sensor(context)
    assert isinstance(first, dg.RunRequest)
    assert first.run_config["ops"]["memory_graph"]["config"]["source"] == f"jsonl:{memory}"
    again = sensor(dg.build_sensor_context(cursor=context.cursor))
    assert isinstance(again, dg.SkipReason)
    memory.write_text(memory.read_text() + '{"type":"entity","name":"b","entityType":"journal","observations":["y"]}\n')
    assert isinstance(sensor(dg.build_sensor_context(cursor=context.cursor)), dg.RunRequest)
