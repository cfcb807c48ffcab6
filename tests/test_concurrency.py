"""Concurrency: overlapping runs through `dagster dev` and the multiprocess executor, the pools that keep
trainings apart, the one writer of dagster.yaml, and the run-scoped reads of versioned artifacts.

The slow test launches the whole graph (every asset and check) with the tiny config, and while it runs
launches it a second time; both must succeed (no DuckDB lock failure), steps of one pool must never
overlap across the runs, the tables appended across runs must hold one entry per run, and every kept
artifact version must belong to the run that made it and load whole.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from carl_assets import storage
from carl_assets.artifacts import VERSION_FILE, ArtifactVersions
from carl_assets.dagster_instance import POOL_LIMIT, write_dagster_yaml
from carl_assets.defs import build_definitions
from carl_assets.defs.pools import LEDGER_POOL, POOLED, TRAINING_POOL
from carl_assets.defs.resources import ArtifactStore

# --------------------------------------------------------------------------------------------
# dagster.yaml: one writer, Dagster reads what it writes, a user's file is only added to.
# --------------------------------------------------------------------------------------------


def test_dagster_yaml_is_written_once_and_read_by_dagster(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    first = write_dagster_yaml(home)
    assert first.created and first.added == ["telemetry", "concurrency"] and first.kept == {}
    text = first.path.read_text()
    assert text.startswith("telemetry:")  # as earlier versions wrote it
    assert yaml.safe_load(text) == {
        "telemetry": {"enabled": False},
        "concurrency": {"pools": {"granularity": "op", "default_limit": 1}},
    }
    again = write_dagster_yaml(home)
    assert not again.created and again.added == [] and again.kept == {}
    assert again.path.read_text() == text  # idempotent: nothing rewritten

    with dg.DagsterInstance.from_config(
        str(home)
    ) as instance:  # reads <home>/dagster.yaml, as DAGSTER_HOME does
        pools = instance.get_concurrency_config().pool_config
        assert pools.default_pool_limit == POOL_LIMIT == 1
        assert pools.pool_granularity.value == "op"
        assert instance.global_op_concurrency_default_limit == 1


def test_existing_dagster_yaml_gets_only_missing_sections(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    user = "# my instance\nconcurrency:\n  pools:\n    default_limit: 3\nrun_monitoring:\n  enabled: true"
    (home / "dagster.yaml").write_text(user)  # no trailing newline: the addition must still parse
    result = write_dagster_yaml(home)
    assert not result.created and result.added == ["telemetry"]
    assert result.kept == {
        "concurrency.pools.granularity": (None, "op"),
        "concurrency.pools.default_limit": (3, 1),
    }
    text = (home / "dagster.yaml").read_text()
    assert text.startswith(user + "\n")  # the user's text, comments included, untouched
    loaded = yaml.safe_load(text)
    assert loaded["concurrency"] == {"pools": {"default_limit": 3}}  # their limit kept
    assert loaded["telemetry"] == {"enabled": False} and loaded["run_monitoring"] == {"enabled": True}
    assert write_dagster_yaml(home).added == []


@pytest.mark.parametrize(
    "content, message",
    [("- a\n- b\n", "must be a YAML mapping"), ("telemetry: [unclosed\n", "is not valid YAML")],
)
def test_unreadable_dagster_yaml_is_named(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "dagster.yaml").write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        write_dagster_yaml(tmp_path)
    assert str(tmp_path / "dagster.yaml") in str(info.value)
    assert (tmp_path / "dagster.yaml").read_text() == content


# --------------------------------------------------------------------------------------------
# Pools on the steps, and artifacts read from the run's own version.
# --------------------------------------------------------------------------------------------


def step_pools(home: Path) -> dict[str, str | None]:
    """Step key -> pool of every step of the whole graph (each asset's and each separate check's op; an op's
    name is its step key), as the Definitions declare them through public APIs."""
    defs = build_definitions(home=home)
    nodes = [
        d for d in [*(defs.assets or []), *(defs.asset_checks or [])] if isinstance(d, dg.AssetsDefinition)
    ]
    return {d.op.name: d.op.pool for d in nodes}


def test_pooled_assets_are_the_expected_ones_and_dagster_plans_them_so(tmp_path: Path) -> None:
    pools = step_pools(tmp_path)
    pooled = {key: pool for key, pool in pools.items() if pool}
    assert pooled == {asset: pool for pool, assets in POOLED.items() for asset in assets}
    assert {k for k, p in pooled.items() if p == TRAINING_POOL} == {
        "base_model",
        "scorer_validation",
        "dream_scenarios",
        "sft_checkpoint",
        "grpo_checkpoint",
        "leworld_model",
    }
    assert {k for k, p in pooled.items() if p == LEDGER_POOL} == {"crystallization_events"}
    assert pools["steering_vectors"] is None and pools["memory_graph"] is None  # cheap steps run freely
    # The job Dagster runs holds the same ops, so its steps carry these pools.
    job = build_definitions(home=tmp_path).resolve_job_def("carl_all")
    assert {op.name: op.pool for op in job.graph.node_defs if op.pool} == pooled


def test_made_by_finds_the_runs_own_version(tmp_path: Path) -> None:
    versions = ArtifactVersions(tmp_path / "a", "a")
    assert versions.made_by("abcdef12-0000") is None  # nothing written yet
    for run_id in ("abcdef12-0000", "abcdef12-9999", "ffff0000-1111"):  # two share the 8-char tag
        with versions.write(run_id=run_id) as (tmp, _):
            (tmp / "x.txt").write_text(run_id)
    names = versions.names()
    assert versions.made_by("abcdef12-0000") == names[0]
    assert versions.made_by("abcdef12-9999") == names[1]
    assert versions.current_name() == names[2]
    assert versions.made_by("00000000-none") is None


def test_a_step_reads_its_own_runs_upstream_not_current(tmp_path: Path) -> None:
    """`current` moves to another run's version between two steps of one run: the downstream step still
    reads the version its own run made; outside any run, `current` is read."""

    @dg.asset
    def up(context, artifacts: ArtifactStore) -> str:
        with artifacts.write_version("up", run_id=context.run.run_id) as (tmp, name):
            (tmp / "who.txt").write_text(context.run.run_id)
        with artifacts.write_version("up", run_id="another-run") as (tmp, _):  # an overlapping run
            (tmp / "who.txt").write_text("another-run")
        return name

    @dg.asset(deps=[up])
    def down(context, artifacts: ArtifactStore) -> str:
        return artifacts.require("up", "who.txt").read_text()

    store = ArtifactStore(home=str(tmp_path))
    result = dg.materialize([up, down], resources={"artifacts": store})
    assert result.success
    assert result.output_for_node("down") == result.run_id
    assert (store.path("up") / "who.txt").read_text() == "another-run"  # no run: current
    table = storage.read_table(store.database, "artifact_versions")
    assert sorted(table["run_id"]) == sorted([result.run_id, "another-run"])


# --------------------------------------------------------------------------------------------
# Two overlapping whole-graph runs through dagster dev.
# --------------------------------------------------------------------------------------------

LAUNCH_MUTATION = """
mutation Launch($params: ExecutionParams!) { launchPipelineExecution(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId } }
  ... on PythonError { message } ... on RunConfigValidationInvalid { errors { message } } } }
