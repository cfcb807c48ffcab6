"""sft_dataset: the SFT examples (a dream cycle's kept responses, templated answers or an external dataset),
the agent tasks held out of them, and the GRPO prompts held out beside them."""

import hashlib
import json
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
from dagster_duckdb import DuckDBResource
from datasets import Dataset, load_from_disk

from carl_assets import storage
from carl_assets.carl.sft_data import SFTDataConfig, build_sft_examples
from carl_assets.carl.training import load_training_dataset
from carl_assets.defs.common import library_config, materialized, table_preview
from carl_assets.defs.resources import ArtifactStore, write_tables
from carl_assets.defs.training_config import DREAMS_SOURCE, SFTDatasetConfig
from carl_assets.dreams import sft_examples_from_dreams
from carl_assets.dreams.cycle_state import CYCLE_FILE, DreamCycleState
from carl_assets.handles import DATASET_DIR, GRPO_PROMPTS_DIR, AssetHandle

TEMPLATE_SOURCES = ("templates", "memory_graph")  # "memory_graph" is the older name of the templated source
# Provenance: which memory nodes each SFT example came from (one row per example and source node).
PROVENANCE_VIEW_SQL = """
CREATE OR REPLACE VIEW sft_example_nodes AS
SELECT example_id, dream_id, unnest(CAST(json_extract_string(node_ids_json, '$[*]') AS VARCHAR[])) AS node_id
FROM sft_dataset
"""
CHAT_CHECK = dg.AssetCheckSpec(
    "sft_dataset_chat_formatted",
    asset="sft_dataset",
    blocking=True,
    description="The HF dataset on disk is non-empty and chat-formatted (prompt ends with a user turn; one "
    "non-empty assistant completion), so SFT does not start on bad data.",
)


def _prompt_completion_problem(dataset: Any) -> str | None:
    for i, row in enumerate(dataset.select(range(min(len(dataset), 200)))):
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):
            if not prompt or prompt[-1].get("role") != "user":
                return f"row {i}: the prompt does not end with a user message"
            if (
                not isinstance(completion, list)
                or len(completion) != 1
                or completion[0].get("role") != "assistant"
                or not completion[0].get("content")
            ):
                return f"row {i}: the completion is not one non-empty assistant message"
        elif not str(completion):
            return f"row {i}: empty completion"
    return None


def hf_dataset_problem(path: Path) -> str | None:
    """None if the dataset on disk is non-empty and chat-formatted (or plain text TRL accepts), else why
    not."""
    dataset = load_from_disk(str(path))
    if len(dataset) == 0:
        return "the dataset is empty"
    columns = set(dataset.column_names)
    if {"prompt", "completion"} <= columns:
        return _prompt_completion_problem(dataset)
    if "messages" in columns:
        for i, row in enumerate(dataset.select(range(min(len(dataset), 200)))):
            if "assistant" not in [m.get("role") for m in row["messages"]]:
                return f"row {i}: no assistant message"
        return None
    if "text" in columns:
        return None
    return f"no prompt/completion, messages or text columns (has {sorted(columns)})"


