"""The one Definitions object: the asset graph (docs/architecture.md), its groups, code versions, checks,
jobs, the nightly schedule and the memory-change sensor."""

from __future__ import annotations

import json
import shlex
import warnings
from pathlib import Path

import dagster as dg
import pytest
import yaml

from carl_assets.defs import CODE_VERSIONS, build_definitions

# asset -> (group, upstream assets it must have), as docs/architecture.md lays the graph out.
EXPECTED = {
    "memory_source": ("memory", set()),
    "memory_graph": ("memory", {"memory_source"}),
    "emotion_tags": ("memory", {"memory_graph", "base_model"}),
    "emotion_training_pairs": ("memory", {"memory_graph"}),
    "base_model": ("training", {"memory_graph"}),
    "steering_vectors": ("steering", {"emotion_training_pairs", "base_model"}),
    "scorer_validation": ("dreams", {"memory_graph", "base_model"}),
    "dream_scenarios": ("dreams", {"memory_graph", "base_model", "steering_vectors", "scorer_validation"}),
    "sft_dataset": ("training", {"dream_scenarios"}),
    "sft_checkpoint": ("training", {"base_model", "sft_dataset"}),
    "crystallization_events": ("training", {"sft_checkpoint"}),
    "grpo_checkpoint": ("training", {"sft_checkpoint", "crystallization_events"}),
    "agent_evaluation": ("evaluation", {"grpo_checkpoint", "sft_checkpoint", "steering_vectors"}),
    "leworld_memory": ("leworld", {"memory_graph"}),
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
    if asset not in {k.to_user_string() for k in asset_graph.get_all_asset_keys()}:
        pytest.fail(f"{asset} is not defined")
    node = asset_graph.get(key)
    group, upstream = EXPECTED[asset]
    assert node.group_name == group
    assert {k.to_user_string() for k in node.parent_keys} >= upstream


def test_every_asset_has_a_description_and_a_code_version(graph):
    _, asset_graph = graph
    materializable = set()
    for key in asset_graph.get_all_asset_keys():
        node = asset_graph.get(key)
        assert node.description, f"{key.to_user_string()} has no description"
        if node.is_materializable:
            materializable.add(key.to_user_string())
            assert node.code_version, f"{key.to_user_string()} has no code version"
    assert set(CODE_VERSIONS) == materializable  # no asset without an entry, no entry without an asset


def test_a_materialization_records_the_tables_code_version(tmp_path, monkeypatch):
    """What Dagster records with each materialization (the `dagster/code_version` tag its staleness compares
    with the asset's current code version), on the Definitions the code location loads."""
    from carl_assets.definitions import defs as code_location

    monkeypatch.setenv("CARL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CARL_MEMORY_SOURCE", "sample")
    defs = code_location()
    with dg.instance_for_test() as instance:
        job = defs.resolve_job_def("carl_all")
        result = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("memory_graph")])
        assert result.success
        event = instance.get_latest_materialization_event(dg.AssetKey("memory_graph"))
    recorded = dict(event.asset_materialization.tags or {})
    assert recorded["dagster/code_version"] == CODE_VERSIONS["memory_graph"]
    graph = defs.resolve_asset_graph()
    reported = {
        k.to_user_string(): graph.get(k).code_version
        for k in graph.get_all_asset_keys()
        if graph.get(k).is_materializable
    }
    assert reported == CODE_VERSIONS


def test_no_leaf_but_the_evaluations(graph):
    """The graph is one piece: everything feeds the agent evaluation or LeWorld's evaluation."""
    _, asset_graph = graph
    keys = asset_graph.get_all_asset_keys()
    leaves = {k.to_user_string() for k in keys if not asset_graph.get(k).child_keys}
    assert leaves == {"agent_evaluation", "leworld_evaluation"}


def test_every_config_field_has_a_description(graph):
    defs, asset_graph = graph
    for key in asset_graph.get_all_asset_keys():
        node = asset_graph.get(key)
        if not node.is_materializable:
            continue
        assets_def = asset_graph.assets_def_for_key(key)
        config_schema = assets_def.op.config_schema
        if config_schema is None or not hasattr(config_schema, "config_type"):
            continue
        fields = getattr(config_schema.config_type, "fields", {}) or {}
        for name, field in fields.items():
            assert field.description, f"{key.to_user_string()}: config field {name!r} has no description"


