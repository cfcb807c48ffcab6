"""The training and evaluation groups: SFT data → SFT until crystallization → GRPO on CARL → gated agent."""

import json
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
from dagster_duckdb import DuckDBResource

from carl_assets import storage
from carl_assets.defs.common import config_values, materialized, table_preview
from carl_assets.defs.resources import ArtifactStore, append_rows, read_table, write_tables
from carl_assets.defs.training_config import (
    DREAMS_SOURCE,
    AgentEvaluationConfig,
    CrystallizationConfig,
    GRPOCheckpointConfig,
    SFTCheckpointConfig,
    SFTDatasetConfig,
)
from carl_assets.plotting import line_plot
from carl_assets.runtime import torch_threads

TEMPLATE_SOURCES = ("templates", "memory_graph")  # "memory_graph" is the older name of the templated source
DATASET_DIR = "dataset"  # the HF dataset (save_to_disk) inside an sft_dataset version
GRPO_PROMPTS_DIR = "grpo_prompts"  # prompts held out of SFT for GRPO, beside it
# Provenance: which memory nodes each SFT example came from (one row per example and seed node).
PROVENANCE_VIEW_SQL = """
CREATE OR REPLACE VIEW sft_example_nodes AS
SELECT example_id, dream_id, unnest(CAST(json_extract_string(node_ids_json, '$[*]') AS VARCHAR[])) AS node_id
FROM sft_dataset
"""


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _load_model(path: Path, device: Any = None, dtype: Any = None) -> tuple[Any, Any]:
    from carl_assets.models.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(path, device=device, dtype=dtype)


def _base_is_offline(artifacts: ArtifactStore) -> bool:
    """Whether the run's base model is the offline one (checkpoints trained from it keep no record)."""
    from carl_assets.models.defaults import is_offline_model

    return is_offline_model(artifacts.require("base_model"))


def _run_metadata(run: Any) -> dict[str, Any]:
    """The hyper-parameters a run actually used (after the model's defaults filled the 0/auto fields)."""
    names = ("learning_rate", "lr_scheduler_type", "warmup_ratio", "batch_size", "gradient_accumulation_steps",
             "max_steps", "gradient_checkpointing", "device", "dtype", "num_generations", "max_completion_length",
             "threads", "lora_r", "temperature", "top_p", "top_k", "min_p", "reward")
    return {f"run/{n}": getattr(run, n) for n in names if hasattr(run, n)}


def _weights_files(folder: Path) -> list[Path]:
    """What identifies a checkpoint's content: weights, configs and tokenizer files (not the logs)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in {".safetensors", ".json", ".jinja"}
                  and not p.name.endswith("_log.json") and p.name != "run.json")


def _weights_problem(folder: Path) -> str | None:
    """None if every safetensors file in the checkpoint holds only finite values, else what is wrong."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return "no safetensors weights"
    for file in files:
        for name, tensor in load_file(str(file)).items():
            if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                return f"{file.name}: {name} has non-finite values"
    return None


def _hf_dataset_problem(path: Path) -> str | None:
    """None if the dataset on disk is non-empty and chat-formatted (or plain text TRL accepts), else why not."""
    from datasets import load_from_disk

    dataset = load_from_disk(str(path))
    if len(dataset) == 0:
        return "the dataset is empty"
    columns = set(dataset.column_names)
    if {"prompt", "completion"} <= columns:
        for i, row in enumerate(dataset.select(range(min(len(dataset), 200)))):
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, list):
                if not prompt or prompt[-1].get("role") != "user":
                    return f"row {i}: the prompt does not end with a user message"
                if (not isinstance(completion, list) or len(completion) != 1
                        or completion[0].get("role") != "assistant" or not completion[0].get("content")):
                    return f"row {i}: the completion is not one non-empty assistant message"
            elif not str(completion):
                return f"row {i}: empty completion"
        return None
    if "messages" in columns:
        for i, row in enumerate(dataset.select(range(min(len(dataset), 200)))):
            roles = [m.get("role") for m in row["messages"]]
            if "assistant" not in roles:
                return f"row {i}: no assistant message"
        return None
    if "text" in columns:
        return None
    return f"no prompt/completion, messages or text columns (has {sorted(columns)})"


# --------------------------------------------------------------------------------------------
# sft_dataset
# --------------------------------------------------------------------------------------------


