"""Whether a dream cycle can feed SFT: the walks find scenarios to dream (before dreaming), and the filter
kept non-empty responses (the blocking dreams_kept_something check, judged by dream_scenarios on the cycle
it just dreamed). Each failure names the dream_scenarios setting to change."""

from typing import Any

import dagster as dg
import pandas as pd

from carl_assets.defs.dream_config import DreamScenariosConfig
from carl_assets.dreams.collisions import plan_heldout
from carl_assets.dreams.loop import DreamConfig
from carl_assets.dreams.walks import NoWalkStartError, kind_counts, resolve_conditioning_kinds

KEPT_CHECK = dg.AssetCheckSpec(
    "dreams_kept_something",
    asset="dream_scenarios",
    blocking=True,
    description="This cycle kept at least one response and every kept response is non-empty (SFT does not "
    "start on nothing). When it fails, its metadata `reason` says why and which dream_scenarios setting to "
    "change: conditioning_kinds when no scenario was dreamed, min_score/top_fraction when the filter kept "
    "nothing, max_new_tokens when kept responses are empty.",
)
CONDITIONING_FIELD = (
    "dream_scenarios.conditioning_kinds (run config: ops.dream_scenarios.config.conditioning_kinds)"
)


def too_few_scenarios_message(
    kinds: tuple[str, ...], explicit: bool, present: dict[str, int], why: str
) -> str:
    """What went wrong, the kinds present with their node counts, and what to set."""
    suggestion = [k for k in present if k not in kinds][:3] or list(present)[:3]
    rule = "set in config" if explicit else "auto: the graph's own kinds"
    or_auto = ", or to [] for the graph's own kinds" if explicit else ""
    return (
        f"dream_scenarios has too few scenarios: {why} (conditioning kinds {list(kinds)}, {rule}). "
        f"Kinds present (non-stub nodes): {present}. Set {CONDITIONING_FIELD} to kinds of this graph with "
        f"linked nodes, e.g. {suggestion}{or_auto}; or add relations between memories."
    )


def plan_scenarios(
    nodes: pd.DataFrame, edges: pd.DataFrame, config: DreamScenariosConfig, dream: DreamConfig
) -> tuple[tuple[str, ...], Any]:
    """(the conditioning kinds used, the held-out plan sized to the graph, its walks and collision sizes
    those of `dream`, the library config the asset dreams with: `config.dream_config(...)`). Raises
    dg.Failure naming the config field and the kinds present when no node can start a walk or the walks
    find no scenario."""
    walk = dream.walk
    kinds = resolve_conditioning_kinds(nodes, walk)
    present = kind_counts(nodes)
    explicit = bool(config.conditioning_kinds)
    try:
        plan = plan_heldout(
            nodes, edges, config.heldout_scenarios, config.n_scenarios, walk,
            min_memories=dream.min_memories, max_memories=dream.max_memories,
        )
    except NoWalkStartError:
        why = "no non-stub node of the conditioning kinds can start a walk"
        plan = None
    else:
        why = (
            "the walks found no collision of 2 or more distinct memories (the start nodes have no edges "
            "to other non-stub memories)"
        )
    if plan is None or plan.pool == 0:
        raise dg.Failure(
            description=too_few_scenarios_message(kinds, explicit, present, why),
            metadata={
                "conditioning_kinds": dg.MetadataValue.json(list(kinds)),
                "kinds_present": dg.MetadataValue.json(present),
                "config_field": CONDITIONING_FIELD,
            },
        )
    return kinds, plan


def kept_something_reason(current: pd.DataFrame, cycle_row: pd.Series | None) -> str | None:
    """Why a cycle's dreams cannot feed SFT, and what to change; None when they can. `current`: the cycle's
    rows of `dream_scenarios`; `cycle_row`: its `dream_cycles` row (conditioning kinds, scenario pool)."""
    kept = current[current["kept"].astype(bool)]
    empty = int((kept["response"].astype(str).str.strip() == "").sum())
    row = cycle_row if cycle_row is not None else pd.Series(dtype=object)
    if len(current) == 0:
        return (
            "no scenario was dreamed: the walks from conditioning kinds "
            f"{row.get('conditioning_kinds', '?')} "
            f"found {row.get('scenario_pool', '?')} distinct scenarios and "
            f"{row.get('heldout_scenarios', '?')} went to the held-out set. Set {CONDITIONING_FIELD} to "
            "more populous kinds (dream_scenarios' metadata lists the kinds present), or lower "
            "dream_scenarios.heldout_scenarios"
        )
    if len(kept) == 0:
        return (
            f"the filter kept none of {len(current)} responses: lower dream_scenarios.min_score or raise "
            "dream_scenarios.top_fraction"
        )
    if empty:
        return (
            f"{empty} of {len(kept)} kept responses are empty (the policy generated no text): raise "
            "dream_scenarios.max_new_tokens or dream from a better policy (dream_scenarios.start_from)"
        )
    return None


def kept_check(frame: pd.DataFrame, row: pd.Series, cycle: int) -> dg.AssetCheckResult:
    """dreams_kept_something on the cycle just dreamed (`frame`: its rows; `row`: its dream_cycles row)."""
    reason = kept_something_reason(frame, row)
    kept = frame[frame["kept"].astype(bool)]
    empty = int((kept["response"].astype(str).str.strip() == "").sum())
    metadata: dict[str, Any] = {
        "cycle": cycle,
        "dreamed_responses": len(frame),
        "kept": len(kept),
        "empty_kept": empty,
    }
    if reason is not None:
        metadata["reason"] = reason
    return dg.AssetCheckResult(
        check_name=KEPT_CHECK.name, passed=reason is None, metadata=metadata, description=reason
    )
