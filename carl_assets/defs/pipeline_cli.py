"""What `carl materialize` and `carl lineage` do (their flags are parsed in carl_assets/cli/pipeline.py):
run the asset graph headless and inspect what it produced.

Runs go through the Dagster instance in `$DAGSTER_HOME` (default `./.dagster_home`), so a headless run
shows up in `dagster dev` with its logs, metadata and lineage.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import dagster as dg
import yaml

from carl_assets import storage
from carl_assets.artifacts import ArtifactVersionError, ArtifactVersions
from carl_assets.dagster_instance import write_dagster_yaml
from carl_assets.defs import build_definitions
from carl_assets.defs.config_check import asset_names, config_ok
from carl_assets.defs.jobs import ALL_JOB
from carl_assets.defs.memory_source import memory_source_observation
from carl_assets.defs.presets import merge_run_config, preset_run_config
from carl_assets.memory.graph import MemorySourceError
from carl_assets.project_env import env_path, memory_source_setting, normalise_memory_source
from carl_assets.provenance import CHECKPOINT_ASSETS, PROVENANCE_TABLE, nodes_behind

ALL = "*"


class PipelineUsageError(ValueError):
    """Bad arguments to a pipeline command: printed as one line, exit status 2."""


def ensure_dagster_home() -> Path:
    """`$DAGSTER_HOME` (default `./.dagster_home`) with the project's dagster.yaml (telemetry off, the
    `training` pool limited to 1); an existing file only gets the sections it lacks."""
    # Quoted, `~` or relative values are what a user's shell or .env may hold; Dagster wants an absolute path.
    home = env_path("DAGSTER_HOME") or Path(".dagster_home").resolve()
    try:
        written = write_dagster_yaml(home)
    except ValueError as exc:  # a dagster.yaml Dagster could not read either: say which file, no traceback
        raise SystemExit(f"carl: {exc}") from None
    if written.added and not written.created:
        print(f"{written.path}: added the project's {', '.join(written.added)} settings", file=sys.stderr)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def with_preset(preset: str | None, run_config: dict) -> dict:
    """`run_config` laid over the named preset's run config (no preset: `run_config` as it is)."""
    if preset is None:
        return run_config
    return merge_run_config(preset_run_config(preset), run_config)


def load_run_config(path: str | None) -> dict:
    """Read a run config file; a clear error if it is missing or not a mapping."""
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise PipelineUsageError(f"carl materialize: run config {path!r} does not exist")
    try:
        loaded = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:  # PyYAML names the stream "<unicode string>", not the file
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PipelineUsageError(
            f"carl materialize: run config {path!r} is not valid YAML: {problem}{where}") from None
    if not isinstance(loaded, dict):
        raise PipelineUsageError(f"carl materialize: run config {path!r} must be a mapping like "
                                 "{ops: {asset: {config: ...}}}")
    return loaded


def materialize(select: str = ALL, run_config: dict | None = None, job: str | None = None,
                user_config: dict | None = None) -> int:
    """Materialize the selection through the job `carl_all`, or run the job `job` itself (under its own
    name, with its own config under `run_config`); print a per-asset summary.

    `user_config`: the part of `run_config` the user wrote (`run_config` less a preset; None: all of it).
    Its `ops` entries for assets the run does not materialize are named in a warning; the preset's are
    dropped silently. A run config the assets' config classes refuse (`check_run_config`) is printed one
    line per problem and nothing runs: exit status 2."""
    defs = build_definitions()
    given = run_config or {}
    job_def, selection, selected, run_config = _plan(defs, select, given, job)
    scope = f"job {job}" if job is not None else f"--select {select!r}"
    if not config_ok(defs, run_config, given if user_config is None else user_config,
                     {key.to_user_string() for key in selected}, scope):
        return 2
    started = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        if dg.AssetKey("memory_graph") in selected:
            _observe_memory_source(instance, run_config)
        config = dict(run_config)
        # Dagster's DEBUG event stream drowns the assets' own progress lines; INFO keeps those.
        config.setdefault("loggers", {"console": {"config": {"log_level": "INFO"}}})
        result = job_def.execute_in_process(
            run_config=config, instance=instance, asset_selection=selection, raise_on_error=False
        )
        elapsed = time.perf_counter() - started
        _print_summary(instance, result, elapsed)
        _print_checks(result, _check_descriptions(defs))
    home = storage.carl_home()
    print(f"\nOutputs:  {home}/carl.duckdb (tables) and {home}/artifacts/<asset>/")
    print(f"Runs:     {os.environ['DAGSTER_HOME']} (run {result.run_id})")
    print("UI:       make dev   (dagster dev; then open http://localhost:3000, Assets -> Lineage)")
    return 0 if result.success else 1