def _split_grpo_prompts(examples: pd.DataFrame, n: int, key: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(SFT rows, GRPO prompt rows): the `n` groups of `key` first in a stable hash order go to GRPO, at
    most half of them (SFT keeps the rest)."""
    import hashlib

    groups = sorted(examples[key].astype(str).unique(), key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    held = set(groups[: min(n, len(groups) // 2)])
    mask = examples[key].astype(str).isin(held)
    return examples[~mask].reset_index(drop=True), examples[mask].reset_index(drop=True)


def _grpo_prompt_dataset(rows: pd.DataFrame) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": [json.loads(p) for p in rows["prompt_json"]],
        "example_id": [str(i) for i in rows["example_id"]],
        "node_ids": [json.loads(n) for n in rows["node_ids_json"]],
    })


def _dream_examples(duckdb: DuckDBResource, run_id: str) -> tuple[pd.DataFrame, int]:
    """The kept responses of this run's dream cycle (else the latest one: dreams made by an earlier run)
    as SFT rows, each with its dream id and seed node ids. Another run's newer cycle is never taken."""
    from carl_assets.defs.dreams import run_cycle
    from carl_assets.dreams import sft_examples_from_dreams

    cycle = run_cycle(read_table(duckdb, "dream_cycles"), run_id)
    frame = read_table(duckdb, "dream_scenarios")
    examples = sft_examples_from_dreams(frame[frame["cycle"] == cycle])
    if examples.empty:
        raise ValueError(f"dream cycle {cycle} kept no response: lower dream_scenarios' min_score or raise "
                         "top_fraction")
    return examples, cycle


def _hf_from_examples(examples: pd.DataFrame) -> Any:
    """TRL's conversational prompt-completion dataset, each example with its ids and seed node ids."""
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": [json.loads(p) for p in examples["prompt_json"]],
        "completion": [json.loads(c) for c in examples["completion_json"]],
        "example_id": [str(i) for i in examples["example_id"]],
        "dream_id": [str(d) for d in examples.get("dream_id", pd.Series([""] * len(examples)))],
        "node_ids": [json.loads(n) for n in examples["node_ids_json"]],
    })


@dg.asset(
    group_name="training",
    deps=["memory_graph", "dream_scenarios"],
    kinds={"duckdb", "huggingface"},
    description="Chat-format SFT examples (system + user prompt, one assistant answer). Default: the kept "
    "responses of the latest dream cycle (filtered behavioural cloning), each with its dream id and seed node "
    "ids; or short templated answers about memory nodes. DuckDB `sft_dataset` + held-out `agent_tasks` + the "
    "provenance view `sft_example_nodes`, and an HF dataset on disk (TRL's conversational prompt-completion).",
)
def sft_dataset(context: dg.AssetExecutionContext, config: SFTDatasetConfig, duckdb: DuckDBResource,
                artifacts: ArtifactStore) -> dg.MaterializeResult:
    from carl_assets.carl.sft_data import SFTDataConfig, build_sft_examples
    from carl_assets.carl.training import load_training_dataset

    nodes = read_table(duckdb, "memory_nodes")
    data_config = SFTDataConfig(max_examples=config.max_examples, holdout_tasks=config.holdout_tasks,
                                tasks=tuple(config.tasks), excerpt_chars=config.excerpt_chars, seed=config.seed)
    data_config.max_examples += config.grpo_prompts  # extra nodes, split off for GRPO below
    templated, tasks = build_sft_examples(nodes, data_config)
    cycle = None
    grpo_rows = None
    if config.source == DREAMS_SOURCE:
        examples, cycle = _dream_examples(duckdb, context.run.run_id)
        examples, grpo_rows = _split_grpo_prompts(examples, config.grpo_prompts, "dream_id")
    elif config.source in TEMPLATE_SOURCES:
        templated = templated.assign(dream_id="", node_ids_json=[json.dumps([n]) for n in templated["node_id"]])
        examples = templated.head(config.max_examples).reset_index(drop=True)
        grpo_rows = templated.iloc[config.max_examples:].reset_index(drop=True)
    else:
        # An external dataset: SFT on it as is; the agent is still evaluated on memory-graph tasks.
        external = load_training_dataset(config.source).to_pandas()
        for column in external.columns:
            if external[column].map(lambda v: isinstance(v, (list, dict, np.ndarray))).any():
                external[column] = external[column].map(
                    lambda v: json.dumps(v.tolist() if isinstance(v, np.ndarray) else v, default=str))
        examples = external
    if config.source in TEMPLATE_SOURCES or config.source == DREAMS_SOURCE:
        dataset = _hf_from_examples(examples)
    else:
        dataset = load_training_dataset(config.source)
    context.log.info(f"{len(examples)} SFT examples from {config.source}"
                     + (f" (dream cycle {cycle})" if cycle is not None else "") + f", {len(tasks)} held-out tasks")
    with artifacts.write_version("sft_dataset", run_id=context.run.run_id) as (tmp, version):
        dataset.save_to_disk(str(tmp / DATASET_DIR))
        if grpo_rows is not None and len(grpo_rows):
            _grpo_prompt_dataset(grpo_rows).save_to_disk(str(tmp / GRPO_PROMPTS_DIR))
    tables = {"sft_dataset": examples, "agent_tasks": tasks}
    write_tables(duckdb, tables)
    if "node_ids_json" in examples.columns:
        with storage.connect(duckdb.database) as con:
            con.execute(PROVENANCE_VIEW_SQL)
    path = artifacts.path("sft_dataset", version)
    artifacts.record("sft_dataset", version, dream_cycle=cycle, source=config.source)
    return materialized(examples, tasks, config=config, tables=tables, uri=path, metadata={
        "source": config.source,
        "dream_cycle": cycle,
        "version": version,
        "rows": len(examples),
        "grpo_prompts": 0 if grpo_rows is None else len(grpo_rows),
        "agent_tasks": len(tasks),
        "seed_nodes": int(examples["node_ids_json"].map(json.loads).explode().nunique())
        if "node_ids_json" in examples.columns else 0,
        "columns": ", ".join(dataset.column_names),
        "preview": table_preview(examples.drop(columns=[c for c in ("prompt_json", "completion_json", "system")
                                                        if c in examples.columns])),
    })


