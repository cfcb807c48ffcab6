"""The dreams group: one dream cycle of the policy on the memory graph, scored and filtered.

Dagster's graph is acyclic, so the cycle is not drawn as a loop: each `dream_scenarios` materialization
resolves the cycle's state once (`carl_assets.dreams.cycle_state`: its number, which checkpoint version
dreams, the schedule's temperature and SFT learning rate) and writes it as `cycle.json` into its own
version folder; `sft_dataset` carries it beside the data, so `sft_checkpoint` of the same cycle starts from
that version at that rate. Cycle n+1 dreams with cycle n's GRPO checkpoint: the one read this asset cannot
declare (grpo_checkpoint is downstream of it), named in the state. (Partitions per cycle were considered:
a cycle's inputs are the previous partition's outputs, a self-dependency that reads worse in the UI than
one asset with a cycle table.)
"""

import json
import math
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource

from carl_assets import storage
from carl_assets.artifacts import folder_content_id
from carl_assets.defs.common import config_values, materialized, table_preview
from carl_assets.defs.dream_checks import KEPT_CHECK, kept_check, kept_something_reason, plan_scenarios
from carl_assets.defs.dream_config import DreamScenariosConfig
from carl_assets.defs.pools import TRAINING_POOL
from carl_assets.defs.presets import check_preset_model
from carl_assets.defs.resources import ArtifactStore, append_rows, read_table
from carl_assets.dreams import DreamResult, dream, inverse_diagnostic_pass_rate, parse_scorer_spec
from carl_assets.dreams.cycle_state import DreamCycleState, is_auto, next_cycle, parse_checkpoint_spec
from carl_assets.dreams.walks import kind_counts
from carl_assets.handles import AssetHandle, Checkpoint, Readout
from carl_assets.models.defaults import resolve_placement, resolve_threads
from carl_assets.models.loading import load_model_and_tokenizer
from carl_assets.plotting import line_plot
from carl_assets.runtime import torch_threads
from carl_assets.steering import load_readout
from carl_assets.steering.readout import require_concepts

__all__ = [
    "DreamScenariosConfig",
    "dream_scenarios",
    "kept_something_reason",
    "parse_checkpoint_spec",
    "plan_scenarios",
    "resolve_policy",
]


def resolve_policy(
    artifacts: ArtifactStore, spec: str, base_model: Checkpoint | None = None
) -> tuple[str, str, Path]:
    """(asset, version, folder) of the checkpoint a cycle starts from. 'auto': the newest GRPO checkpoint
    (the previous cycle's policy) if there is one, else the base model (`base_model`'s handle when given).
    FileNotFoundError when there is no base model, or the named version is not kept."""
    if is_auto(spec):
        # The cycle's back edge: grpo_checkpoint is downstream of dream_scenarios, so it cannot be a
        # declared input; the version read here is recorded in the cycle's state.
        grpo = artifacts.versions("grpo_checkpoint")
        if grpo.current_name():
            return "grpo_checkpoint", grpo.current_name(), grpo.path()
        if base_model is not None and base_model.path is not None:
            return "base_model", str(base_model.version), base_model.path
        base = artifacts.versions("base_model")
        if base.current_name():
            return "base_model", base.current_name(), base.path()
        raise FileNotFoundError("no base_model yet: materialize base_model first")
    asset, version = parse_checkpoint_spec(spec)
    if asset == "base_model" and base_model is not None and version in (None, base_model.version):
        folder = base_model.file()
    else:
        folder = artifacts.require(asset, version=version)
    return asset, folder.name, folder