def _plan(defs: dg.Definitions, select: str, run_config: dict, job: str | None
          ) -> tuple[dg.JobDefinition, list[dg.AssetKey] | None, set[dg.AssetKey], dict]:
    """The job to execute, its asset selection (None: all of it), the asset keys that will run and the run
    config to give Dagster (a job's: `job_run`)."""
    if job is not None:
        if select != ALL:
            raise PipelineUsageError("carl materialize: give --select or --job, not both")
        job_def, run_config = job_run(defs, job, run_config)
        return job_def, None, set(job_def.asset_layer.executable_asset_keys), run_config
    job_def = defs.resolve_job_def(ALL_JOB)
    selection = None if select == ALL else _resolve_selection(defs, select)
    return job_def, selection, set(selection or job_def.asset_layer.executable_asset_keys), run_config


def job_run(defs: dg.Definitions, job: str, run_config: dict) -> tuple[dg.JobDefinition, dict]:
    """The job named `job` and the run config to run it with: the job's own config (a preset job's budgets)
    with `run_config` laid over it, less the ops of graph assets the job does not select (a preset names
    every asset; Dagster refuses config for an op a job lacks). Raises PipelineUsageError for an unknown
    job."""
    names = [j.name for j in defs.jobs]
    if job not in names:
        raise PipelineUsageError(f"carl materialize: unknown job {job!r}; jobs: {', '.join(names)}")
    job_def = defs.resolve_job_def(job)
    config = merge_run_config(dict(job_def.run_config or {}), run_config)
    outside = asset_names(defs) - {key.to_user_string() for key in job_def.asset_layer.executable_asset_keys}
    ops = {name: value for name, value in (config.get("ops") or {}).items() if name not in outside}
    return job_def, {**config, "ops": ops} if "ops" in config else config


def _resolve_selection(defs: dg.Definitions, select: str) -> list[dg.AssetKey]:
    """The asset keys `select` names ('a,b': each part a Dagster selection, as `dagster asset materialize
    --select` takes them); PipelineUsageError when it is malformed or matches nothing."""
    graph = defs.resolve_asset_graph()
    try:
        resolved: set = set()
        for part in (part.strip() for part in select.split(",")):
            if part:
                resolved |= set(dg.AssetSelection.from_string(part).resolve(graph))
    except Exception as exc:  # Dagster's parse/resolve errors do not name the flag
        raise PipelineUsageError(f"carl materialize: bad --select {select!r}: {exc}") from None
    if not resolved:
        raise PipelineUsageError(f"carl materialize: --select {select!r} matches no asset")
    return sorted(resolved)


def _observe_memory_source(instance, run_config: dict) -> None:
    """Record the memory source's fingerprint as an observation of `memory_source` before the run, as the
    sensor does, so the lineage knows which version of the memories `memory_graph` read."""
    override = (((run_config.get("ops") or {}).get("memory_graph") or {}).get("config") or {}).get("source")
    source = normalise_memory_source(str(override or "")) or memory_source_setting()
    if source.startswith("mcp"):
        return  # a live server is read by memory_graph itself; fingerprinting it would read it twice
    try:
        _, observation = memory_source_observation(source)  # the one observation (defs/memory_source.py)
    except MemorySourceError:
        return  # memory_graph reports the error with its context
    instance.report_runless_asset_event(observation)


