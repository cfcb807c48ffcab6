"""Lineage that tells the truth: every read an asset (or check) makes is of itself or of an upstream asset it
declares, so the UI's edges and staleness are the real ones. The whole offline graph runs in process with
storage instrumented: each DuckDB table read and each artifact version look-up is recorded against the step
that made it; the test lists every read of an asset that is not declared. Also the IO manager's handles:
they name the version this run made even when an overlapping run promoted another `current`."""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict

import dagster as dg
import pandas as pd
import pytest

from carl_assets import artifacts as artifacts_module
from carl_assets import storage
from carl_assets.defs import artifact_store as artifact_store_module
from carl_assets.defs import build_definitions
from carl_assets.defs import resources as resources_module
from carl_assets.defs.io_manager import ArtifactIOManager
from carl_assets.defs.resources import VERSIONS_TABLE, ArtifactStore
from carl_assets.handles import (
    CYCLE_BACK_EDGES,
    TABLE_OWNERS,
    AssetHandle,
    Checkpoint,
    DatasetVersion,
    make_handle,
    table_owners,
)
from tests.test_pipeline_cli import TINY

_local = threading.local()
# The whole graph at its smallest (test_pipeline_cli's TINY, with fewer pairs and a short scorer validation):
# what is read matters here, not how well anything trains.
SMALL = {
    "ops": {
        **TINY["ops"],
        "emotion_training_pairs": {"config": {"max_examples_per_emotion": 24}},
        "scorer_validation": {"config": {"n_prompts": 3, "max_tokens": 8, "n_bootstrap": 20}},
    }
}


def _reader() -> tuple[str, str]:
    """(kind, name) of the step running now: ('asset', asset) or ('check', 'asset:check'); ('none', '')
    outside a step."""
    try:
        context = dg.AssetExecutionContext.get()  # documented: the running step's context
    except Exception:  # noqa: BLE001 - no step context in this thread
        context = None
    if context is None:
        return "none", ""
    checks = context.selected_asset_check_keys
    if context.has_assets_def and context.assets_def.keys:
        return "asset", context.assets_def.key.path[-1]
    if checks:
        key = next(iter(checks))
        return "check", f"{key.asset_key.path[-1]}:{key.name}"
    return "op", context.op_execution_context.op_def.name


class ReadLog:
    """Reads seen while the graph ran: (reader kind, reader, target asset) -> what was read."""

    def __init__(self) -> None:
        self.reads: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        self.writes: set[tuple[str, str, str]] = set()  # (reader kind, reader, table)

    def note(self, targets: tuple[str, ...], what: str) -> None:
        if getattr(_local, "quiet", 0):
            return
        kind, name = _reader()
        if name.split(":")[0] in targets:  # a table several assets write: each reads its own rows
            targets = (name.split(":")[0],)
        for target in targets or ("<no owner>",):
            self.reads[(kind, name, target)].add(what)