@dg.asset_check(asset=sft_dataset, blocking=True,
                description="The HF dataset on disk is non-empty and chat-formatted (prompt ends with a user "
                "turn; one non-empty assistant completion), so SFT does not start on bad data.")
def sft_dataset_chat_formatted(artifacts: ArtifactStore) -> dg.AssetCheckResult:
    path = artifacts.require("sft_dataset", DATASET_DIR)
    problem = _hf_dataset_problem(path)
    return dg.AssetCheckResult(passed=problem is None, metadata={"problem": problem or "none"})


# --------------------------------------------------------------------------------------------
# sft_checkpoint
# --------------------------------------------------------------------------------------------


TEMPLATED_SFT_LR = 1.5e-3  # tuned: the offline model crystallizes on the 48 templated examples in ~120 steps


def _accuracy_plot(log: dict[str, Any]) -> bytes:
    rows = [r for r in log["log_history"] if r.get("mean_token_accuracy") is not None]
    steps = [r["step"] for r in rows]
    vlines = {f"crystallized (step {log['trigger_step']})": log["trigger_step"]} if log["triggered"] else {}
    return line_plot({"mean token accuracy": (steps, [r["mean_token_accuracy"] for r in rows])},
                     title="SFT: answer-token accuracy", xlabel="step", ylabel="accuracy",
                     vlines=vlines, hlines={f"threshold {log['threshold']}": log["threshold"]})


def _dream_cycle_row(duckdb: DuckDBResource, cycle: Any) -> dict[str, Any] | None:
    if cycle is None or (isinstance(cycle, float) and math.isnan(cycle)):
        return None
    try:
        cycles = read_table(duckdb, "dream_cycles")
    except LookupError:
        return None
    rows = cycles[cycles["cycle"] == int(cycle)]
    return rows.iloc[-1].to_dict() if len(rows) else None


def _sft_start(config: SFTCheckpointConfig, artifacts: ArtifactStore, duckdb: DuckDBResource
               ) -> tuple[str, str, Path, dict[str, Any] | None]:
    """(asset, version, folder, dream cycle row) of the weights this SFT run starts from."""
    from carl_assets.defs.dreams import parse_checkpoint_spec

    dataset_info = artifacts.versions("sft_dataset").info()
    cycle_row = _dream_cycle_row(duckdb, dataset_info.extra.get("dream_cycle"))
    if config.start_from.strip() not in ("", "auto"):
        asset, version = parse_checkpoint_spec(config.start_from)
    elif cycle_row is not None:
        asset, version = str(cycle_row["policy_asset"]), str(cycle_row["policy_version"])
    else:
        asset, version = "base_model", None
    folder = artifacts.require(asset, version=version)
    return asset, folder.name, folder, cycle_row


def _launched_sft(context: dg.AssetExecutionContext, pipes: dg.PipesSubprocessClient,
                  config: SFTCheckpointConfig, start_dir: Path, dataset_dir: Path, output_dir: Path,
                  run: Any) -> tuple[Any, dict[str, Any]]:
    """SFT in N processes (torchrun / accelerate launch) through Dagster Pipes, rank 0 saving into
    `output_dir`: (the outcome from the training log it wrote, the metadata it reported)."""
    from carl_assets.carl.distributed import (
        launch_command,
        outcome_from_log,
        parse_launcher,
        per_rank_batch,
        sft_arguments,
    )
    from carl_assets.carl.training import TRAINING_LOG_FILE

    per_rank_batch(run.batch_size, parse_launcher(config.launcher)[1])  # a clear error before launching
    arguments = sft_arguments(start_dir, dataset_dir, output_dir, run,
                              log_every=config.log_every, launcher=config.launcher)
    command = launch_command(config.launcher, arguments)
    context.log.info(f"SFT through Pipes: {' '.join(command[:command.index('-m', 2) + 2])} ...")
    invocation = pipes.run(command=command, context=context, extras={"launcher": config.launcher})
    reported = invocation.get_materialize_result()
    outcome = outcome_from_log(json.loads((output_dir / TRAINING_LOG_FILE).read_text()))
    metadata = dict(reported.metadata or {})
    if reported.data_version is not None:  # the weights' hash; the asset's data version adds its config
        metadata["weights_version"] = reported.data_version.value
    return outcome, metadata


def _resume_dir(artifacts: ArtifactStore, asset: str, *run_definition: Any) -> Path:
    """`artifacts/<asset>/.resume-<key>/`: trainer checkpoints of one run definition (its inputs' versions
    and its config less performance-only fields); hidden, so never listed as a version."""
    return storage.artifact_dir(asset, artifacts.root) / f".resume-{storage.content_hash(asset, *run_definition)}"


