"""SFT past one process: `carl_assets.carl.distributed` under torchrun (2 CPU processes, gloo), alone and as
the `sft_checkpoint` asset's `launcher: torchrun:2` through Dagster Pipes, against the in-process run."""

from __future__ import annotations

import copy
import json
import subprocess

import dagster as dg
import pytest
from safetensors import safe_open

from carl_assets.carl.distributed import (
    World,
    config_from_json,
    launch_command,
    outcome_from_log,
    parse_launcher,
    per_rank_batch,
    sft_arguments,
    sft_summary,
)
from carl_assets.carl.training import TRAINING_LOG_FILE, SFTOutcome, SFTRunConfig
from carl_assets.defs import memory, models, sft, sft_training
from carl_assets.defs.resources import build_resources
from carl_assets.defs.training_config import SFTCheckpointConfig
from tests.tiny_run import TINY_BASE_MODEL
from tests.upstreams import with_upstreams

# --------------------------------------------------------------------------------------------
# Launcher strings, worlds and configs (fast)
# --------------------------------------------------------------------------------------------


def test_parse_launcher_accepts_the_three_forms_and_names_a_bad_one():
    assert parse_launcher("inprocess") == ("inprocess", 1)
    assert parse_launcher(" TorchRun:2 ") == ("torchrun", 2)
    assert parse_launcher("accelerate:8") == ("accelerate", 8)
    for bad in ("torchrun", "torchrun:0", "torchrun:-1", "torchrun:two", "mpirun:2", ""):
        with pytest.raises(ValueError, match="launcher"):
            parse_launcher(bad)


def test_launch_commands_run_this_module_under_the_launcher():
    args = ["sft", "--model", "m"]
    torchrun = launch_command("torchrun:3", args, python="py")
    assert torchrun[:3] == ["py", "-m", "torch.distributed.run"]
    assert torchrun[torchrun.index("--nproc_per_node") + 1] == "3" and "--standalone" in torchrun
    assert torchrun[-5:] == ["-m", "carl_assets.cli", *args]
    accelerate = launch_command("accelerate:2", args, python="py")
    assert accelerate[:3] == ["py", "-m", "accelerate.commands.launch"] and "--multi_gpu" in accelerate
    assert accelerate[accelerate.index("--num_processes") + 1] == "2"
    assert accelerate[-5:] == ["-m", "carl_assets.cli", *args]
    assert "--multi_gpu" not in launch_command("accelerate:1", args, python="py")
    assert launch_command("inprocess", args, python="py") == ["py", "-m", "carl_assets.cli", *args]


def test_world_from_env_and_batch_split():
    assert World.from_env({}) == World(0, 1, 0) and World.from_env({}).is_main
    world = World.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (world.rank, world.world_size, world.is_main) == (1, 2, False)
    with pytest.raises(ValueError, match="RANK=2 is not in a world of WORLD_SIZE=2"):
        World.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="integers"):
        World.from_env({"WORLD_SIZE": "two"})
    assert per_rank_batch(8, 2) == 4 and per_rank_batch(8, 1) == 8
    with pytest.raises(ValueError, match="batch_size 6 does not split evenly over 4 processes"):
        per_rank_batch(6, 4)


def test_config_json_round_trip_and_errors():
    config = SFTRunConfig(max_steps=7, batch_size=4, learning_rate=0.02, optim_target_modules=["q_proj"])
    arguments = sft_arguments("m", "d", "o", config, log_every=3, launcher="torchrun:2")
    assert config_from_json(arguments[arguments.index("--config") + 1]) == config
    assert arguments[arguments.index("--log-every") + 1] == "3"
    with pytest.raises(ValueError, match="unknown SFTRunConfig field.*bogus"):
        config_from_json('{"max_steps": 2, "bogus": 1}')
    with pytest.raises(ValueError, match="not JSON"):
        config_from_json("{max_steps: 2}")
    with pytest.raises(ValueError, match="JSON object"):
        config_from_json("[1, 2]")


def test_outcome_from_log_inverts_the_training_log():
    outcome = SFTOutcome(
        triggered=True,
        trigger_step=12,
        window_values=[0.99, 1.0],
        peak_entropy=2.5,
        peak_entropy_step=3,
        threshold=0.99,
        max_steps=20,
        steps=12,
        seconds=1.234,
        log_history=[{"step": 1, "loss": 3.0}],
        final_accuracy=1.0,
    )
    log = {**json.loads(json.dumps(outcome.to_dict())), "config": {}, "run_id": "r"}
    again = outcome_from_log(log)
    assert again == outcome and again.crystallized
    assert sft_summary(again)["train_seconds"] == pytest.approx(1.23)
    del log["steps"], log["threshold"]
    with pytest.raises(ValueError, match="lacks steps, threshold"):
        outcome_from_log(log)


# --------------------------------------------------------------------------------------------
# The module under torchrun, without Dagster
# --------------------------------------------------------------------------------------------


def _tensor_shapes(folder) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def _sft_data(tiny_texts):
    from datasets import Dataset

    texts = tiny_texts[:8]
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": t}] for t in texts],
            "completion": [[{"role": "assistant", "content": t.split()[-1]}] for t in texts],
        }
    )


