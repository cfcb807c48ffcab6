"""The dreams group: one dream cycle of the policy on the memory graph, scored and filtered.

Dagster's graph is acyclic, so the cycle is not drawn as a loop: each `dream_scenarios` materialization
records which checkpoint version dreamed (`dream_cycles.policy_asset/policy_version`, and its metadata),
and `sft_checkpoint` of the same cycle starts from that version. Cycle n+1 dreams with cycle n's GRPO
checkpoint. (Partitions per cycle were considered: a cycle's inputs are the previous partition's
outputs, a self-dependency that reads worse in the UI than one asset with a cycle table.)
"""


import json
import math
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource
from pydantic import Field

from carl_assets import storage
from carl_assets.defs.common import PERFORMANCE_ONLY, config_values, materialized, table_preview
from carl_assets.defs.resources import ArtifactStore, append_rows, read_table
from carl_assets.models.defaults import OFFLINE_DEFAULTS, dream_sampling_defaults, is_offline_model
from carl_assets.plotting import line_plot
from carl_assets.runtime import torch_threads

POLICY_ASSETS = ("grpo_checkpoint", "sft_checkpoint", "base_model")
# The seed's noise schedule is lr 1e-4 -> 1e-5 for a real model; the 1M-parameter offline model needs
# the larger rate SFT is tuned to (it does not crystallize on its dreams at 1e-4 within a CPU budget).
SEED_LR = (1e-4, 1e-5)
OFFLINE_LR = (OFFLINE_DEFAULTS.sft.learning_rate, OFFLINE_DEFAULTS.sft.learning_rate / 10)


def parse_checkpoint_spec(spec: str) -> tuple[str, str | None]:
    """'grpo_checkpoint@20261126T...' -> (asset, version); 'base_model' -> (asset, None)."""
    asset, _, version = spec.strip().partition("@")
    if asset not in POLICY_ASSETS:
        raise ValueError(f"unknown checkpoint {spec!r}: use 'auto', one of {', '.join(POLICY_ASSETS)}, "
                         "or '<asset>@<version>' (see the artifact_versions table)")
    return asset, (version or None)


def resolve_policy(artifacts: ArtifactStore, spec: str) -> tuple[str, str, Path]:
    """(asset, version, folder) of the checkpoint a cycle starts from. 'auto': the newest GRPO checkpoint
    (the previous cycle's policy) if there is one, else the base model."""
    if spec.strip() in ("", "auto"):
        for asset in ("grpo_checkpoint", "base_model"):
            versions = artifacts.versions(asset)
            if versions.current_name():
                return asset, versions.current_name(), versions.path()
        raise FileNotFoundError("no base_model yet: materialize base_model first")
    asset, version = parse_checkpoint_spec(spec)
    folder = artifacts.require(asset, version=version)
    return asset, folder.name, folder