def test_jobs_schedule_and_sensor(graph):
    defs, _ = graph

    def keys(job: str) -> set[str]:
        return {k.to_user_string() for k in defs.resolve_job_def(job).asset_layer.executable_asset_keys}

    assert keys("carl_all") >= set(EXPECTED) - {"memory_source"}
    assert keys("retraining") == {
        "memory_graph",
        "emotion_tags",
        "dream_scenarios",
        "sft_dataset",
        "sft_checkpoint",
        "crystallization_events",
        "grpo_checkpoint",
        "agent_evaluation",
    }
    assert keys("steering_refresh") == {"emotion_tags", "emotion_training_pairs", "steering_vectors"}
    schedule = defs.resolve_schedule_def("nightly_retraining")
    assert schedule.job_name == "retraining"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    sensor = defs.resolve_sensor_def("memory_graph_changed")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert {j.name for j in sensor.jobs} == {"retraining", "steering_refresh"}


@pytest.mark.parametrize(
    ("preset", "job", "warns"),
    [("real", "retraining_real", False), ("REAL", "retraining_real", False), ("offline", "retraining", False),
     ("gpu", "retraining", True)],
)
def test_retrain_preset_picks_the_unattended_retraining_job(monkeypatch, preset, job, warns):
    """A user on the real model sets CARL_RETRAIN_PRESET=real: the schedule and the sensor then request the
    job with the real preset's budgets; an unknown value warns, naming the choices, and keeps 'offline'."""
    monkeypatch.setenv("CARL_RETRAIN_PRESET", preset)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        defs = build_definitions()
    said = [str(w.message) for w in caught if "CARL_RETRAIN_PRESET" in str(w.message)]
    assert bool(said) == warns and all("['offline', 'real']" in text for text in said)
    assert defs.resolve_schedule_def("nightly_retraining").job_name == job
    assert {j.name for j in defs.resolve_sensor_def("memory_graph_changed").jobs} == {job, "steering_refresh"}


def test_schedule_requests_a_retraining_run_in_the_users_timezone(monkeypatch):
    monkeypatch.setenv("CARL_TIMEZONE", "Europe/Berlin")
    monkeypatch.setenv("CARL_RETRAIN_CRON", "15 2 * * *")
    defs = build_definitions()
    schedule = defs.resolve_schedule_def("nightly_retraining")
    assert schedule.cron_schedule == "15 2 * * *"
    assert schedule.execution_timezone == "Europe/Berlin"
    with dg.instance_for_test() as instance:
        data = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
    assert len(data.run_requests) == 1 and data.run_requests[0].job_name in (None, "retraining")


def test_workspace_and_dg_load_the_same_code_location():
    """workspace.yaml (`dagster dev`), `[tool.dagster]` and `[tool.dg.project]` all name
    carl_assets/definitions.py, whose `defs` is the project's Definitions."""
    from carl_assets.definitions import defs

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    repo = Path(__file__).resolve().parents[1]
    workspace = yaml.safe_load((repo / "workspace.yaml").read_text())
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    assert workspace["load_from"] == [
        {
            "python_module": {
                "module_name": "carl_assets.definitions",
                "working_directory": ".",
                "location_name": "carl_assets",
            }
        }
    ]
    assert pyproject["tool"]["dagster"]["module_name"] == "carl_assets.definitions"
    project = pyproject["tool"]["dg"]["project"]
    assert (project["code_location_target_module"], project["code_location_name"]) == (
        "carl_assets.definitions",
        "carl_assets",
    )  # one name for the location in `dg` and in `dagster dev`
    assert isinstance(defs(), dg.Definitions)


def _evaluate(
    sensor: dg.SensorDefinition, cursor: str | None
) -> tuple[list[dg.RunRequest], str | None, list]:
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, cursor=cursor)
        data = sensor.evaluate_tick(context)
    return list(data.run_requests or []), data.cursor, list(data.asset_events or [])


def test_sensor_fires_once_per_change_of_a_memory_file(graph, tmp_path, monkeypatch):
    defs, _ = graph
    sensor = defs.resolve_sensor_def("memory_graph_changed")
    memory = tmp_path / "memory.jsonl"
    memory.write_text('{"type":"entity","name":"a","entityType":"journal","observations":["x"]}\n')
    monkeypatch.setenv("CARL_MEMORY_SOURCE", f"jsonl:{memory}")

    requests, cursor, events = _evaluate(sensor, None)
    assert requests == [] and cursor  # the first look only records the fingerprint
    assert events and events[0].asset_key == dg.AssetKey("memory_source")
    assert _evaluate(sensor, cursor)[0] == []  # unchanged: nothing
    memory.write_text(
        memory.read_text() + '{"type":"entity","name":"b","entityType":"journal","observations":["y"]}\n'
    )
    requests, changed, _ = _evaluate(sensor, cursor)
    assert sorted(r.job_name for r in requests) == ["retraining", "steering_refresh"]
    assert changed != cursor and all(changed in r.run_key for r in requests)
    assert _evaluate(sensor, changed)[0] == []  # once per change