def _print_summary(instance, result, elapsed: float) -> None:
    starts: dict[str, float] = {}
    rows: list[tuple[str, str, float]] = []
    for entry in instance.all_logs(result.run_id):
        event = entry.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            starts[event.step_key] = entry.timestamp
        elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            ok = "ok" if event.event_type == dg.DagsterEventType.STEP_SUCCESS else "FAILED"
            rows.append((event.step_key, ok, entry.timestamp - starts.get(event.step_key, entry.timestamp)))
    checks = result.get_asset_check_evaluations()
    failed = [e.check_name for e in checks if not e.passed and e.severity == dg.AssetCheckSeverity.ERROR]
    warned = [e.check_name for e in checks if not e.passed and e.severity != dg.AssetCheckSeverity.ERROR]
    materialized = {e.step_key for e in result.all_events
                    if e.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION}
    # Check steps are folded into the count below; the table lists the assets.
    rows = [r for r in rows if r[0] in materialized or r[1] == "FAILED"]
    width = max([len(r[0]) for r in rows] + [5]) + 2
    print("\n" + "-" * (width + 18))
    print(f"{'asset':<{width}}{'status':<8}{'seconds':>10}")
    for step, ok, seconds in rows:
        print(f"{step:<{width}}{ok:<8}{seconds:>10.1f}")
    print(f"{'total':<{width + 8}}{elapsed:>10.1f}")
    print(f"asset checks: {len(checks) - len(failed) - len(warned)}/{len(checks)} passed"
          + (f"; failed: {', '.join(failed)}" if failed else "")
          + (f"; warnings: {', '.join(warned)}" if warned else ""))
    if not result.success:
        for event in result.get_step_failure_events():
            data = event.step_failure_data
            error = data.error
            if error is not None and error.cls_name == "DagsterAssetCheckFailedError":
                continue  # the failing checks are printed with their reasons below
            why = data.user_failure_data.description if data.user_failure_data and \
                data.user_failure_data.description else _root_cause(error)
            print(f"\n{event.step_key} failed: {why}", file=sys.stderr)


def _root_cause(error) -> str:
    """The asset's own exception behind Dagster's wrapper ('Error occurred while executing op ...')."""
    if error is None:
        return "unknown error"
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


def _check_descriptions(defs) -> dict:
    """What each asset check verifies (its definition's description), by check key."""
    out = {}
    for definition in [*(defs.assets or []), *(defs.asset_checks or [])]:
        for spec in getattr(definition, "check_specs", []) or []:
            out[spec.key] = spec.description
    return out


def _metadata_text(value, limit: int = 300) -> str:
    raw = getattr(value, "value", value)
    text = raw if isinstance(raw, str) else json.dumps(raw, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _print_checks(result, descriptions: dict) -> None:
    """Each check that did not pass: its name, what it checks, why it failed and its metadata (from the
    run's check evaluations), on stderr; a WARN-severity check says it did not block anything."""
    for evaluation in result.get_asset_check_evaluations():
        if evaluation.passed:
            continue
        error = evaluation.severity == dg.AssetCheckSeverity.ERROR
        key = evaluation.asset_check_key
        print(f"\ncheck {key.asset_key.to_user_string()}:{key.name} "
              + ("FAILED (blocks what is downstream)" if error else "WARNING (nothing blocked)"),
              file=sys.stderr)
        if descriptions.get(key):
            print(f"  checks: {descriptions[key]}", file=sys.stderr)
        print(f"  why:    {evaluation.description or '(the check gave no reason)'}", file=sys.stderr)
        for name, value in (evaluation.metadata or {}).items():
            print(f"  {name}: {_metadata_text(value)}", file=sys.stderr)


def _data_version(record_tags: dict[str, str]) -> str | None:
    return record_tags.get("dagster/data_version")


def _statuses(instance, graph, keys) -> dict:
    """Per asset: (materialized at, data version, status) from public instance APIs. An asset is stale
    when its code version changed since it was made, or an upstream's data version differs from the one
    it was made from; "upstream stale" when an upstream is stale or missing."""
    current: dict = {}
    made: dict = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if node.is_materializable:
            event = instance.get_latest_materialization_event(key)
            if event is not None:
                tags = dict(event.asset_materialization.tags or {})
                made[key] = (event.timestamp, tags)
                current[key] = _data_version(tags)
        else:  # an observable source: its latest observed data version
            record = instance.get_latest_data_version_record(key)
            if record is not None:
                tags = dict(record.asset_observation.tags or {}) if record.asset_observation else {}
                current[key] = _data_version(tags)
    out: dict = {}

    def status(key) -> str:
        if key in out:
            return out[key][2]
        node = graph.get(key)
        if not node.is_materializable:
            result = "observed" if key in current else "not observed"
            out[key] = (None, current.get(key), result)
            return result
        if key not in made:
            out[key] = (None, None, "missing")
            return "missing"
        timestamp, tags = made[key]
        reasons = []
        if node.code_version and tags.get("dagster/code_version") not in (None, node.code_version):
            reasons.append("code changed")
        for parent in sorted(node.parent_keys, key=lambda k: k.to_user_string()):
            recorded = tags.get(f"dagster/input_data_version/{parent.to_user_string()}")
            if recorded is not None and current.get(parent) is not None and recorded != current[parent]:
                reasons.append(f"{parent.to_user_string()} changed")
        result = "stale (" + ", ".join(reasons) + ")" if reasons else "fresh"
        if not reasons:
            upstream = [status(p) for p in node.parent_keys if graph.get(p).is_materializable]
            if any(u != "fresh" for u in upstream):
                result = "upstream stale"
        out[key] = (timestamp, current.get(key), result)
        return result

    for key in keys:
        status(dg.AssetKey(key.path))
    return out


def lineage(asset: str | None = None) -> int:
    """Print each asset with its upstreams, latest materialization time, data version and staleness
    (public Dagster APIs only: the instance's latest materializations and their data-version tags)."""


    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    keys = sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string())
    if asset is not None:
        key = dg.AssetKey.from_user_string(asset)
        if key not in keys:
            known = ", ".join(k.to_user_string() for k in keys)
            print(f"carl lineage: unknown asset {asset!r}; known: {known}", file=sys.stderr)
            return 2
        descendants = {k for k in keys if key in graph.get_ancestor_asset_keys(k)}
        related = {key} | set(graph.get_ancestor_asset_keys(key)) | descendants
        keys = [k for k in keys if k in related]
    with dg.DagsterInstance.get() as instance:
        statuses = _statuses(instance, graph, keys)
        print(f"{'asset':<26}{'group':<11}{'upstream':<34}{'materialized (UTC)':<21}{'data version':<18}"
              "status")
        for key in keys:
            node = graph.get(key)
            ups = ", ".join(sorted(p.to_user_string() for p in node.parent_keys)) or "-"
            timestamp, version, status = statuses[key]
            when = (dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
                    if timestamp else "never")
            print(f"{key.to_user_string():<26}{(node.group_name or '-'):<11}{ups[:33]:<34}{when:<21}"
                  f"{(version or '-')[:16]:<18}{status}")
    return 0