def _say_resuming(context: dg.AssetExecutionContext, resume_dir: Path) -> None:
    from carl_assets.carl.training import latest_checkpoint

    found = latest_checkpoint(resume_dir)
    if found is not None:
        context.log.info(f"resuming from step {found.step} (trainer checkpoint {found.path})")


@dg.asset(
    group_name="training",
    deps=["base_model", sft_dataset],
    kinds={"pytorch", "safetensors"},
    description="TRL SFTTrainer (logging_steps=1) with the PhaseTransitionGate: stops when 3 of the last 5 "
    "logged token accuracies reach 0.99 (crystallization) or at max steps. Starts from the checkpoint that "
    "dreamed the data (cycle n+1 from cycle n's weights) or base_model; each run is a new version folder "
    "under artifacts/sft_checkpoint (safetensors + training_log.json), the last N kept.",
)
def sft_checkpoint(context: dg.AssetExecutionContext, config: SFTCheckpointConfig, duckdb: DuckDBResource,
                   artifacts: ArtifactStore, pipes: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    from datasets import load_from_disk

    from carl_assets.carl.distributed import parse_launcher
    from carl_assets.carl.training import TRAINING_LOG_FILE, StepLogger, train_sft
    from carl_assets.models.defaults import training_defaults

    start_asset, start_version, start_dir, cycle_row = _sft_start(config, artifacts, duckdb)
    offline = _base_is_offline(artifacts)
    templated_lr = training_defaults(offline).sft.learning_rate  # offline: TEMPLATED_SFT_LR
    learning_rate = config.learning_rate or (float(cycle_row["learning_rate"]) if cycle_row else templated_lr)
    device, dtype, weights_dtype = config.placement(offline)
    run = config.run_config(learning_rate, offline, device, dtype)
    dataset_dir = artifacts.require("sft_dataset", DATASET_DIR)
    dataset = load_from_disk(str(dataset_dir))
    context.log.info(f"SFT from {start_asset}@{start_version} on {len(dataset)} examples, lr {learning_rate:.2e} "
                     f"({run.lr_scheduler_type}), batch {run.batch_size}x{run.gradient_accumulation_steps}, "
                     f"optim {config.optim}, {run.dtype} on {run.device}, at most {run.max_steps} steps")
    parents = {start_asset: start_version, "sft_dataset": dataset_dir.parent.name}
    logger = StepLogger(context.log.info, every=config.log_every, max_steps=run.max_steps, label="SFT")
    # Trainer checkpoints live outside the version folders, keyed by what defines the run: a rerun of the
    # same run resumes, a changed one starts afresh. Removed once the version is written.
    resume_dir = _resume_dir(artifacts, "sft_checkpoint", parents, config_values(config), learning_rate)
    with artifacts.write_version("sft_checkpoint", run_id=context.run.run_id, parents=parents) as (tmp, version):
        if parse_launcher(config.launcher)[0] == "inprocess":
            model, tokenizer = _load_model(start_dir, device, weights_dtype)
            _say_resuming(context, resume_dir)
            outcome = train_sft(model, tokenizer, dataset, tmp, run, extra_callbacks=[logger],
                                checkpoint_dir=resume_dir, save_steps=config.checkpoint_every)
            launched: dict[str, Any] = {"launcher": "inprocess", "world_size": 1}
        else:
            outcome, launched = _launched_sft(context, pipes, config, start_dir, dataset_dir, tmp, run)
        log = json.loads((tmp / TRAINING_LOG_FILE).read_text())
        log.update({"run_id": context.run.run_id, "finished_at": datetime.now(timezone.utc).isoformat(),
                    "version": version, "started_from": f"{start_asset}@{start_version}",
                    "dream_cycle": None if cycle_row is None else int(cycle_row["cycle"]),
                    "learning_rate": learning_rate})
        (tmp / TRAINING_LOG_FILE).write_text(json.dumps(log, indent=2, default=str) + "\n")
        version_files = [p.name for p in _weights_files(tmp)]
    shutil.rmtree(resume_dir, ignore_errors=True)
    path = artifacts.path("sft_checkpoint", version)
    _record_provenance(duckdb, "sft_checkpoint", version, dataset, parents)
    if outcome.crystallized:
        context.log.info(f"crystallized at step {outcome.trigger_step} ({outcome.seconds:.1f} s)")
    else:
        context.log.warning(f"did not crystallize within {outcome.max_steps} steps")
    return materialized(version_files, *[path / n for n in version_files], config=config, uri=path, metadata={
        "path": dg.MetadataValue.path(str(path)),
        "version": version,
        "started_from": f"{start_asset}@{start_version}",
        "dream_cycle": None if cycle_row is None else int(cycle_row["cycle"]),
        "learning_rate": learning_rate,
        "optim": config.optim,
        "crystallized": outcome.crystallized,
        "triggered": outcome.triggered,
        "trigger_step": outcome.trigger_step,
        "steps": outcome.steps,
        "max_steps": outcome.max_steps,
        "window_values": dg.MetadataValue.json([round(v, 4) for v in outcome.window_values]),
        "final_accuracy": outcome.final_accuracy,
        "peak_entropy": outcome.peak_entropy,
        "peak_entropy_step": outcome.peak_entropy_step,
        "train_seconds": round(outcome.seconds, 2),
        **_run_metadata(run),
        **launched,
        "resumed_from_step": outcome.resumed_from_step,
    }, plots={"accuracy_curve": _accuracy_plot(log)})


def _record_provenance(duckdb: DuckDBResource, asset: str, version: str, dataset: Any,
                       parents: dict[str, str]) -> None:
    """Append (asset, version, node, examples) rows: the memory nodes this checkpoint was trained on, and
    which checkpoint it started from (so `carl lineage --nodes` can follow the chain of cycles)."""
    from carl_assets.provenance import PROVENANCE_TABLE, provenance_rows

    rows = provenance_rows(asset, version, dataset["node_ids"] if "node_ids" in dataset.column_names else [],
                           parents)
    append_rows(duckdb, PROVENANCE_TABLE, rows, key="version")


def _weights_finite_check(asset: str, why: str) -> dg.AssetChecksDefinition:
    """A blocking check that every safetensors weight of the asset's checkpoint (its run's version) is finite."""

    @dg.asset_check(asset=asset, name=f"{asset}_weights_finite", blocking=True,
                    description=f"The checkpoint's safetensors weights are all finite ({why}).")
    def _check(artifacts: ArtifactStore) -> dg.AssetCheckResult:
        problem = _weights_problem(artifacts.require(asset))
        return dg.AssetCheckResult(passed=problem is None, metadata={"problem": problem or "none"})

    return _check


sft_checkpoint_weights_finite = _weights_finite_check("sft_checkpoint", "GRPO does not start from a broken model")


# --------------------------------------------------------------------------------------------
# crystallization_events
# --------------------------------------------------------------------------------------------


@dg.asset(
    group_name="training",
    deps=[sft_checkpoint],
    kinds={"duckdb"},
    check_specs=[dg.AssetCheckSpec("sft_crystallized", asset="crystallization_events", blocking=True,
                                   description="SFT crystallized (the gate fired before max steps); blocks GRPO "
                                   "unless require_crystallization is off")],
    description="One row per SFT run in DuckDB `crystallization_events` (appended across runs: triggered, trigger "
    "step, the gate window's values, peak entropy and its step, threshold, max steps), and the per-step "
    "`training_log` (accuracy, entropy, loss) of each run. Its blocking sft_crystallized check holds GRPO back "
    "when SFT never crystallized.",
)
def crystallization_events(context: dg.AssetExecutionContext, config: CrystallizationConfig,
                           duckdb: DuckDBResource, artifacts: ArtifactStore) -> dg.MaterializeResult:
    from carl_assets.carl.training import TRAINING_LOG_FILE

    log = json.loads(artifacts.require("sft_checkpoint", TRAINING_LOG_FILE).read_text())
    run_id = str(log.get("run_id") or "unknown")
    event = pd.DataFrame([{
        "run_id": run_id,
        "checkpoint_version": str(log.get("version", "")),
        "started_from": str(log.get("started_from", "")),
        "dream_cycle": log.get("dream_cycle"),
        "finished_at": str(log.get("finished_at", "")),
        "triggered": bool(log["triggered"]),
        "crystallized": bool(log["crystallized"]),
        "trigger_step": int(log["trigger_step"]),
        "window_values": json.dumps([float(v) for v in log["window_values"]]),
        "peak_entropy": float(log["peak_entropy"]),
        "peak_entropy_step": int(log["peak_entropy_step"]),
        "threshold": float(log["threshold"]),
        "max_steps": int(log["max_steps"]),
        "steps": int(log["steps"]),
        "final_accuracy": log.get("final_accuracy"),
        "train_seconds": float(log["seconds"]),
    }])
    steps = pd.DataFrame([{
        "run_id": run_id,
        "step": int(r["step"]),
        "loss": r.get("loss"),
        "mean_token_accuracy": r.get("mean_token_accuracy"),
        "entropy": r.get("entropy"),
        "learning_rate": r.get("learning_rate"),
        "grad_norm": r.get("grad_norm"),
        "num_tokens": r.get("num_tokens"),
    } for r in log["log_history"]], columns=["run_id", "step", "loss", "mean_token_accuracy", "entropy",
                                             "learning_rate", "grad_norm", "num_tokens"])
    for column in steps.columns[1:]:
        steps[column] = pd.to_numeric(steps[column], errors="coerce")
    events = append_rows(duckdb, "crystallization_events", event, key="run_id")
    training_log = append_rows(duckdb, "training_log", steps, key="run_id")
    context.log.info(f"{len(events)} SFT runs recorded; this one crystallized={log['crystallized']}")
    crystallized = bool(log["crystallized"])
    final = log.get("final_accuracy")
    why = (f"crystallized at step {int(log['trigger_step'])} of {int(log['max_steps'])}" if crystallized else
           f"SFT ran {int(log['steps'])} of {int(log['max_steps'])} steps and the gate never fired (3 of 5 logged "
           f"token accuracies >= {float(log['threshold']):.2f}; last accuracy "
           f"{'n/a' if final is None else f'{float(final):.3f}'}): raise sft_checkpoint.max_steps or its learning "
           "rate, or set crystallization_events.require_crystallization: false to let GRPO run anyway")
    check = dg.AssetCheckResult(
        check_name="sft_crystallized",
        passed=crystallized,
        description=why,
        severity=dg.AssetCheckSeverity.ERROR if config.require_crystallization else dg.AssetCheckSeverity.WARN,
        metadata={"trigger_step": int(log["trigger_step"]), "max_steps": int(log["max_steps"]),
                  "checkpoint_version": str(log.get("version", "")),
                  "require_crystallization": config.require_crystallization},
    )
    return materialized(event.drop(columns=["finished_at", "train_seconds", "checkpoint_version"]), steps.drop(columns=["run_id"]),
                        config=config, check_results=[check],
                        tables={"crystallization_events": events, "training_log": training_log},
                        metadata={
                            "runs": len(events),
                            "crystallized_runs": int(events["crystallized"].astype(bool).sum()),
                            "this_run_crystallized": bool(log["crystallized"]),
                            "trigger_step": int(log["trigger_step"]),
                            "training_log_rows": len(training_log),
                            "events": table_preview(events.tail(10)),
                        }, plots={"accuracy_curve": _accuracy_plot(log)})


# --------------------------------------------------------------------------------------------
# grpo_checkpoint
# --------------------------------------------------------------------------------------------


GRPO_COMPLETION_COLUMNS = ["step", "index", "group", "completion", "reward", "multiscale", "cloud_quality",
                           "discontinuity", "phi_mean"]
GRPO_REWARD_COLUMNS = ["step", "reward", "reward_std", "frac_reward_zero_std", "multiscale", "cloud_quality",
                       "discontinuity", "phi_mean", "loss", "completion_mean_length", "entropy"]


def _grpo_step_table(history: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for r in history:
        if r.get("reward") is None:
            continue
        rows.append({
            "step": int(r["step"]),
            "reward": r.get("reward"),
            "reward_std": r.get("reward_std"),
            "frac_reward_zero_std": r.get("frac_reward_zero_std"),
            **{k: r.get(f"carl/{k}") for k in ("multiscale", "cloud_quality", "discontinuity", "phi_mean")},
            "loss": r.get("loss"),
            "completion_mean_length": r.get("completions/mean_length"),
            "entropy": r.get("entropy"),
        })
    table = pd.DataFrame(rows, columns=GRPO_REWARD_COLUMNS)
    for column in GRPO_REWARD_COLUMNS[1:]:
        table[column] = pd.to_numeric(table[column], errors="coerce")
    return table


@dg.asset(
    group_name="training",
    deps=[sft_checkpoint, sft_dataset, crystallization_events],
    kinds={"pytorch", "safetensors", "duckdb"},
    check_specs=[dg.AssetCheckSpec("grpo_reward_spread", asset="grpo_checkpoint", blocking=True,
                                   description="GRPO had a signal: the mean over steps of TRL's "
                                   "frac_reward_zero_std (groups whose completions all scored alike, so their "
                                   "advantages are zero) is below max_frac_reward_zero_std")],
    description="TRL GRPOTrainer from the SFT checkpoint with the CARL composite reward (beta=0) on prompts held "
    "out of SFT (sft_dataset's grpo_prompts), once the sft_crystallized check passed; its blocking "
    "grpo_reward_spread check requires within-group reward spread. Each run a new version under "
    "artifacts/grpo_checkpoint "
    "(the policy the next dream cycle starts from); per-step reward and CARL components in DuckDB "
    "`grpo_rewards`, every scored completion in `grpo_completions`.",
)
def grpo_checkpoint(context: dg.AssetExecutionContext, config: GRPOCheckpointConfig, duckdb: DuckDBResource,
                    artifacts: ArtifactStore) -> dg.MaterializeResult:
    from datasets import load_from_disk

    from carl_assets.carl.training import StepLogger, train_grpo

    sft_dir = artifacts.require("sft_checkpoint")
    offline = _base_is_offline(artifacts)
    device, dtype, weights_dtype = config.placement(offline)
    run = config.run_config(offline, device, dtype)
    model, tokenizer = _load_model(sft_dir, device, weights_dtype)
    dataset_dir = artifacts.require("sft_dataset", DATASET_DIR)
    held_out = dataset_dir.parent / GRPO_PROMPTS_DIR
    if held_out.exists():
        dataset = load_from_disk(str(held_out))
    else:  # an external SFT dataset: GRPO on its prompts, which SFT has seen
        dataset = load_from_disk(str(dataset_dir))
        context.log.warning("sft_dataset has no held-out grpo_prompts: GRPO uses the SFT prompts")
    context.log.info(f"GRPO from sft_checkpoint@{sft_dir.name} on {len(dataset)} prompts for {run.max_steps} "
                     f"steps, {run.num_generations} generations per prompt of {run.max_completion_length} tokens, "
                     f"lr {run.learning_rate:.2e}, {run.dtype} on {run.device}")
    parents = {"sft_checkpoint": sft_dir.name, "sft_dataset": dataset_dir.parent.name}
    logger = StepLogger(context.log.info, every=config.log_every, max_steps=run.max_steps, label="GRPO")
    resume_dir = _resume_dir(artifacts, "grpo_checkpoint", parents, config_values(config))
    _say_resuming(context, resume_dir)
    with artifacts.write_version("grpo_checkpoint", run_id=context.run.run_id, parents=parents) as (tmp, version):
        outcome = train_grpo(model, tokenizer, dataset, tmp, run, extra_callbacks=[logger],
                             checkpoint_dir=resume_dir, save_steps=config.checkpoint_every)
        version_files = [p.name for p in _weights_files(tmp)]
    shutil.rmtree(resume_dir, ignore_errors=True)
    steps = _grpo_step_table(outcome.log_history)
    completions = pd.DataFrame(outcome.completions, columns=GRPO_COMPLETION_COLUMNS)
    write_tables(duckdb, {"grpo_rewards": steps, "grpo_completions": completions})
    _record_provenance(duckdb, "grpo_checkpoint", version, dataset, parents)
    path = artifacts.path("grpo_checkpoint", version)
    reward_std = outcome.reward_std
    zero_std = float(steps["frac_reward_zero_std"].mean()) if len(steps) else 1.0
    spread_check = dg.AssetCheckResult(
        check_name="grpo_reward_spread",
        passed=bool(zero_std < config.max_frac_reward_zero_std),
        metadata={"mean_frac_reward_zero_std": zero_std, "bound": config.max_frac_reward_zero_std,
                  "mean_within_group_reward_std": outcome.mean_step_reward_std, "steps": len(steps)},
    )
    plot = line_plot(
        {"mean CARL reward": (steps["step"], steps["reward"]),
         "reward std (within step)": (steps["step"], steps["reward_std"]),
         "phi mean": (steps["step"], steps["phi_mean"])},
        title="GRPO on the CARL reward", xlabel="step", ylabel="value")
    return materialized(version_files, *[path / n for n in version_files], config=config, uri=path,
                        check_results=[spread_check],
                        tables={"grpo_rewards": steps, "grpo_completions": completions}, metadata={
        "path": dg.MetadataValue.path(str(path)),
        "version": version,
        "started_from": f"sft_checkpoint@{sft_dir.name}",
        "steps": outcome.steps,
        "completions_scored": len(completions),
        "reward_first": float(steps["reward"].iloc[0]) if len(steps) else None,
        "reward_last": float(steps["reward"].iloc[-1]) if len(steps) else None,
        "reward_std": reward_std,
        "mean_step_reward_std": outcome.mean_step_reward_std,
        "rewards_vary": bool(reward_std > 0),
        "prompts": len(dataset),
        "mean_frac_reward_zero_std": zero_std,
        "resumed_from_step": outcome.resumed_from_step,
        "train_seconds": round(outcome.seconds, 2),
        **_run_metadata(run),
        "rewards": table_preview(steps, rows=20),
    }, plots={"reward_curve": plot})


grpo_checkpoint_weights_finite = _weights_finite_check("grpo_checkpoint", "before the agent is evaluated")


# --------------------------------------------------------------------------------------------
# agent_evaluation
# --------------------------------------------------------------------------------------------


def _agent_placement(config: AgentEvaluationConfig, artifacts: ArtifactStore) -> tuple[Any, Any]:
    from carl_assets.models.defaults import resolve_placement

    return resolve_placement(config.device, config.dtype, _base_is_offline(artifacts))


READOUT_TABLE_COLUMNS = ["checkpoint", "task_id", "emotion", "layer", "projection"]


def _readout(artifacts: ArtifactStore, results: pd.DataFrame, tasks: pd.DataFrame,
             placement: tuple[Any, Any] = (None, None)) -> tuple[pd.DataFrame, str]:
    """The amygdala readout of each agent turn (prompt and response, as served), per checkpoint, task,
    emotion and readout layer: what a vLLM readout would report while the agent answers. With a skipped
    (empty) readout: no rows, and the reason it was skipped."""
    from carl_assets.steering import load_readout
    from carl_assets.steering.readout import readout_projections, readout_skipped

    vectors = load_readout(artifacts.require("steering_vectors"))
    if readout_skipped(vectors):
        return pd.DataFrame(columns=READOUT_TABLE_COLUMNS), f"steering_vectors was skipped: {readout_skipped(vectors)}"
    frames = []
    for name, part in results.groupby("checkpoint", sort=False):
        model, tokenizer = _load_model(artifacts.require(str(name)), *placement)
        observation = dict(zip(tasks["task_id"], tasks["observation"], strict=True))
        texts = [f"{observation.get(t, '')}\n\n{i}\n{r}" for t, i, r in zip(part["task_id"], part["instruction"],
                                                                           part["raw_response"], strict=True)]
        projections = readout_projections(model, tokenizer, texts, vectors)
        projections["checkpoint"] = name
        projections["task_id"] = part["task_id"].to_numpy()[projections["text_index"].to_numpy()]
        frames.append(projections.drop(columns=["text_index"]))
    return pd.concat(frames, ignore_index=True)[READOUT_TABLE_COLUMNS], ""


def _readout_heatmap(readout: pd.DataFrame) -> bytes:
    """Mean projection per emotion (rows) for each checkpoint (columns) at the deepest readout layer."""
    from carl_assets.plotting import figure_png, plt

    deepest = readout[readout["layer"] == readout["layer"].max()]
    grid = deepest.pivot_table(index="emotion", columns="checkpoint", values="projection", aggfunc="mean")
    fig, ax = plt.subplots(figsize=(4.2, 0.6 + 0.3 * len(grid)))
    bound = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
    image = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), list(grid.columns))
    ax.set_yticks(range(grid.shape[0]), list(grid.index))
    ax.set_title(f"readout: mean projection, layer {int(deepest['layer'].max())}")
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    return figure_png(fig)