class DreamScenariosConfig(dg.Config):
    start_from: str = Field(default="auto", description="the policy that dreams: 'auto' (the newest "
                            "grpo_checkpoint, i.e. the previous cycle's, else base_model), 'base_model', or "
                            "'<asset>@<version>' from artifact_versions to roll back to an earlier cycle")
    scorer: str = Field(default="auto", description="the training-signal agent: 'auto' (the model's default, "
                        "chosen by scorer_validation: 'carl' for the offline model, 'self_certainty' for a real one), "
                        "'carl', a CARL component, 'phi_mean', 'self_certainty', 'neg_entropy', 'mean_logprob', "
                        "'steering:<emotion>' or a weighted mix such as 'carl:0.7,steering:warmth:0.3'")
    n_scenarios: int = Field(default=32, description="scenarios (memory collisions) dreamed per cycle")
    responses_per_scenario: int = Field(default=4, description="responses sampled per scenario (k)")
    max_new_tokens: int = Field(default=32, description="tokens per response")
    top_fraction: float = Field(default=0.25, description="the filter keeps this top share of each scenario's "
                                "responses (0.25 of 4: the best one)")
    min_score: float | None = Field(default=None, description="the filter keeps only responses scoring at "
                                    "least this (None: no minimum; the inverse diagnostic then uses the score "
                                    "the filter kept at, the cycle's (1 - top_fraction) quantile)")
    restart_prob: float = Field(default=0.15, description="random walk: probability of jumping back to the "
                                "start node at each step")
    walk_length: int = Field(default=8, description="random walk: steps per walk")
    relation_weights: dict[str, float] = Field(default={}, description="random walk: edge weight per relation "
                                               "type (others weigh 1)")
    conditioning_kinds: list[str] = Field(default=[], description="walks start at recent nodes of these "
                                          "kinds; [] (the default) means the graph's own: reflection/lesson "
                                          "when it has at least 8 of them, else its most populous kinds "
                                          "covering half its nodes (carl_assets.dreams.walks)")
    recent_nodes: int = Field(default=64, description="walks start among this many most recent nodes of "
                              "the conditioning kinds")
    recency_half_life_days: float = Field(default=30.0, description="when nodes carry dates (updated_at), a "
                                          "start dated this many days before the newest seeds half as many "
                                          "walks (<= 0: equal shares; without dates shares are equal)")
    max_memories: int = Field(default=3, description="memories collided per scenario (at least 2)")
    excerpt_chars: int = Field(default=160, description="characters of each memory shown in the prompt")
    heldout_scenarios: int = Field(default=8, description="fixed novel collisions never dreamed on, for the "
                                   "inverse diagnostic")
    cycle: int = Field(default=-1, description="this cycle's number (-1: one after the last in dream_cycles)")
    schedule_cycles: int = Field(default=3, description="noise schedule: cycles from the start to the end values")
    schedule_shape: str = Field(default="cosine", description="noise schedule: 'linear', 'cosine' or 'geometric'")
    temperature_start: float | None = Field(default=None, description="noise schedule: sampling temperature of "
                                            "cycle 0 (None: the model's default, 1.3 for the offline model, 1.0 "
                                            "for a real one; carl_assets.models.defaults)")
    temperature_end: float | None = Field(default=None, description="noise schedule: temperature of the last "
                                          "cycle (None: the model's default, 0.7 offline, 0.6 for a real model)")
    top_k: int | None = Field(default=None, description="sampling: keep the k likeliest tokens (0: off; None: the "
                              "model's default, off for both)")
    top_p: float | None = Field(default=None, description="sampling: nucleus truncation (1.0: off; None: the "
                                "model's default, off for the offline model, 0.9 for a real one)")
    min_p: float | None = Field(default=None, description="sampling: drop tokens below min_p times the likeliest "
                                "one's probability (0.0: off; None: the model's default, off offline, 0.05 for "
                                "a real model)")
    lr_start: float = Field(default=0.0, description="noise schedule: SFT learning rate of cycle 0 (0: the "
                            "seed's 1e-4 for a real model, 1.5e-3 for the offline model)")
    lr_end: float = Field(default=0.0, description="noise schedule: learning rate of the last cycle (0: a "
                          "tenth of lr_start, as the seed's 1e-4 -> 1e-5)")
    seed: int = Field(default=0, description="seed of walks, collisions and sampling (mixed with the cycle)")
    # Not performance-only: each generate batch samples from its own seeded stream, so the batching
    # changes which answers are drawn.
    batch_size: int = Field(default=8, description="scenarios per generate call (each batch has its own "
                            "seeded sampling stream, so this changes the answers drawn)")
    threads: int = Field(default=0, description="torch CPU threads (0: the model's default, 1 for the offline "
                         "model, all usable cores for a real one: models.defaults.default_threads)",
                         json_schema_extra=PERFORMANCE_ONLY)
    device: str = Field(default="auto", description="where the policy generates and is scored: 'auto' (CUDA, "
                        "then MPS, then CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    dtype: str = Field(default="auto", description="policy precision: 'auto' (fp32 for the offline model; bf16 on "
                       "a CUDA device that supports it for a real one), 'bf16', 'fp16' or 'fp32'")

    def schedule(self, offline: bool) -> Any:
        from carl_assets.dreams import NoiseSchedule

        defaults = dream_sampling_defaults(offline)
        lr_start = self.lr_start or (OFFLINE_LR if offline else SEED_LR)[0]
        lr_end = self.lr_end or lr_start / 10
        return NoiseSchedule(cycles=self.schedule_cycles, lr_start=lr_start, lr_end=lr_end,
                             temperature_start=_or(self.temperature_start, defaults.temperature_start),
                             temperature_end=_or(self.temperature_end, defaults.temperature_end),
                             shape=self.schedule_shape)

    def scorer_spec(self, offline: bool) -> str:
        """The scorer spec: as set, or for 'auto' the model's default (`models.defaults.scorer_defaults`)."""
        from carl_assets.models.defaults import scorer_defaults

        return scorer_defaults(offline).dream_scorer if self.scorer.strip().lower() == "auto" else self.scorer

    def sampling(self, offline: bool) -> Any:
        """The truncation of dream sampling: each field as set, else the model's default."""
        from carl_assets.dreams.generation import Sampling

        defaults = dream_sampling_defaults(offline)
        return Sampling(top_k=_or(self.top_k, defaults.top_k), top_p=_or(self.top_p, defaults.top_p),
                        min_p=_or(self.min_p, defaults.min_p))

    def dream_config(self, offline: bool = True) -> Any:
        from carl_assets.dreams import DreamConfig, WalkConfig

        walk = WalkConfig(restart_prob=self.restart_prob, walk_length=self.walk_length,
                          relation_weights=dict(self.relation_weights),
                          conditioning_kinds=tuple(self.conditioning_kinds), recent_nodes=self.recent_nodes,
                          recency_half_life_days=self.recency_half_life_days, seed=self.seed)
        return DreamConfig(n_scenarios=self.n_scenarios, responses_per_scenario=self.responses_per_scenario,
                           max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, walk=walk,
                           max_memories=self.max_memories, excerpt_chars=self.excerpt_chars,
                           top_fraction=self.top_fraction, min_score=self.min_score, seed=self.seed,
                           sampling=self.sampling(offline))


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


CONDITIONING_FIELD = "dream_scenarios.conditioning_kinds (run config: ops.dream_scenarios.config.conditioning_kinds)"


def too_few_scenarios_message(kinds: tuple[str, ...], explicit: bool, present: dict[str, int], why: str) -> str:
    """What went wrong, the kinds present with their node counts, and what to set."""
    suggestion = [k for k in present if k not in kinds][:3] or list(present)[:3]
    rule = "set in config" if explicit else "auto: the graph's own kinds"
    or_auto = ", or to [] for the graph's own kinds" if explicit else ""
    return (f"dream_scenarios has too few scenarios: {why} (conditioning kinds {list(kinds)}, {rule}). "
            f"Kinds present (non-stub nodes): {present}. Set {CONDITIONING_FIELD} to kinds of this graph with "
            f"linked nodes, e.g. {suggestion}{or_auto}; or add relations between memories.")


def plan_scenarios(nodes: pd.DataFrame, edges: pd.DataFrame, config: DreamScenariosConfig,
                   walk: Any) -> tuple[tuple[str, ...], Any]:
    """(the conditioning kinds used, the held-out plan sized to the graph). Raises dg.Failure naming the
    config field and the kinds present when no node can start a walk or the walks find no scenario."""
    from carl_assets.dreams.collisions import plan_heldout
    from carl_assets.dreams.walks import NoWalkStartError, kind_counts, resolve_conditioning_kinds

    kinds = resolve_conditioning_kinds(nodes, walk)
    present = kind_counts(nodes)
    explicit = bool(config.conditioning_kinds)
    try:
        plan = plan_heldout(nodes, edges, config.heldout_scenarios, config.n_scenarios, walk,
                            max_memories=config.max_memories)
    except NoWalkStartError:
        why = "no non-stub node of the conditioning kinds can start a walk"
        plan = None
    else:
        why = "the walks found no collision of 2 or more distinct memories (the start nodes have no edges " \
              "to other non-stub memories)"
    if plan is None or plan.pool == 0:
        raise dg.Failure(description=too_few_scenarios_message(kinds, explicit, present, why),
                         metadata={"conditioning_kinds": dg.MetadataValue.json(list(kinds)),
                                   "kinds_present": dg.MetadataValue.json(present),
                                   "config_field": CONDITIONING_FIELD})
    return kinds, plan


def heldout_bar(frame: pd.DataFrame, top_fraction: float) -> float:
    """The score a response needs to be among the kept share of this cycle's dreams."""
    scores = frame.loc[frame["response"].astype(str).str.strip() != "", "score"].astype(float)
    return float(scores.quantile(1.0 - top_fraction)) if len(scores) else float("nan")


def run_cycle(cycles: pd.DataFrame, run_id: str) -> int:
    """The cycle a run dreamed, else the latest one (dreams made by an earlier run); never another run's
    newer cycle while runs overlap."""
    mine = cycles[cycles["run_id"].astype(str) == run_id] if "run_id" in cycles.columns else cycles.iloc[:0]
    return int((mine if len(mine) else cycles)["cycle"].max())


def _cycles_plot(cycles: pd.DataFrame) -> bytes:
    x = cycles["cycle"].astype(int).tolist()
    series = {name: (x, cycles[name].astype(float).tolist()) for name in
              ("temperature", "reject_fraction", "score_mean", "score_std", "no_signal_fraction",
               "heldout_pass_rate") if name in cycles.columns}
    return line_plot(series, title="dream cycles: noise schedule and convergence", xlabel="cycle", ylabel="value")


@dg.asset(
    group_name="dreams",
    deps=["memory_graph", "base_model", "steering_vectors", "scorer_validation"],
    kinds={"pytorch", "duckdb"},
    description="One dream cycle: random walks on the memory graph collide 2-3 memories into a scenario, the "
    "current policy (the previous cycle's GRPO checkpoint, or base_model) answers each k times at the cycle's "
    "temperature, a training-signal agent (CARL and/or a steering-vector readout) scores the answers and a "
    "filter keeps the best. DuckDB `dream_scenarios` (every response, its scores, kept or not and why), "
    "`dream_cycles` (schedule, convergence, which checkpoint dreamed) and `dream_heldout` (the inverse "
    "diagnostic on fixed novel collisions).",
)
def dream_scenarios(context: dg.AssetExecutionContext, config: DreamScenariosConfig, duckdb: DuckDBResource,
                    artifacts: ArtifactStore) -> dg.MaterializeResult:
    from carl_assets.dreams import dream, inverse_diagnostic_pass_rate, parse_scorer_spec
    from carl_assets.dreams.walks import kind_counts
    from carl_assets.models.defaults import resolve_placement
    from carl_assets.models.loading import load_model_and_tokenizer
    from carl_assets.steering import load_readout
    from carl_assets.steering.readout import require_concepts

    nodes, edges = read_table(duckdb, "memory_nodes"), read_table(duckdb, "memory_edges")
    if config.cycle >= 0:
        cycle = config.cycle
    else:
        try:
            cycle = int(read_table(duckdb, "dream_cycles")["cycle"].max()) + 1
        except LookupError:
            cycle = 0
    policy_asset, policy_version, policy_dir = resolve_policy(artifacts, config.start_from)
    offline = is_offline_model(artifacts.require("base_model"))
    schedule = config.schedule(offline)
    step = schedule.at(cycle)
    context.log.info(f"cycle {cycle}: {policy_asset}@{policy_version} dreams at temperature "
                     f"{step.temperature:.3f} (SFT lr {step.learning_rate:.2e})")

    scorer_spec = config.scorer_spec(offline)
    vectors = require_concepts(load_readout(artifacts.require("steering_vectors")),
                               f"dream_scenarios.scorer = {config.scorer!r}") if "steering" in scorer_spec else None
    scorer = parse_scorer_spec(scorer_spec, steering_vectors=vectors)
    dream_config = config.dream_config(offline)
    kinds, plan = plan_scenarios(nodes, edges, config, dream_config.walk)
    heldout = plan.collisions
    enough = " (enough)" if plan.pool >= config.n_scenarios + plan.requested else ""
    context.log.info(f"conditioning kinds {list(kinds)} ({'set' if config.conditioning_kinds else 'auto'}); "
                     f"walks found {plan.pool}{enough} distinct scenarios for {config.n_scenarios} dreamed + "
                     f"{config.heldout_scenarios} held out")
    if plan.shrunk:
        context.log.warning(f"few scenarios: held out {len(heldout)} instead of {plan.requested} (at most a "
                            f"quarter of the {plan.pool} the walks found), the rest are dreamed")
    exclude = {c.node_set for c in heldout}

    def progress(done: int, total: int) -> None:
        context.log.info(f"dreamed {done}/{total} scenarios")

    # Generated batches are kept as they are made, keyed by what defines the cycle's dreams: a rerun after a
    # kill reuses them and generates only the rest.
    partial_key = storage.content_hash("dream_scenarios", cycle, policy_asset, policy_version, config_values(config))
    partial_dir = storage.artifact_dir("dream_scenarios", artifacts.root) / f".partial-{partial_key}"
    if partial_dir.is_dir() and any(partial_dir.glob("batch-*.json")):
        context.log.info(f"reusing the generated batches of an interrupted run in {partial_dir}")

    device, dtype = resolve_placement(config.device, config.dtype, offline)
    model, tokenizer = load_model_and_tokenizer(policy_dir, device=device, dtype=dtype)
    from carl_assets.models.defaults import resolve_threads

    with torch_threads(resolve_threads(config.threads, offline)):
        result = dream(model, tokenizer, nodes, edges, dream_config, scorer, cycle=cycle,
                       temperature=step.temperature, exclude=exclude, progress=progress, cache_dir=partial_dir)
        # "Passes the filter": at least the set minimum, else at least the score the filter kept at this
        # cycle (a greedy reflex as good as the kept dreams).
        bar = config.min_score if config.min_score is not None else heldout_bar(result.frame, config.top_fraction)
        pass_rate, heldout_frame = inverse_diagnostic_pass_rate(
            model, tokenizer, heldout, scorer, min_score=bar, max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size, excerpt_chars=config.excerpt_chars)
    frame = result.frame
    stats = result.statistics
    heldout_frame.insert(0, "cycle", cycle)
    cycle_row = pd.DataFrame([{
        "cycle": cycle, "policy_asset": policy_asset, "policy_version": policy_version,
        "run_id": context.run.run_id, "temperature": step.temperature, "learning_rate": step.learning_rate,
        "schedule_progress": step.progress, **{k: stats[k] for k in stats}, "walks": result.walks,
        "heldout_scenarios": len(heldout), "heldout_bar": bar, "heldout_pass_rate": pass_rate,
        "heldout_score_mean": float(heldout_frame["score"].mean()) if len(heldout_frame) else float("nan"),
        "scorer": scorer_spec, "conditioning_kinds": json.dumps(list(kinds)), "scenario_pool": plan.pool,
    }])
    # kept across cycles; a rerun of a cycle replaces its rows
    tables = {name: append_rows(duckdb, name, new, key="cycle", sort_by="cycle")
              for name, new in (("dream_scenarios", frame), ("dream_cycles", cycle_row),
                                ("dream_heldout", heldout_frame))}
    shutil.rmtree(partial_dir, ignore_errors=True)  # the cycle is stored: its partial batches are done with
    kept = frame[frame["kept"]]
    reasons = frame["reason"].value_counts().to_dict()
    if stats["responses"]:
        context.log.info(f"cycle {cycle}: {stats['responses']} responses, {stats['kept']} kept, score "
                         f"{stats['score_mean']:.4f} ± {stats['score_std']:.4f}, held-out pass rate {pass_rate:.2f}")
    else:  # the blocking check fails next; say why here too rather than "score nan ± nan"
        context.log.warning(f"cycle {cycle}: " + str(kept_something_reason(frame, cycle_row.iloc[0])))

    def finite(value: Any) -> Any:
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return materialized(
        frame.drop(columns=[c for c in ("finished",) if c in frame.columns]), cycle, policy_asset, policy_version,
        config=config, tables={"dream_scenarios": tables["dream_scenarios"], "dream_cycles": tables["dream_cycles"]},
        metadata={
            "cycle": cycle,
            "policy": f"{policy_asset}@{policy_version}",
            "policy_path": dg.MetadataValue.path(str(policy_dir)),
            "temperature": step.temperature,
            "learning_rate": step.learning_rate,
            **{k: finite(v) for k, v in stats.items()},
            "heldout_pass_rate": finite(pass_rate),
            "conditioning_kinds": dg.MetadataValue.json(list(kinds)),
            "conditioning_kinds_rule": "set in config" if config.conditioning_kinds else "auto (the graph's own)",
            "kinds_present": dg.MetadataValue.json(kind_counts(nodes)),
            "scenario_pool": plan.pool,
            "heldout_scenarios": len(heldout),
            "reused_batches": result.reused_batches,
            "reasons": dg.MetadataValue.json(reasons),
            "kept_preview": table_preview(kept[["dream_id", "response", "score"]]),
            "cycles": table_preview(tables["dream_cycles"], rows=50),
        },
        plots={"cycles_plot": _cycles_plot(tables["dream_cycles"])},
    )


def kept_something_reason(current: pd.DataFrame, cycle_row: pd.Series | None) -> str | None:
    """Why a cycle's dreams cannot feed SFT, and what to change; None when they can. `current`: the cycle's
    rows of `dream_scenarios`; `cycle_row`: its `dream_cycles` row (conditioning kinds, scenario pool)."""
    kept = current[current["kept"].astype(bool)]
    empty = int((kept["response"].astype(str).str.strip() == "").sum())
    row = cycle_row if cycle_row is not None else pd.Series(dtype=object)
    if len(current) == 0:
        return (f"no scenario was dreamed: the walks from conditioning kinds {row.get('conditioning_kinds', '?')} "
                f"found {row.get('scenario_pool', '?')} distinct scenarios and "
                f"{row.get('heldout_scenarios', '?')} went to the held-out set. Set {CONDITIONING_FIELD} to "
                "more populous kinds (dream_scenarios' metadata lists the kinds present), or lower "
                "dream_scenarios.heldout_scenarios")
    if len(kept) == 0:
        return (f"the filter kept none of {len(current)} responses: lower dream_scenarios.min_score or raise "
                "dream_scenarios.top_fraction")
    if empty:
        return (f"{empty} of {len(kept)} kept responses are empty (the policy generated no text): raise "
                "dream_scenarios.max_new_tokens or dream from a better policy (dream_scenarios.start_from)")
    return None


@dg.asset_check(asset=dream_scenarios, blocking=True, description="This cycle kept at least one response and "
                "every kept response is non-empty (SFT does not start on nothing). When it fails, its metadata "
                "`reason` says why and which dream_scenarios setting to change: conditioning_kinds when no "
                "scenario was dreamed, min_score/top_fraction when the filter kept nothing, max_new_tokens "
                "when kept responses are empty.")
def dreams_kept_something(context: dg.AssetCheckExecutionContext, duckdb: DuckDBResource) -> dg.AssetCheckResult:
    cycles = read_table(duckdb, "dream_cycles")
    cycle = run_cycle(cycles, context.run.run_id)
    frame = read_table(duckdb, "dream_scenarios")
    current = frame[frame["cycle"] == cycle]
    rows = cycles[cycles["cycle"] == cycle]
    reason = kept_something_reason(current, rows.iloc[-1] if len(rows) else None)
    kept = current[current["kept"].astype(bool)]
    empty = int((kept["response"].astype(str).str.strip() == "").sum())
    metadata: dict[str, Any] = {"cycle": cycle, "dreamed_responses": len(current), "kept": len(kept),
                                "empty_kept": empty}
    if reason is not None:
        metadata["reason"] = reason
    return dg.AssetCheckResult(passed=reason is None, metadata=metadata, description=reason)
