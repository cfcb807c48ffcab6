"""The dreams group's `scorer_validation`: how well each scorer tells coherent answers to dream prompts from
corrupted ones, on the current policy (`carl_assets.dreams.validation`). It reads its declared inputs
(memory_graph's tables, base_model's folder); with `start_from='auto'` the policy measured is the newest
grpo_checkpoint, the dream cycle's back edge that `resolve_policy` names (grpo_checkpoint is downstream of
dream_scenarios, which reads this asset's table, so it cannot be a declared input)."""

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource
from pydantic import Field

from carl_assets.artifacts import folder_content_id
from carl_assets.carl.run_config import Placement
from carl_assets.defs.common import library_config, materialized, table_preview
from carl_assets.defs.dreams import resolve_policy
from carl_assets.defs.pools import TRAINING_POOL
from carl_assets.defs.resources import ArtifactStore, append_rows
from carl_assets.dreams.cycle_state import PolicyChoice
from carl_assets.dreams.validation import (
    ValidationConfig,
    ValidationSettings,
    validate_scorers,
    validation_prompts,
)
from carl_assets.handles import AssetHandle, Checkpoint
from carl_assets.models.defaults import resolve_placement, resolve_threads
from carl_assets.models.loading import MODEL_INFO_FILE, load_model_and_tokenizer
from carl_assets.runtime import torch_threads


class ScorerValidationConfig(dg.Config, ValidationSettings, PolicyChoice, Placement):
    """scorer_validation: the prompts and the coherent / corrupted texts per prompt. `ValidationSettings`:
    how the texts are made and judged; `PolicyChoice`: the policy measured (the one dream_scenarios would
    dream with); `Placement`: where it runs."""

    n_prompts: int = Field(
        default=24,
        description="dream prompts (memory collisions); each gives 2 coherent "
        "texts (the policy's answer, a memory text) and 2 + 2 + hot_samples corrupted ones",
    )


def model_name(base_dir: Path) -> str:
    """Where the base model came from (its `carl_model.json` source: 'offline', a hub id, a file...)."""
    info = base_dir / MODEL_INFO_FILE
    return str(json.loads(info.read_text()).get("source", "unknown")) if info.is_file() else "unknown"


def _validation_config(config: ScorerValidationConfig) -> ValidationConfig:
    """The library's validation config: the asset's settings, the coherent sampling and scorers as the
    library's defaults."""
    return ValidationConfig(**library_config(config, ValidationSettings).model_dump())


def _pooled(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the pooled corruption, best AUC first."""
    return table[table["corruption"] == "pooled"].sort_values("auc", ascending=False)


def _metadata(
    table: pd.DataFrame, items: pd.DataFrame, name: str, policy: str, policy_content: str
) -> dict[str, Any]:
    """The best pooled scorer, every scorer's pooled AUC, the text counts and two previews."""
    pooled = _pooled(table)
    best = pooled.iloc[0]
    return {
        "model": name,
        "policy": policy,
        "policy_content": policy_content,
        "best_scorer": str(best["scorer"]),
        "best_pooled_auc": float(best["auc"]),
        **{f"pooled_auc/{r.scorer}": float(r.auc) for r in pooled.itertuples()},
        "coherent_texts": int((items["label"] == 1).sum()),
        "corrupted_texts": int((items["label"] == 0).sum()),
        "pooled": table_preview(
            pooled[["scorer", "auc", "ci_low", "ci_high", "mean_coherent", "mean_corrupted"]], rows=20
        ),
        "by_corruption": table_preview(
            table.pivot(index="scorer", columns="corruption", values="auc").reset_index(), rows=20
        ),
    }


@dg.asset(
    pool=TRAINING_POOL,
    group_name="dreams",
    kinds={"pytorch", "duckdb"},
    description="Does each scorer tell sense from noise on the current policy? Coherent answers to dream "
    "prompts (the policy's own low-temperature answers, memory texts) against corrupted ones (words "
    "shuffled, a cut sentence repeated, untruncated high-temperature samples), each scored as a completion "
    "of its prompt by carl, its components, phi_mean, self_certainty, neg_entropy and mean_logprob. DuckDB "
    "`scorer_validation` (AUC with a bootstrap interval per scorer and corruption, kept per policy) and "
    "`scorer_validation_items`.",
)
def scorer_validation(
    context: dg.AssetExecutionContext,
    config: ScorerValidationConfig,
    memory_graph: AssetHandle,
    base_model: Checkpoint,
    duckdb: DuckDBResource,
    artifacts: ArtifactStore,
) -> dg.MaterializeResult:
    nodes, edges = memory_graph.read("memory_nodes"), memory_graph.read("memory_edges")
    policy_asset, policy_version, policy_dir = resolve_policy(artifacts, config.start_from, base_model)
    policy = f"{policy_asset}@{policy_version}"
    device, dtype = resolve_placement(config.device, config.dtype, base_model.is_offline)
    model, tokenizer = load_model_and_tokenizer(policy_dir, device=device, dtype=dtype)
    prompts, memory_texts = validation_prompts(nodes, edges, config.n_prompts, seed=config.seed)
    context.log.info(f"validating scorers on {policy} with {len(prompts)} dream prompts")
    with torch_threads(resolve_threads(config.threads, base_model.is_offline)):
        table, items = validate_scorers(model, tokenizer, prompts, memory_texts, _validation_config(config))
    name = model_name(base_model.file())
    table.insert(0, "policy", policy)
    table.insert(0, "model", name)
    items.insert(0, "policy", policy)
    kept = {
        t: append_rows(duckdb, t, new, key="policy")
        for t, new in (("scorer_validation", table), ("scorer_validation_items", items))
    }  # one result per policy
    best = _pooled(table).iloc[0]
    context.log.info(f"best pooled AUC on {policy}: {best['scorer']} {best['auc']:.3f} "
                     f"[{best['ci_low']:.3f}, {best['ci_high']:.3f}]")
    # The table shows the policy's version folder (time + run id); the data version hashes the policy's
    # content instead, so the same weights measured with the same config give the same data version.
    policy_content = folder_content_id(policy_dir)
    return materialized(table.drop(columns=["policy"]), policy_asset, policy_content, config=config,
                        tables={"scorer_validation": kept["scorer_validation"]},
                        metadata=_metadata(table, items, name, policy, policy_content))