def _evaluate_checkpoint(context: dg.AssetExecutionContext, artifacts: ArtifactStore, name: str,
                         tasks: pd.DataFrame, config: AgentEvaluationConfig, frames: list, summaries: list) -> None:
    from carl_assets.carl.agent import evaluate_agent, summarise_evaluation

    model, tokenizer = _load_model(artifacts.require(name), *_agent_placement(config, artifacts))
    evaluation = evaluate_agent(model, tokenizer, tasks, gate_threshold=config.gate_threshold,
                                max_new_tokens=config.max_new_tokens,
                                sampling=config.sampling(_base_is_offline(artifacts)))
    evaluation.insert(0, "checkpoint", name)
    frames.append(evaluation)
    summaries.append({"checkpoint": name, **summarise_evaluation(evaluation)})
    context.log.info(f"{name}: {summaries[-1]}")


@dg.asset(
    group_name="evaluation",
    deps=[grpo_checkpoint, sft_checkpoint, sft_dataset, "steering_vectors"],
    kinds={"duckdb"},
    description="The seed's coherence-gated agent step on held-out memory tasks, for the SFT and GRPO "
    "checkpoints: response or abstain, phi mean, confidence, CARL reward; and the amygdala readout of each "
    "turn (residual stream projected on the steering vectors, as a vLLM readout does when serving). DuckDB "
    "`agent_evaluation` (one row per task and checkpoint), `agent_evaluation_summary` (act rate, mean "
    "reward) and `agent_readout` (per checkpoint, task, emotion and layer).",
)
def agent_evaluation(context: dg.AssetExecutionContext, config: AgentEvaluationConfig, duckdb: DuckDBResource,
                     artifacts: ArtifactStore) -> dg.MaterializeResult:
    tasks = read_table(duckdb, "agent_tasks")
    if config.max_tasks:
        tasks = tasks.head(config.max_tasks)
    if tasks.empty:
        raise ValueError("agent_tasks is empty: give sft_dataset some holdout_tasks")
    frames, summaries = [], []
    from carl_assets.models.defaults import resolve_threads

    with torch_threads(resolve_threads(config.threads, _base_is_offline(artifacts))):
        for name in ("sft_checkpoint", "grpo_checkpoint"):
            _evaluate_checkpoint(context, artifacts, name, tasks, config, frames, summaries)
        results = pd.concat(frames, ignore_index=True)
        readout, readout_skipped = _readout(artifacts, results, tasks, _agent_placement(config, artifacts))
    if readout_skipped:
        context.log.warning(f"agent readout skipped: {readout_skipped}")
    summary = pd.DataFrame(summaries)
    tables = {"agent_evaluation": results, "agent_evaluation_summary": summary, "agent_readout": readout}
    write_tables(duckdb, tables)
    by_name = {s["checkpoint"]: s for s in summaries}
    plot = line_plot(
        {name: (list(range(len(f))), f["phi_mean"]) for name, f in zip(("sft", "grpo"), frames, strict=True)},
        title="agent: phi mean per held-out task", xlabel="task", ylabel="phi mean",
        hlines={f"gate threshold {config.gate_threshold:.4f}": config.gate_threshold})
    metadata: dict[str, Any] = {"tasks": len(tasks), "summary": table_preview(summary),
                                "preview": table_preview(results[["checkpoint", "instruction", "expected", "response",
                                                                  "confidence", "phi_mean", "reward"]])}
    for name, short in (("sft_checkpoint", "sft"), ("grpo_checkpoint", "grpo")):
        metadata[f"{short}_act_rate"] = by_name[name]["act_rate"]
        metadata[f"{short}_mean_reward"] = by_name[name]["mean_reward"]
        metadata[f"{short}_mean_phi"] = by_name[name]["mean_phi"]
        metadata[f"{short}_exact_match_rate"] = by_name[name]["exact_match_rate"]
    metadata["readout_rows"] = len(readout)
    if readout_skipped:
        metadata["readout_skipped_reason"] = readout_skipped
    device, dtype = _agent_placement(config, artifacts)
    metadata.update({"device": str(device), "dtype": str(dtype).removeprefix("torch.")})
    return materialized(results.drop(columns=["raw_response"]), readout, config=config, metadata=metadata,
                        tables=tables, plots={"phi_per_task": plot,
                                              **({"readout_heatmap": _readout_heatmap(readout)} if len(readout) else {})})