def resolve_cycle(
    config: DreamScenariosConfig,
    artifacts: ArtifactStore,
    duckdb: DuckDBResource,
    base_model: Checkpoint,
    run_id: str,
) -> DreamCycleState:
    """This cycle's state, resolved once: its number (after the last in this asset's own `dream_cycles`
    ledger unless set), the policy that dreams, and the noise schedule's step for that number."""
    try:
        last: int | None = int(read_table(duckdb, "dream_cycles")["cycle"].max())
    except LookupError:
        last = None
    cycle = next_cycle(config.cycle, last)
    asset, version, folder = resolve_policy(artifacts, config.start_from, base_model)
    step = config.schedule(base_model.is_offline).at(cycle)
    return DreamCycleState(
        cycle=cycle,
        policy_asset=asset,
        policy_version=version,
        policy_path=str(folder),
        temperature=step.temperature,
        learning_rate=step.learning_rate,
        schedule_progress=step.progress,
        start_from=config.start_from.strip() or "auto",
        run_id=run_id,
    )


def heldout_bar(frame: pd.DataFrame, top_fraction: float) -> float:
    """The score a response needs to be among the kept share of this cycle's dreams."""
    scores = frame.loc[frame["response"].astype(str).str.strip() != "", "score"].astype(float)
    return float(scores.quantile(1.0 - top_fraction)) if len(scores) else float("nan")


def _cycles_plot(cycles: pd.DataFrame) -> bytes:
    x = cycles["cycle"].astype(int).tolist()
    series = {
        name: (x, cycles[name].astype(float).tolist())
        for name in (
            "temperature",
            "reject_fraction",
            "score_mean",
            "score_std",
            "no_signal_fraction",
            "heldout_pass_rate",
        )
        if name in cycles.columns
    }
    return line_plot(
        series, title="dream cycles: noise schedule and convergence", xlabel="cycle", ylabel="value"
    )


def load_scorer(config: DreamScenariosConfig, offline: bool, steering_vectors: Readout) -> tuple[str, Any]:
    """(the scorer spec, the scorer): the steering readout is loaded only when the spec uses it."""
    spec = config.scorer_spec(offline)
    vectors = (
        require_concepts(load_readout(steering_vectors.file()), f"dream_scenarios.scorer = {config.scorer!r}")
        if "steering" in spec
        else None
    )
    return spec, parse_scorer_spec(spec, steering_vectors=vectors)


def partial_dir(artifacts: ArtifactStore, state: DreamCycleState, config: DreamScenariosConfig) -> Path:
    """Where generated batches are kept as they are made, keyed by what defines the cycle's dreams: a rerun
    after a kill reuses them and generates only the rest."""
    key = storage.content_hash(
        "dream_scenarios", state.cycle, state.policy_asset, state.policy_version, config_values(config)
    )
    return storage.artifact_dir("dream_scenarios", artifacts.root) / f".partial-{key}"


def dream_cycle(
    context: dg.AssetExecutionContext,
    config: DreamScenariosConfig,
    state: DreamCycleState,
    graph: tuple[pd.DataFrame, pd.DataFrame],
    scorer: Any,
    heldout: list,
    cache: Path,
    offline: bool,
) -> tuple[DreamResult, float, float, pd.DataFrame]:
    """Dream the cycle with its policy at its temperature, then the inverse diagnostic on the held-out
    collisions: (the dreams, the bar a held-out answer must reach, the pass rate, the held-out rows)."""
    device, dtype = resolve_placement(config.device, config.dtype, offline)
    model, tokenizer = load_model_and_tokenizer(state.policy_folder(), device=device, dtype=dtype)

    def progress(done: int, total: int) -> None:
        context.log.info(f"dreamed {done}/{total} scenarios")

    with torch_threads(resolve_threads(config.threads, offline)):
        result = dream(
            model,
            tokenizer,
            *graph,
            config.dream_config(offline),
            scorer,
            cycle=state.cycle,
            temperature=state.temperature,
            exclude={c.node_set for c in heldout},
            progress=progress,
            cache_dir=cache,
        )
        # "Passes the filter": at least the set minimum, else at least the score the filter kept at this
        # cycle (a greedy reflex as good as the kept dreams).
        bar = (
            config.min_score
            if config.min_score is not None
            else heldout_bar(result.frame, config.top_fraction)
        )
        pass_rate, heldout_frame = inverse_diagnostic_pass_rate(
            model,
            tokenizer,
            heldout,
            scorer,
            min_score=bar,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
            excerpt_chars=config.excerpt_chars,
        )
    heldout_frame.insert(0, "cycle", state.cycle)
    return result, bar, pass_rate, heldout_frame


