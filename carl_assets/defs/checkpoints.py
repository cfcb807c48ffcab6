"""What the training assets share: a checkpoint's content files and the check that its weights are finite,
trainer checkpoints kept for resuming, provenance rows, and the hyper-parameters a run used."""

from enum import Enum
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource
from safetensors.torch import load_file

from carl_assets import storage
from carl_assets.carl.training import latest_checkpoint
from carl_assets.defs.resources import ArtifactStore, append_rows
from carl_assets.plotting import line_plot
from carl_assets.provenance import PROVENANCE_TABLE, provenance_rows

# The run-config fields reported as `run/<name>` metadata, where the run config has them.
RUN_FIELDS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "gradient_checkpointing",
    "device",
    "dtype",
    "num_generations",
    "max_completion_length",
    "threads",
    "lora_r",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "reward",
)


def run_metadata(run: Any) -> dict[str, Any]:
    """The hyper-parameters a run actually used (after the model's defaults filled the 0/auto fields); a
    choice made of an Enum is reported by its value (Dagster's metadata takes plain values)."""
    return {f"run/{n}": plain(getattr(run, n)) for n in RUN_FIELDS if hasattr(run, n)}


def plain(value: Any) -> Any:
    """An Enum choice as its value, anything else as it is (Dagster's metadata refuses Enums)."""
    return value.value if isinstance(value, Enum) else value


def weights_files(folder: Path) -> list[Path]:
    """What identifies a checkpoint's content: weights, configs and tokenizer files (not the logs)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and p.suffix in {".safetensors", ".json", ".jinja"}
        and not p.name.endswith("_log.json")
        and p.name != "run.json"
    )


def weights_problem(folder: Path) -> str | None:
    """None if every safetensors file in the checkpoint holds only finite values, else what is wrong."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return "no safetensors weights"
    for file in files:
        for name, tensor in load_file(str(file)).items():
            if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                return f"{file.name}: {name} has non-finite values"
    return None


def weights_check_spec(asset: str, why: str) -> dg.AssetCheckSpec:
    """The blocking `<asset>_weights_finite` check, judged by the asset on the version it just wrote."""
    return dg.AssetCheckSpec(
        f"{asset}_weights_finite",
        asset=asset,
        blocking=True,
        description=f"The checkpoint's safetensors weights are all finite ({why}).",
    )


def weights_check(asset: str, folder: Path) -> dg.AssetCheckResult:
    """The result of `weights_check_spec(asset, ...)` for the checkpoint in `folder`."""
    problem = weights_problem(folder)
    return dg.AssetCheckResult(
        check_name=f"{asset}_weights_finite", passed=problem is None, metadata={"problem": problem or "none"}
    )


def resume_dir(artifacts: ArtifactStore, asset: str, *run_definition: Any) -> Path:
    """`artifacts/<asset>/.resume-<key>/`: trainer checkpoints of one run definition (its inputs' versions
    and its config less performance-only fields); hidden, so never listed as a version."""
    return (
        storage.artifact_dir(asset, artifacts.root)
        / f".resume-{storage.content_hash(asset, *run_definition)}"
    )


def say_resuming(context: dg.AssetExecutionContext, folder: Path) -> None:
    """Log the step a trainer resumes from, when `folder` holds a trainer checkpoint."""
    found = latest_checkpoint(folder)
    if found is not None:
        context.log.info(f"resuming from step {found.step} (trainer checkpoint {found.path})")


def record_provenance(
    duckdb: DuckDBResource, asset: str, version: str, dataset: Any, parents: dict[str, str]
) -> None:
    """Append (asset, version, node, examples) rows: the memory nodes this checkpoint was trained on, and
    which checkpoint it started from (so `carl lineage --nodes` can follow the chain of cycles)."""
    rows = provenance_rows(
        asset, version, dataset["node_ids"] if "node_ids" in dataset.column_names else [], parents
    )
    append_rows(duckdb, PROVENANCE_TABLE, rows, key="version")


def accuracy_plot(log: dict[str, Any]) -> bytes:
    """SFT's answer-token accuracy per logged step, the gate's threshold and the step it fired at."""
    rows = [r for r in log["log_history"] if r.get("mean_token_accuracy") is not None]
    steps = [r["step"] for r in rows]
    vlines = {f"crystallized (step {log['trigger_step']})": log["trigger_step"]} if log["triggered"] else {}
    return line_plot(
        {"mean token accuracy": (steps, [r["mean_token_accuracy"] for r in rows])},
        title="SFT: answer-token accuracy",
        xlabel="step",
        ylabel="accuracy",
        vlines=vlines,
        hlines={f"threshold {log['threshold']}": log["threshold"]},
    )