def lineage_nodes(asset: str, version: str | None = None, limit: int = 20) -> int:
    """Print the memory nodes behind a checkpoint version, following the chain of cycles."""
    if asset not in CHECKPOINT_ASSETS:
        raise PipelineUsageError(f"carl lineage --nodes: {asset!r} is not a checkpoint "
                                 f"({', '.join(CHECKPOINT_ASSETS)})")
    home = storage.carl_home()
    try:
        version = version or ArtifactVersions(storage.artifact_dir(asset, home), asset).path().name
    except ArtifactVersionError as exc:
        raise PipelineUsageError(f"carl lineage --nodes: {exc}") from None
    database = home / storage.DATABASE_NAME
    try:
        provenance = storage.read_table(database, PROVENANCE_TABLE)
        nodes = storage.read_table(database, "memory_nodes")
    except (LookupError, FileNotFoundError) as exc:
        raise PipelineUsageError(f"carl lineage --nodes: {exc}") from None
    try:
        behind = nodes_behind(provenance, asset, version)
    except LookupError as exc:
        raise PipelineUsageError(f"carl lineage --nodes: {exc}") from None
    chain = " <- ".join(f"{a}@{v}" for a, v in behind.attrs.get("chain", []))
    behind = behind.join(nodes.set_index("node_id")[["kind", "text"]], on="node_id")
    links = int(behind["examples"].sum())
    print(f"{asset}@{version}: {len(behind)} memory nodes, {links} (node, example) links")
    print(f"chain: {chain}")
    print(f"{'node':<34}{'kind':<12}{'examples':>9}{'versions':>9}  text")
    for row in behind.head(limit).itertuples(index=False):
        text = " ".join(str(row.text).split())[:60]
        print(f"{str(row.node_id)[:33]:<34}{str(row.kind)[:11]:<12}{int(row.examples):>9}"
              f"{int(row.checkpoints):>9}  {text}")
    if len(behind) > limit:
        print(f"... {len(behind) - limit} more (--limit)")
    return 0