"""

RUN_QUERY = """
query Run($runId: ID!) { runOrError(runId: $runId) { __typename ... on Run {
  status startTime endTime stepStats { stepKey status startTime endTime } } } }
"""

# Assets materialized by every whole-graph run that write a version folder, and their weights files.
VERSIONED = (
    "base_model",
    "steering_vectors",
    "sft_dataset",
    "sft_checkpoint",
    "grpo_checkpoint",
    "leworld_memory",
    "leworld_dataset",
    "leworld_model",
)
# The second run: everything but the LeWorld branch (the retraining chain, steering and the base model),
# so that the two runs fit the test's time on a 2-core box while sharing every pooled training asset.
SECOND_RUN_SKIPS = ("leworld_memory", "leworld_dataset", "leworld_model", "leworld_evaluation")
RUN_TIMEOUT_S = 420

RUN_ERRORS_QUERY = """
query RunErrors($runId: ID!) { runOrError(runId: $runId) { ... on Run { eventConnection(afterCursor: null) {
  events { __typename
    ... on ExecutionStepFailureEvent { stepKey error { ...E cause { ...E cause { ...E } } } }
    ... on RunFailureEvent { message } } } } } }
fragment E on PythonError { message stack }
"""


def run_errors(server, run_id: str) -> str:
    """Each failed step's error with its causes (the user code's exception is the cause)."""
    events = server.query(RUN_ERRORS_QUERY, {"runId": run_id})["runOrError"]["eventConnection"]["events"]
    lines = []
    for event in events:
        error = event.get("error")
        while error:
            lines.append(
                f"{event.get('stepKey')}: {error['message']}\n{''.join(error.get('stack') or [])[-1500:]}"
            )
            error = error.get("cause")
    return "\n".join(lines) or "(no step errors)"


def launch(server, assets: list[str], checks: list[tuple[str, str]], run_config: dict) -> str:
    params = {
        "selector": {
            "repositoryLocationName": server.location,
            "repositoryName": server.repository,
            "jobName": "__ASSET_JOB",
            "assetSelection": [{"path": [asset]} for asset in assets],
            "assetCheckSelection": [{"assetKey": {"path": [asset]}, "name": name} for asset, name in checks],
        },
        "runConfigData": run_config,
    }
    result = server.query(LAUNCH_MUTATION, {"params": params})["launchPipelineExecution"]
    assert result["__typename"] == "LaunchRunSuccess", f"launch refused: {result}"
    return result["run"]["runId"]


def run_info(server, run_id: str) -> dict:
    return server.query(RUN_QUERY, {"runId": run_id})["runOrError"]


def wait_until(predicate, what: str, server, timeout: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(
                f"{what} not reached after {timeout:.0f} s; dagster dev log tail:\n{server.log_tail()}"
            )
        time.sleep(1.0)


def overlaps(intervals: list[tuple[float, float, str]]) -> list[tuple[str, str]]:
    """Pairs of (start, end, label) intervals that overlap in time."""
    ordered = sorted(intervals)
    return [(a[2], b[2]) for a, b in zip(ordered, ordered[1:], strict=False) if b[0] < a[1]]


def max_parallel(intervals: list[tuple[float, float]]) -> int:
    edges = sorted(
        [(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1])
    )
    running = best = 0
    for _, step in edges:
        running += step
        best = max(best, running)
    return best


@pytest.mark.slow
def test_two_overlapping_whole_graph_runs(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from tests.dagster_dev import DagsterDev, isolated_env
    from tests.test_ui import expected_graph
    from tests.tiny_run import TINY

    carl_home, dagster_home = tmp_path / "carl_home", tmp_path / "dagster_home"
    carl_home.mkdir()
    write_dagster_yaml(dagster_home)
    env_file = tmp_path / "empty.env"
    env_file.write_text("# the test sets every variable itself\n")
    env = isolated_env(
        CARL_HOME=str(carl_home),
        DAGSTER_HOME=str(dagster_home),
        CARL_ENV_FILE=str(env_file),
        CARL_MEMORY_SOURCE="sample",
        OMP_NUM_THREADS="1",
    )
    started = time.monotonic()
    server = DagsterDev(env, cwd=tmp_path / "cwd", log_path=tmp_path / "dagster_dev.log")
    try:
        server.launch()
        deps, _, checks = expected_graph(carl_home)  # while dagster dev boots
        pools = step_pools(carl_home)
        server.wait_until_loaded()
        assets = sorted(a for a in deps if a != "memory_source")  # the observable source is not materialized
        check_keys = [(asset, name) for asset in assets for name in sorted(checks[asset])]

        # Launched back to back: both run workers start together and their steps interleave.
        first = launch(server, assets, check_keys, TINY)
        second_assets = [a for a in assets if a not in SECOND_RUN_SKIPS]
        second_config = {"ops": {k: v for k, v in TINY["ops"].items() if k in second_assets}}
        second = launch(
            server, second_assets, [c for c in check_keys if c[0] in second_assets], second_config
        )
        runs = {}
        for run_id in (first, second):
            wait_until(
                lambda r=run_id: run_info(server, r)["status"] in ("SUCCESS", "FAILURE", "CANCELED"),
                f"the end of run {run_id}",
                server,
            )
            runs[run_id] = run_info(server, run_id)
            assert runs[run_id]["status"] == "SUCCESS", f"run {run_id}:\n{run_errors(server, run_id)}"
    finally:
        server.stop()
    elapsed = time.monotonic() - started

    # The runs overlapped, and steps ran side by side (the multiprocess executor, two runs).
    a, b = runs[first], runs[second]
    assert b["startTime"] < a["endTime"], "the second run started after the first ended: nothing overlapped"
    steps = {run_id: {s["stepKey"]: s for s in run["stepStats"]} for run_id, run in runs.items()}
    launched = {k for k in pools if k != "memory_source"}  # the observable source is not materialized
    planned = {first: launched, second: {k for k in launched if not k.startswith(SECOND_RUN_SKIPS)}}
    for run_id, by_key in steps.items():
        assert set(by_key) == planned[run_id], (
            f"run {run_id}: steps {sorted(set(by_key) ^ planned[run_id])} differ"
        )
        assert all(s["status"] == "SUCCESS" for s in by_key.values())
    every = [(s["startTime"], s["endTime"]) for by_key in steps.values() for s in by_key.values()]
    parallel = max_parallel(every)
    assert parallel >= 2, "no two steps ever ran at once"

    # A pool's steps never overlap, within a run or across the two.
    for pool in set(p for p in pools.values() if p):
        intervals = [
            (s["startTime"], s["endTime"], f"{run_id[:8]}:{key}")
            for run_id, by_key in steps.items()
            for key, s in by_key.items()
            if pools[key] == pool
        ]
        assert len(intervals) == sum(1 for keys in planned.values() for k in keys if pools[k] == pool)
        assert overlaps(intervals) == [], f"pool {pool!r} steps overlapped: {overlaps(intervals)}"

    # No rows lost: the tables appended across runs hold one entry per run.
    db = carl_home / storage.DATABASE_NAME
    both = sorted([first, second])
    events = storage.read_table(db, "crystallization_events")
    assert sorted(events["run_id"]) == both
    training_log = storage.read_table(db, "training_log")
    cycles = storage.read_table(db, "dream_cycles")
    assert sorted(cycles["run_id"]) == both and sorted(cycles["cycle"]) == [0, 1]
    rows_checked = len(events) + len(training_log) + len(cycles)

    # Every kept version belongs to the run that made it, is listed in artifact_versions, and loads whole.
    table = storage.read_table(db, "artifact_versions")
    store = ArtifactStore(home=str(carl_home))
    made: dict[tuple[str, str], str] = {}
    tensors = 0
    for asset in VERSIONED:
        listed = table[table["asset"] == asset]
        makers = [first] if asset.startswith(SECOND_RUN_SKIPS) else both
        assert sorted(listed["run_id"]) == makers, (
            f"{asset}: artifact_versions lists runs {sorted(listed['run_id'])}"
        )
        versions = store.versions(asset)
        assert sorted(listed["version"]) == versions.names()
        for row in listed.itertuples():
            meta = json.loads((Path(row.path) / VERSION_FILE).read_text())
            assert meta["run_id"] == row.run_id and meta["version"] == row.version
            assert row.version.split("-", 1)[1].startswith(row.run_id.replace("-", "")[:8])
            made[(asset, row.run_id)] = row.version
            for file in sorted(Path(row.path).rglob("*.safetensors")):
                loaded = load_file(str(file))
                assert loaded, f"{file} holds no tensors"
                assert all(math.isfinite(float(t.float().abs().sum())) for t in loaded.values()), file
                tensors += len(loaded)
        rows_checked += len(listed)
    for run_id in both:
        # the run's checkpoints were made from its own upstream versions, not the other run's
        sft = store.versions("sft_checkpoint").info(made[("sft_checkpoint", run_id)])
        grpo = store.versions("grpo_checkpoint").info(made[("grpo_checkpoint", run_id)])
        assert sft.parents["sft_dataset"] == made[("sft_dataset", run_id)]
        assert grpo.parents["sft_checkpoint"] == made[("sft_checkpoint", run_id)]
        assert grpo.parents["sft_dataset"] == made[("sft_dataset", run_id)]
        log = json.loads((Path(sft.path) / "training_log.json").read_text())
        assert log["run_id"] == run_id
        assert (training_log["run_id"] == run_id).sum() == len(log["log_history"]) > 0

    print(
        f"[concurrency] runs overlapped: 2 (second started {b['startTime'] - a['startTime']:.1f} s after the "
        f"first, {a['endTime'] - b['startTime']:.1f} s of overlap); steps: {len(every)} "
        f"({len(planned[first])} + {len(planned[second])}), at most {parallel} at once; "
        f"rows checked: {rows_checked}; "
        f"tensors loaded: {tensors}; wall {elapsed:.0f} s",
        flush=True,
    )