def cycle_row(
    state: DreamCycleState,
    result: DreamResult,
    heldout: pd.DataFrame,
    bar: float,
    pass_rate: float,
    scorer_spec: str,
    kinds: tuple[str, ...],
    pool: int,
) -> pd.DataFrame:
    """The cycle's `dream_cycles` row: its state, statistics and inverse diagnostic."""
    return pd.DataFrame(
        [
            {
                "cycle": state.cycle,
                "policy_asset": state.policy_asset,
                "policy_version": state.policy_version,
                "run_id": state.run_id,
                "temperature": state.temperature,
                "learning_rate": state.learning_rate,
                "schedule_progress": state.schedule_progress,
                **result.statistics,
                "walks": result.walks,
                "heldout_scenarios": len(heldout),
                "heldout_bar": bar,
                "heldout_pass_rate": pass_rate,
                "heldout_score_mean": float(heldout["score"].mean()) if len(heldout) else float("nan"),
                "scorer": scorer_spec,
                "conditioning_kinds": json.dumps(list(kinds)),
                "scenario_pool": pool,
            }
        ]
    )


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _metadata(
    state: DreamCycleState,
    result: DreamResult,
    pass_rate: float,
    kinds: tuple[str, ...],
    config: DreamScenariosConfig,
    nodes: pd.DataFrame,
    plan: Any,
    cycles: pd.DataFrame,
) -> dict[str, Any]:
    frame = result.frame
    return {
        "cycle": state.cycle,
        "policy": state.policy,
        "policy_path": dg.MetadataValue.path(state.policy_path),
        "temperature": state.temperature,
        "learning_rate": state.learning_rate,
        **{k: _finite(v) for k, v in result.statistics.items()},
        "heldout_pass_rate": _finite(pass_rate),
        "conditioning_kinds": dg.MetadataValue.json(list(kinds)),
        "conditioning_kinds_rule": "set in config" if config.conditioning_kinds else "auto (the graph's own)",
        "kinds_present": dg.MetadataValue.json(kind_counts(nodes)),
        "scenario_pool": plan.pool,
        "heldout_scenarios": len(plan.collisions),
        "reused_batches": result.reused_batches,
        "reasons": dg.MetadataValue.json(frame["reason"].value_counts().to_dict()),
        "kept_preview": table_preview(frame[frame["kept"]][["dream_id", "response", "score"]]),
        "cycles": table_preview(cycles, rows=50),
    }


def _say_plan(
    context: dg.AssetExecutionContext,
    config: DreamScenariosConfig,
    state: DreamCycleState,
    kinds: tuple[str, ...],
    plan: Any,
) -> None:
    context.log.info(
        f"cycle {state.cycle}: {state.policy} dreams at temperature {state.temperature:.3f} "
        f"(SFT lr {state.learning_rate:.2e})"
    )
    enough = " (enough)" if plan.pool >= config.n_scenarios + plan.requested else ""
    context.log.info(
        f"conditioning kinds {list(kinds)} ({'set' if config.conditioning_kinds else 'auto'}); "
        f"walks found {plan.pool}{enough} distinct scenarios for {config.n_scenarios} dreamed + "
        f"{config.heldout_scenarios} held out"
    )
    if plan.shrunk:
        context.log.warning(
            f"few scenarios: held out {len(plan.collisions)} instead of {plan.requested} (at most "
            f"a quarter of the {plan.pool} the walks found), the rest are dreamed"
        )


def _say_result(
    context: dg.AssetExecutionContext,
    state: DreamCycleState,
    result: DreamResult,
    pass_rate: float,
    reason: str | None,
) -> None:
    stats = result.statistics
    if stats["responses"]:
        context.log.info(
            f"cycle {state.cycle}: {stats['responses']} responses, {stats['kept']} kept, score "
            f"{stats['score_mean']:.4f} ± {stats['score_std']:.4f}, held-out pass rate {pass_rate:.2f}"
        )
    else:  # the blocking check fails next; say why here too rather than "score nan ± nan"
        context.log.warning(f"cycle {state.cycle}: {reason}")