def test_sensor_skips_with_a_reason_when_the_source_is_unreadable(graph, tmp_path, monkeypatch):
    defs, _ = graph
    monkeypatch.setenv("CARL_MEMORY_SOURCE", f"jsonl:{tmp_path / 'missing.jsonl'}")
    with dg.instance_for_test() as instance:
        data = defs.resolve_sensor_def("memory_graph_changed").evaluate_tick(
            dg.build_sensor_context(instance=instance, cursor="abc")
        )
    assert not data.run_requests and "cannot read the memory source" in (data.skip_message or "")


def test_sensor_fires_once_per_change_of_a_live_mcp_server(graph, tmp_path, monkeypatch):
    from tests.test_mcp_source import _server_binary

    binary = _server_binary()
    memory = tmp_path / "served.jsonl"
    memory.write_text(
        json.dumps({"type": "entity", "name": "a", "entityType": "journal", "observations": ["x"]}) + "\n"
    )
    source = f"mcp+stdio:MEMORY_FILE_PATH={shlex.quote(str(memory))} {shlex.quote(binary)}"
    monkeypatch.setenv("CARL_MEMORY_SOURCE", source)
    sensor = graph[0].resolve_sensor_def("memory_graph_changed")
    _, cursor, _ = _evaluate(sensor, None)
    assert _evaluate(sensor, cursor)[0] == []
    # the server serves what is in its file: a new memory changes the graph it reads
    with memory.open("a") as handle:
        handle.write(
            json.dumps({"type": "entity", "name": "b", "entityType": "lesson", "observations": ["y"]}) + "\n"
        )
    requests, changed, _ = _evaluate(sensor, cursor)
    assert sorted(r.job_name for r in requests) == ["retraining", "steering_refresh"] and changed != cursor
    assert _evaluate(sensor, changed)[0] == []


def test_a_run_without_config_reads_the_memory_source_from_the_environment(tmp_path, monkeypatch):
    from carl_assets import storage
    from carl_assets.defs.memory import memory_graph
    from carl_assets.defs.resources import build_resources

    memory = tmp_path / "mine.jsonl"
    memory.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {
                    "type": "entity",
                    "name": "only-mine",
                    "entityType": "journal",
                    "observations": ["A memory that exists only in this file.", "warmth:9"],
                },
                {
                    "type": "entity",
                    "name": "also-mine",
                    "entityType": "lesson",
                    "observations": ["Another one."],
                },
                {"type": "relation", "from": "only-mine", "to": "also-mine", "relationType": "taught"},
            ]
        )
        + "\n"
    )
    monkeypatch.setenv("CARL_MEMORY_SOURCE", f"jsonl:{memory}")
    result = dg.materialize([memory_graph], resources=build_resources(tmp_path / "home"))  # no run config
    assert result.success
    nodes = storage.read_table(tmp_path / "home" / storage.DATABASE_NAME, "memory_nodes")
    assert sorted(nodes["node_id"]) == ["also-mine", "only-mine"]
    meta = result.asset_materializations_for_node("memory_graph")[0].metadata
    assert meta["source"].value == f"jsonl:{memory}" and meta["source_kind"].value == "file"


def test_a_real_preset_job_refuses_the_offline_base_model():
    """`retraining_real` does not rebuild base_model: on a home whose base_model is the offline model it
    would train that model with SmolLM2's budgets. Both real jobs carry the preset tag, and the check
    dream_scenarios runs refuses exactly that combination, naming what to run instead."""
    from carl_assets.defs.presets import PRESET_TAG, check_preset_model

    defs = build_definitions()
    for name in ("retraining_real", "carl_all_real"):
        assert defs.resolve_job_def(name).tags.get(PRESET_TAG) == "real"
    assert PRESET_TAG not in defs.resolve_job_def("retraining").tags
    with pytest.raises(ValueError, match="carl_all_real"):
        check_preset_model({PRESET_TAG: "real"}, base_is_offline=True)
    check_preset_model({PRESET_TAG: "real"}, base_is_offline=False)  # the real model: fine
    check_preset_model({}, base_is_offline=True)  # an offline job on the offline model: fine