@pytest.mark.slow
def test_module_trains_under_torchrun_with_two_cpu_processes(tmp_path, tiny_model_and_tokenizer, tiny_texts):
    model, tokenizer = tiny_model_and_tokenizer
    model = copy.deepcopy(model)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    _sft_data(tiny_texts).save_to_disk(str(tmp_path / "data"))
    config = SFTRunConfig(max_steps=4, batch_size=4, learning_rate=1e-2, threads=1)
    command = launch_command(
        "torchrun:2",
        sft_arguments(
            tmp_path / "model",
            tmp_path / "data",
            tmp_path / "out",
            config,
            log_every=1,
            launcher="torchrun:2",
        ),
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "out"
    log = json.loads((out / TRAINING_LOG_FILE).read_text())
    assert log["distributed"] == {
        "world_size": 2,
        "backend": "gloo",
        "launcher": "torchrun:2",
        "per_rank_batch_size": 2,
        "global_batch_size": 4,
    }
    assert log["config"]["batch_size"] == 4 and log["steps"] == 4
    losses = [r["loss"] for r in log["log_history"] if r.get("loss") is not None]
    assert len(losses) == 4 and losses[-1] < 0.95 * losses[0]  # it trained
    # The same tensors as the starting model, changed by training and finite.
    start = _tensor_shapes(tmp_path / "model")
    assert _tensor_shapes(out) == start
    from safetensors.torch import load_file

    before, after = (
        load_file(str(tmp_path / "model" / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    assert all(after[k].isfinite().all() for k in after)
    assert any(not after[k].equal(before[k]) for k in after)
    # Only rank 0 reports (no Pipes here: its progress goes to stderr).
    assert "[rank 0/2] SFT step 4/4" in done.stderr and "[rank 1/2]" not in done.stderr


# --------------------------------------------------------------------------------------------
# The asset: launcher torchrun:2 through Pipes vs in process
# --------------------------------------------------------------------------------------------

TINY = {
    "base_model": TINY_BASE_MODEL,
    "sft_dataset": {"source": "templates", "max_examples": 8, "holdout_tasks": 3},
    "sft_checkpoint": {"max_steps": 4, "learning_rate": 1e-2, "batch_size": 4, "log_every": 1},
}


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    events = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    assert len(events) == 1
    return {k: getattr(v, "value", v) for k, v in events[0].materialization.metadata.items()}


@pytest.mark.slow
def test_sft_checkpoint_under_torchrun_through_pipes_matches_in_process(tmp_path):
    resources = build_resources(tmp_path / "home")
    instance = dg.DagsterInstance.ephemeral()
    upstream = with_upstreams(
        memory.memory_graph, models.base_model, sft.sft_dataset, sft_training.sft_checkpoint
    )
    inproc = dg.materialize(
        upstream,
        resources=resources,
        instance=instance,
        run_config={"ops": {k: {"config": v} for k, v in TINY.items()}},
    )
    assert inproc.success
    launched = dg.materialize(
        with_upstreams(sft_training.sft_checkpoint),
        resources=resources,
        instance=instance,
        run_config={
            "ops": {"sft_checkpoint": {"config": {**TINY["sft_checkpoint"], "launcher": "torchrun:2"}}}
        },
    )
    assert launched.success

    one, two = _metadata(inproc, "sft_checkpoint"), _metadata(launched, "sft_checkpoint")
    # Same inputs: both started from the same base_model version on the same dataset.
    assert one["started_from"] == two["started_from"] and one["version"] != two["version"]
    assert set(one) <= set(two) and two["world_size"] == 2 and one["world_size"] == 1
    assert two["launcher"] == "torchrun:2" and two["backend"] == "gloo" and two["per_rank_batch_size"] == 2
    assert one["steps"] == two["steps"] == 4 and one["crystallized"] is two["crystallized"] is False
    assert len(two["weights_version"]) == 16 and two["data_version"] != one["data_version"]

    # Checkpoints equivalent in shape and metadata.
    versions = tmp_path / "home" / "artifacts" / "sft_checkpoint"
    a, b = versions / one["version"], versions / two["version"]
    assert _tensor_shapes(a) == _tensor_shapes(b)
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    log_a, log_b = (json.loads((f / TRAINING_LOG_FILE).read_text()) for f in (a, b))
    assert set(log_a) | {"distributed"} == set(log_b)
    assert log_b["run_id"] == launched.run_id and log_b["distributed"]["world_size"] == 2
    assert log_b["config"] == log_a["config"]  # the global batch recorded, as configured

    # The Pipes-reported progress and summary are in the launched run's event log.
    messages = [e.user_message for e in instance.all_logs(launched.run_id)]
    assert any("SFT step 4/4" in m for m in messages), messages[-20:]
    assert any("SFT finished: 4 steps" in m and "world size 2" in m for m in messages)

    # A batch that does not split over the processes is refused before anything is launched.
    with pytest.raises(ValueError, match="batch_size 3 does not split evenly over 2 processes"):
        dg.materialize(
            with_upstreams(sft_training.sft_checkpoint),
            resources=resources,
            instance=instance,
            run_config={
                "ops": {
                    "sft_checkpoint": {
                        "config": {**TINY["sft_checkpoint"], "batch_size": 3, "launcher": "torchrun:2"}
                    }
                }
            },
        )
    assert sorted(p.name for p in versions.iterdir() if not p.name.startswith(".")) == sorted(
        [one["version"], two["version"], "current"]
    )


def test_launcher_is_performance_only():
    # Where SFT runs is not what it makes: the launcher stays out of the config part of the data version
    # (the weights' hash is in it).
    from carl_assets.defs.common import config_values

    assert "launcher" not in config_values(SFTCheckpointConfig(launcher="torchrun:2"))