@dg.asset(
    group_name="dreams",
    ins={"memory_graph": dg.AssetIn(), "base_model": dg.AssetIn(), "steering_vectors": dg.AssetIn()},
    deps=["scorer_validation"],  # ordering only: it chose the model's default scorer
    kinds={"pytorch", "duckdb"},
    pool=TRAINING_POOL,
    check_specs=[KEPT_CHECK],
    description="One dream cycle: random walks on the memory graph collide 2-3 memories into a scenario, the "
    "current policy (the previous cycle's GRPO checkpoint, or base_model) answers each k times at the "
    "cycle's temperature, a training-signal agent (CARL and/or a steering-vector readout) scores the answers "
    "and a filter keeps the best. DuckDB `dream_scenarios` (every response, its scores, kept or not and "
    "why), `dream_cycles` (schedule, convergence, which checkpoint dreamed) and `dream_heldout` (the inverse "
    "diagnostic on fixed novel collisions); the cycle's state (cycle.json) in its version folder.",
)
def dream_scenarios(
    context: dg.AssetExecutionContext,
    config: DreamScenariosConfig,
    duckdb: DuckDBResource,
    artifacts: ArtifactStore,
    memory_graph: AssetHandle,
    base_model: Checkpoint,
    steering_vectors: Readout,
) -> dg.MaterializeResult:
    offline = base_model.is_offline
    check_preset_model(context.run.tags, offline)  # a `real` preset job on the offline model: refused
    nodes, edges = memory_graph.read("memory_nodes"), memory_graph.read("memory_edges")
    state = resolve_cycle(config, artifacts, duckdb, base_model, context.run.run_id)
    scorer_spec, scorer = load_scorer(config, offline, steering_vectors)
    kinds, plan = plan_scenarios(nodes, edges, config, config.dream_config(offline))
    _say_plan(context, config, state, kinds, plan)
    cache = partial_dir(artifacts, state, config)
    if cache.is_dir() and any(cache.glob("batch-*.json")):
        context.log.info(f"reusing the generated batches of an interrupted run in {cache}")
    result, bar, pass_rate, heldout = dream_cycle(
        context, config, state, (nodes, edges), scorer, plan.collisions, cache, offline
    )
    row = cycle_row(state, result, heldout, bar, pass_rate, scorer_spec, kinds, plan.pool)
    # kept across cycles (this asset's own ledgers); a rerun of a cycle replaces its rows
    tables = {
        name: append_rows(duckdb, name, new, key="cycle", sort_by="cycle")
        for name, new in (
            ("dream_scenarios", result.frame),
            ("dream_cycles", row),
            ("dream_heldout", heldout),
        )
    }
    with artifacts.write_version(
        "dream_scenarios", run_id=context.run.run_id, parents={state.policy_asset: state.policy_version}
    ) as (folder, _):
        state.save(folder)
    shutil.rmtree(cache, ignore_errors=True)  # the cycle is stored: its partial batches are done with
    check = kept_check(result.frame, row.iloc[0], state.cycle)
    _say_result(context, state, result, pass_rate, check.description)
    frame = result.frame
    # the policy by its content, not its version folder's name (time + run id): the same weights dreaming
    # the same config give the same data version in any run; the name is shown in the metadata
    policy_content = folder_content_id(state.policy_folder())
    return materialized(
        frame.drop(columns=[c for c in ("finished",) if c in frame.columns]),
        state.cycle,
        state.policy_asset,
        policy_content,
        config=config,
        check_results=[check],
        tables={"dream_scenarios": tables["dream_scenarios"], "dream_cycles": tables["dream_cycles"]},
        metadata={
            **_metadata(state, result, pass_rate, kinds, config, nodes, plan, tables["dream_cycles"]),
            "policy_content": policy_content,
        },
        plots={"cycles_plot": _cycles_plot(tables["dream_cycles"])},
    )