def _instrument(monkeypatch: pytest.MonkeyPatch, log: ReadLog) -> None:
    """Wrap the storage reads: DuckDB tables (target: the table's owner) and artifact version look-ups
    (target: the artifact's asset). The store's own bookkeeping (the artifact_versions listing) is quiet."""
    select = storage.select_table

    def select_table(con, name, where="the database"):
        log.note(table_owners(name), f"table {name}")
        return select(con, name, where)

    monkeypatch.setattr(storage, "select_table", select_table)
    write = storage.write_table

    def write_table(con, name, df):
        log.writes.add((*_reader(), name))
        return write(con, name, df)

    monkeypatch.setattr(storage, "write_table", write_table)
    for method in ("path", "made_by", "info", "current_name"):
        original = getattr(artifacts_module.ArtifactVersions, method)

        def wrapped(self, *args, _original=original, _method=method, **kwargs):
            log.note((self.asset,), f"artifact {_method}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(artifacts_module.ArtifactVersions, method, wrapped)
    listing = artifacts_module.all_versions

    def all_versions(home):
        _local.quiet = getattr(_local, "quiet", 0) + 1
        try:
            return listing(home)
        finally:
            _local.quiet -= 1

    monkeypatch.setattr(artifact_store_module, "all_versions", all_versions)
    latest = dg.DagsterInstance.get_latest_materialization_event

    def latest_event(self, asset_key):
        log.note((asset_key.path[-1],), "latest materialization metadata")
        return latest(self, asset_key)

    monkeypatch.setattr(dg.DagsterInstance, "get_latest_materialization_event", latest_event)


def _declared(
    defs: dg.Definitions,
) -> tuple[dict[tuple[str, str], set[str]], dict[tuple[str, str], set[str]]]:
    """Per (reader kind, reader): (the assets it may read, the assets it has an edge to). It may read itself
    and the upstream assets it takes as inputs (`ins`, a check's `additional_ins`: values, i.e. handles); an
    edge from `deps` orders it after an asset and shows in the UI, but a read through it bypasses the
    handle's run-scoped version."""
    inputs: dict[tuple[str, str], set[str]] = {}
    edges: dict[tuple[str, str], set[str]] = {}
    for spec in defs.resolve_all_asset_specs():
        edges[("asset", spec.key.path[-1])] = {spec.key.path[-1]} | {d.asset_key.path[-1] for d in spec.deps}
    for definition in [*(defs.assets or []), *(defs.asset_checks or [])]:
        if not isinstance(definition, dg.AssetsDefinition):
            continue
        # an input's name is the upstream asset's name here (`ins={"base_model": dg.AssetIn()}`)
        values = {name for name, op_in in definition.op.ins.items() if not op_in.dagster_type.is_nothing}
        for key in definition.keys:
            inputs[("asset", key.path[-1])] = {key.path[-1]} | values
        for check in definition.check_specs:
            name, reader = check.asset_key.path[-1], ("check", f"{check.asset_key.path[-1]}:{check.name}")
            edges[reader] = {name} | {d.asset_key.path[-1] for d in check.additional_deps}
            inputs[reader] = {name} | (values if not list(definition.keys) else set())
    return inputs, edges


def _materialize_all(defs: dg.Definitions, run_config: dict | None = None) -> dg.ExecuteInProcessResult:
    """Every asset and check of `defs` in this process (so the instruments see every read). The observable
    memory source is left out: it is observed, not materialized, and memory_graph only orders after it."""
    assets = [a for a in defs.assets or [] if isinstance(a, dg.AssetsDefinition)]
    return dg.materialize(
        [*assets, *(defs.asset_checks or [])],
        resources=defs.resources,
        run_config=run_config,
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def undeclared_reads(log: ReadLog, declared: tuple[dict, dict]) -> list[str]:
    """One line per (reader, target) pair that is neither the reader itself nor one of its inputs, naming
    what was read and whether the graph has at least an edge (a `deps`) for it."""
    inputs, edges = declared
    lines = []
    for (kind, reader, target), what in sorted(log.reads.items()):
        if kind == "none":  # e.g. a worker thread without the step's context: the reader is unknown
            lines.append(f"a read outside any step of {target} ({', '.join(sorted(what))}): reader unknown")
            continue
        if target in inputs.get((kind, reader), {reader}):
            continue
        how = (
            "through a dep, not an input"
            if target in edges.get((kind, reader), set())
            else "without declaring it"
        )
        lines.append(f"{kind} {reader} reads {target} ({', '.join(sorted(what))}) {how}")
    return lines


@pytest.mark.slow
def test_every_read_is_of_the_asset_itself_or_a_declared_upstream(tmp_path, monkeypatch):
    defs = build_definitions(tmp_path / "carl")
    log = ReadLog()
    _instrument(monkeypatch, log)
    result = _materialize_all(defs, SMALL)
    against = {
        f"asset {reader} reads {upstream} " for reader, ups in CYCLE_BACK_EDGES.items() for upstream in ups
    }
    offenders = [
        line for line in undeclared_reads(log, _declared(defs)) if not line.startswith(tuple(against))
    ]
    assert not offenders, f"{len(offenders)} undeclared reads:\n" + "\n".join(offenders)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    # TABLE_OWNERS is what the assets really write (the handles refuse any other table)
    written = {
        (reader, table) for kind, reader, table in log.writes if kind == "asset" and table != VERSIONS_TABLE
    }
    assert written == {(asset, table) for asset, tables in TABLE_OWNERS.items() for table in tables}
    readers = {reader for kind, reader, _ in log.reads if kind == "asset"}
    # the instrument sees reads at all: these readers read an upstream table or artifact
    assert {"emotion_training_pairs", "steering_vectors", "sft_checkpoint", "agent_evaluation"} <= readers


def test_the_instrument_catches_a_read_of_an_undeclared_table(tmp_path, monkeypatch):
    """Proof that the instrumented test can fail: an asset that reads memory_nodes without declaring
    memory_graph is listed (the shape of steering_vectors' read before the lineage work), and so is one that
    only orders after it (`deps`); one that takes it as an input and reads its handle is not."""

    @dg.asset
    def memory_graph(duckdb: resources_module.DuckDBResource) -> dg.MaterializeResult:
        resources_module.write_tables(duckdb, {"memory_nodes": pd.DataFrame({"node_id": ["a"]})})
        return dg.MaterializeResult()

    @dg.asset(ins={"memory_graph": dg.AssetIn()})
    def by_input(memory_graph: AssetHandle) -> dg.MaterializeResult:
        assert memory_graph.read("memory_nodes")["node_id"].tolist() == ["a"]
        return dg.MaterializeResult()

    @dg.asset(deps=[memory_graph])
    def by_dep(duckdb: resources_module.DuckDBResource) -> dg.MaterializeResult:
        resources_module.read_table(duckdb, "memory_nodes")
        return dg.MaterializeResult()

    @dg.asset
    def hidden(duckdb: resources_module.DuckDBResource) -> dg.MaterializeResult:
        with contextlib.suppress(LookupError):  # it may run before memory_graph: nothing orders them
            resources_module.read_table(duckdb, "memory_nodes")
        return dg.MaterializeResult()

    defs = dg.Definitions(
        assets=[memory_graph, by_input, by_dep, hidden], resources=resources_module.build_resources(tmp_path)
    )
    log = ReadLog()
    _instrument(monkeypatch, log)
    result = _materialize_all(defs)
    assert result.success
    assert ("asset", "by_input", "memory_graph") in log.reads  # seen, and allowed
    assert undeclared_reads(log, _declared(defs)) == [
        "asset by_dep reads memory_graph (table memory_nodes) through a dep, not an input",
        "asset hidden reads memory_graph (table memory_nodes) without declaring it",
    ]


def test_a_handle_names_this_runs_version_when_an_overlapping_run_promoted_another(tmp_path):
    """Run A makes a base_model version; run B (overlapping) makes another and promotes it to `current`;
    A's downstream step still receives A's version, B's receives B's, and a run that made none gets
    current."""
    store = ArtifactStore(home=str(tmp_path))
    with store.write_version("base_model", run_id="aaaaaaaa-run-a") as (tmp, version_a):
        (tmp / "weights").write_text("A")
    with store.write_version("base_model", run_id="bbbbbbbb-run-b") as (tmp, version_b):
        (tmp / "weights").write_text("B")
    assert store.versions("base_model").current_name() == version_b != version_a
    handle_a = store.handle("base_model", run_ids=("aaaaaaaa-run-a",))
    assert isinstance(handle_a, Checkpoint) and handle_a.version == version_a
    assert handle_a.file("weights").read_text() == "A"
    assert handle_a.version_info["run_id"] == "aaaaaaaa-run-a"  # the path and its record agree
    assert store.handle("base_model", run_ids=("bbbbbbbb-run-b",)).file("weights").read_text() == "B"
    assert store.handle("base_model", run_ids=("cccccccc-run-c",)).version == version_b
    assert store.handle("sft_dataset").path is None and isinstance(
        store.handle("sft_dataset"), DatasetVersion
    )
    with pytest.raises(FileNotFoundError, match="sft_dataset"):
        store.handle("sft_dataset").file("dataset")


def test_the_io_manager_hands_the_downstream_step_its_runs_version(tmp_path):
    """Through Dagster: `up` writes its version, then another run promotes a newer `current` before `down`
    loads its input; `down` receives up's version of this run, and reading a table up does not write is
    refused naming the owner."""
    store = ArtifactStore(home=str(tmp_path))
    seen = {}

    @dg.asset(name="base_model")
    def up(artifacts: ArtifactStore) -> dg.MaterializeResult:
        with artifacts.write_version("base_model") as (tmp, version):
            (tmp / "weights").write_text("this run")
        seen["made"] = version
        with ArtifactStore(home=str(tmp_path)).write_version("base_model", run_id="zzzzzzzz-other") as (
            tmp,
            other,
        ):
            (tmp / "weights").write_text("other run")
        seen["other"] = other
        return dg.MaterializeResult()

    @dg.asset(ins={"base_model": dg.AssetIn()})
    def down(base_model: Checkpoint, artifacts: ArtifactStore) -> dg.MaterializeResult:
        seen["received"] = base_model
        # the store's own reads resolve the same version: a path and its _version.json never disagree
        seen["store"] = (artifacts.path("base_model").name, artifacts.info("base_model").version)
        return dg.MaterializeResult()

    result = dg.materialize(
        [up, down], resources={"artifacts": store, "io_manager": ArtifactIOManager(home=str(tmp_path))}
    )
    assert result.success
    received = seen["received"]
    assert store.versions("base_model").current_name() == seen["other"]
    assert received.version == seen["made"] and received.file("weights").read_text() == "this run"
    assert seen["store"] == (seen["made"], seen["made"])
    assert store.info("base_model").version == seen["other"]  # outside the run: current
    with pytest.raises(KeyError, match="memory_graph"):
        received.read("memory_nodes")
    assert set(TABLE_OWNERS) >= {"memory_graph", "base_model", "steering_vectors"}
    assert make_handle("memory_graph", None, None, tmp_path / "x.duckdb").tables[0] == "memory_nodes"