def split_grpo_prompts(examples: pd.DataFrame, n: int, key: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(SFT rows, GRPO prompt rows): the `n` groups of `key` first in a stable hash order go to GRPO, at
    most half of them (SFT keeps the rest)."""
    groups = sorted(examples[key].astype(str).unique(), key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    held = set(groups[: min(n, len(groups) // 2)])
    mask = examples[key].astype(str).isin(held)
    return examples[~mask].reset_index(drop=True), examples[mask].reset_index(drop=True)


def _grpo_prompt_dataset(rows: pd.DataFrame) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [json.loads(p) for p in rows["prompt_json"]],
            "example_id": [str(i) for i in rows["example_id"]],
            "node_ids": [json.loads(n) for n in rows["node_ids_json"]],
        }
    )


def _hf_from_examples(examples: pd.DataFrame) -> Dataset:
    """TRL's conversational prompt-completion dataset, each example with its ids and source node ids."""
    return Dataset.from_dict(
        {
            "prompt": [json.loads(p) for p in examples["prompt_json"]],
            "completion": [json.loads(c) for c in examples["completion_json"]],
            "example_id": [str(i) for i in examples["example_id"]],
            "dream_id": [str(d) for d in examples.get("dream_id", pd.Series([""] * len(examples)))],
            "node_ids": [json.loads(n) for n in examples["node_ids_json"]],
        }
    )


def _dream_examples(dreams: AssetHandle) -> tuple[pd.DataFrame, DreamCycleState]:
    """The kept responses of the dream cycle in the declared dream_scenarios version (the one this run
    dreamed, else the current one) as SFT rows, each with its dream id and source node ids; and that cycle."""
    state = DreamCycleState.load(dreams.file(CYCLE_FILE))
    frame = dreams.read("dream_scenarios")
    examples = sft_examples_from_dreams(frame[frame["cycle"] == state.cycle])
    if examples.empty:
        raise ValueError(
            f"dream cycle {state.cycle} kept no response: lower dream_scenarios' min_score or raise "
            "top_fraction"
        )
    return examples, state


def _external_examples(source: str) -> pd.DataFrame:
    """An external dataset as a table (nested values as JSON text): SFT on it as is."""
    external = load_training_dataset(source).to_pandas()
    for column in external.columns:
        if external[column].map(lambda v: isinstance(v, (list, dict, np.ndarray))).any():
            external[column] = external[column].map(
                lambda v: json.dumps(v.tolist() if isinstance(v, np.ndarray) else v, default=str)
            )
    return external


def build_examples(
    config: SFTDatasetConfig, nodes: pd.DataFrame, dreams: AssetHandle
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None, DreamCycleState | None]:
    """(SFT examples, held-out agent tasks, GRPO prompt rows or None, the dream cycle or None) from the
    configured source; the agent is evaluated on memory-graph tasks whatever the source."""
    data_config = library_config(config, SFTDataConfig)
    # extra nodes, split off for GRPO below
    data_config = data_config.model_copy(update={"max_examples": config.max_examples + config.grpo_prompts})
    templated, tasks = build_sft_examples(nodes, data_config)
    if config.source == DREAMS_SOURCE:
        examples, state = _dream_examples(dreams)
        sft_rows, grpo_rows = split_grpo_prompts(examples, config.grpo_prompts, "dream_id")
        return sft_rows, tasks, grpo_rows, state
    if config.source in TEMPLATE_SOURCES:
        templated = templated.assign(
            dream_id="", node_ids_json=[json.dumps([n]) for n in templated["node_id"]]
        )
        return (
            templated.head(config.max_examples).reset_index(drop=True),
            tasks,
            templated.iloc[config.max_examples :].reset_index(drop=True),
            None,
        )
    return _external_examples(config.source), tasks, None, None


def _hf_dataset(config: SFTDatasetConfig, examples: pd.DataFrame) -> Dataset:
    if config.source in TEMPLATE_SOURCES or config.source == DREAMS_SOURCE:
        return _hf_from_examples(examples)
    return load_training_dataset(config.source)


def _metadata(
    config: SFTDatasetConfig,
    examples: pd.DataFrame,
    tasks: pd.DataFrame,
    dataset: Dataset,
    grpo_rows: pd.DataFrame | None,
    cycle: int | None,
    version: str,
) -> dict[str, Any]:
    return {
        "source": config.source,
        "dream_cycle": cycle,
        "version": version,
        "rows": len(examples),
        "grpo_prompts": 0 if grpo_rows is None else len(grpo_rows),
        "agent_tasks": len(tasks),
        "seed_nodes": int(examples["node_ids_json"].map(json.loads).explode().nunique())
        if "node_ids_json" in examples.columns
        else 0,
        "columns": ", ".join(dataset.column_names),
        "preview": table_preview(
            examples.drop(
                columns=[c for c in ("prompt_json", "completion_json", "system") if c in examples.columns]
            )
        ),
    }


@dg.asset(
    group_name="training",
    ins={"memory_graph": dg.AssetIn(), "dream_scenarios": dg.AssetIn()},
    kinds={"duckdb", "huggingface"},
    check_specs=[CHAT_CHECK],
    description="Chat-format SFT examples (system + user prompt, one assistant answer). Default: the kept "
    "responses of the dream cycle this run dreamed, else the current one (filtered behavioural cloning), "
    "each with its dream id and source node ids, and that cycle's state (cycle.json) beside them; or short "
    "templated answers about memory nodes. DuckDB `sft_dataset` + held-out `agent_tasks` + the provenance "
    "view `sft_example_nodes`, and an HF dataset on disk (TRL's conversational prompt-completion).",
)
def sft_dataset(
    context: dg.AssetExecutionContext,
    config: SFTDatasetConfig,
    duckdb: DuckDBResource,
    artifacts: ArtifactStore,
    memory_graph: AssetHandle,
    dream_scenarios: AssetHandle,
) -> dg.MaterializeResult:
    examples, tasks, grpo_rows, state = build_examples(
        config, memory_graph.read("memory_nodes"), dream_scenarios
    )
    cycle = None if state is None else state.cycle
    dataset = _hf_dataset(config, examples)
    context.log.info(
        f"{len(examples)} SFT examples from {config.source}"
        + (f" (dream cycle {cycle})" if cycle is not None else "")
        + f", {len(tasks)} held-out tasks"
    )
    with artifacts.write_version("sft_dataset", run_id=context.run.run_id) as (tmp, version):
        dataset.save_to_disk(str(tmp / DATASET_DIR))
        if grpo_rows is not None and len(grpo_rows):
            _grpo_prompt_dataset(grpo_rows).save_to_disk(str(tmp / GRPO_PROMPTS_DIR))
        if state is not None:  # the cycle travels with its data: SFT trains from what dreamed it
            state.save(tmp)
        problem = hf_dataset_problem(tmp / DATASET_DIR)
    tables = {"sft_dataset": examples, "agent_tasks": tasks}
    write_tables(duckdb, tables)
    if "node_ids_json" in examples.columns:
        with storage.connect(duckdb.database) as con:
            con.execute(PROVENANCE_VIEW_SQL)
    path = artifacts.path("sft_dataset", version)
    artifacts.record("sft_dataset", version, dream_cycle=cycle, source=config.source)
    check = dg.AssetCheckResult(
        check_name=CHAT_CHECK.name, passed=problem is None, metadata={"problem": problem or "none"}
    )
    return materialized(
        examples,
        tasks,
        config=config,
        tables=tables,
        uri=path,
        check_results=[check],
        metadata=_metadata(config, examples, tasks, dataset, grpo_rows, cycle, version),
    )
