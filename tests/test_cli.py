"""The `carl` console script, in-process (main(argv)) and as a subprocess (the installed entry point)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from carl_assets import cli
from carl_assets.carl import carl_reward, compute_phi

CONSTANTS_OUTPUT = """kappa = 21.333333333333332
sigma = 0.1875
kappa*sigma = 4.0
defect_threshold = 0.03
 T*(  384) =    8192 triadic
 T*(  512) =   10922 \n T*(  768) =   16384 triadic
 T*( 1024) =   21845 \n T*( 3072) =   65536 triadic
 T*( 4096) =   87381 \n"""


def carl_command() -> list[str]:
    script = Path(sys.executable).with_name("carl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "carl_assets.cli"]


def run_carl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*carl_command(), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture()
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((20, 50)) * np.exp(rng.uniform(-2, 2, size=(20, 1)))
    ids = rng.integers(0, 50, size=20)
    paths = {}
    for name, value in {
        "logits": logits,
        "ids": ids,
        "logits_1d": logits[0],
        "logits_nan": np.where(np.arange(50) == 3, np.nan, logits),
        "logits_int": np.zeros((4, 5), dtype=np.int64),
        "ids_out": np.array([0, 1, 50] + [0] * 17),
        "ids_short": ids[:5],
        "ids_2d": ids.reshape(4, 5),
    }.items():
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], value)
    paths["not_npy"] = str(tmp_path / "notes.npy")
    Path(paths["not_npy"]).write_text("hello")
    paths["npz"] = str(tmp_path / "two.npz")
    np.savez(paths["npz"], a=logits, b=ids)
    return paths, logits, ids


# --------------------------------------------------------------------------------------------
# Subprocess: the installed console script
# --------------------------------------------------------------------------------------------


def test_console_script_seed_commands(arrays):
    paths, logits, ids = arrays
    result = run_carl("constants")
    assert result.returncode == 0 and result.stdout == CONSTANTS_OUTPUT and result.stderr == ""

    result = run_carl("reward", "--logits-file", paths["logits"], "--token-ids-file", paths["ids"])
    score, comps = carl_reward(logits, ids)
    expected = [f"CARL reward: {score:.4f}"] + [f" {k}: {v:.4f}" for k, v in comps.items()]
    assert result.returncode == 0 and result.stdout.splitlines() == expected

    result = run_carl("phi", "--logits-file", paths["logits"])
    phi, _, entropy = compute_phi(logits)
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        f"Phi: mean={np.mean(phi):.4f} std={np.std(phi):.4f}",
        f"Entropy: mean={np.mean(entropy):.4f}",
        "T*: 1066 (for V=50)",
    ]

    result = run_carl("gate-check", "--phi", "0.85")
    assert result.returncode == 0 and result.stdout == "Phi=0.8500 → ACT (high)\n"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["phi", "--logits-file", "{missing}"], "not found"),
        (["phi", "--logits-file", "{logits_1d}"], "2-D"),
        (["phi", "--logits-file", "{logits_nan}"], "NaN"),
        (["reward", "--logits-file", "{logits}", "--token-ids-file", "{ids_out}"], "[0, 50)"),
        (["reward", "--logits-file", "{logits}", "--token-ids-file", "{ids_short}"], "5 entries"),
        (["phi", "--logits-file", "{logits}", "--bogus", "1"], "unrecognized arguments: --bogus"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_console_script_bad_input_is_one_line(arrays, args, fragment):
    paths, _, _ = arrays
    paths = {**paths, "missing": "/nonexistent/logits.npy"}
    result = run_carl(*[a.format(**paths) for a in args])
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("carl: error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_console_script_pipeline_help_is_forwarded():
    result = run_carl("lineage", "--help")
    assert result.returncode == 0 and "usage: carl lineage" in result.stdout


# --------------------------------------------------------------------------------------------
# In-process: main(argv)
# --------------------------------------------------------------------------------------------


def test_main_in_process_matches_seed_figures(arrays, capsys):
    paths, logits, ids = arrays
    assert cli.main(["constants"]) == 0
    assert capsys.readouterr().out == CONSTANTS_OUTPUT
    assert cli.main(["gate-check", "--phi", "0.1"]) == 0
    assert capsys.readouterr().out == "Phi=0.1000 → ABSTAIN (abstain)\n"
    assert cli.main(["gate-check", "--phi", "0.1875"]) == 0
    assert capsys.readouterr().out == "Phi=0.1875 → ACT (low)\n"
    assert cli.main(["gate-check", "--phi", "0.3", "--threshold", "0.4"]) == 0
    assert capsys.readouterr().out == "Phi=0.3000 → ABSTAIN (abstain)\n"
    assert cli.main(["reward", "--logits-file", paths["logits"], "--token-ids-file", paths["ids"]]) == 0
    assert capsys.readouterr().out.startswith(f"CARL reward: {carl_reward(logits, ids)[0]:.4f}\n")
    assert cli.main([]) == 0 and "COMMAND" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["phi"], "required: --logits-file"),
        (["phi", "--logits-file", "{logits_int}"], "floating point"),
        (["phi", "--logits-file", "{not_npy}"], "cannot read logits file"),
        (["phi", "--logits-file", "{npz}"], ".npz"),
        (["reward", "--logits-file", "{logits}", "--token-ids-file", "{ids_2d}"], "1-D"),
        (["reward", "--logits-file", "{logits}", "--token-ids-file", "{logits}"], "1-D"),
        (["gate-check", "--phi", "high"], "not a number: 'high'"),
        (["train", "--model", "m", "--dataset", "x.jsonl", "--max-steps", "0"], "positive integer"),
        (["train", "--method", "ppo", "--model", "m", "--dataset", "x.jsonl"], "invalid choice: 'ppo'"),
        (["train", "--dataset", "x.jsonl"], "required: --model"),
        (["agent", "--task", "click"], "required: --model"),
    ],
)
def test_main_in_process_bad_input(arrays, capsys, args, fragment):
    paths, _, _ = arrays
    assert cli.main([a.format(**paths) for a in args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1 and fragment in lines[0], captured.err


def test_runtime_failure_is_one_line_unless_debugging(monkeypatch, capsys):
    fake = types.ModuleType("carl_assets.models.loading")

    def broken_loader(path, trust_remote_code=False, allow_pickle=False, **placement):
        raise OSError(f"no model at {path}\nsecond line")

    fake.load_model_and_tokenizer = broken_loader
    monkeypatch.setitem(sys.modules, "carl_assets.models.loading", fake)
    monkeypatch.setitem(sys.modules, "carl_assets.carl.agent", types.SimpleNamespace(agent_step=None))
    assert cli.main(["agent", "--model", "/nowhere", "--task", "t"]) == 1
    err = capsys.readouterr().err
    assert err == "carl: error: OSError: no model at /nowhere second line\n"
    monkeypatch.setenv("CARL_DEBUG", "1")
    with pytest.raises(OSError):
        cli.main(["agent", "--model", "/nowhere", "--task", "t"])


def test_pipeline_commands_parse_their_flags_and_call_the_dagster_layer(monkeypatch, tmp_path, capsys):
    from carl_assets.defs import pipeline_cli

    seen = []
    monkeypatch.setattr(pipeline_cli, "ensure_dagster_home", lambda: seen.append("dagster_home"))
    monkeypatch.setattr(
        pipeline_cli,
        "materialize",
        lambda select, config, job=None, user_config=None: seen.append(("materialize", select, config, job))
        or 3,
    )
    monkeypatch.setattr(pipeline_cli, "lineage", lambda asset: seen.append(("lineage", asset)) or 4)
    monkeypatch.setattr(
        pipeline_cli,
        "lineage_nodes",
        lambda asset, version, limit: seen.append(("nodes", asset, version, limit)) or 5,
    )
    monkeypatch.setenv("CARL_HOME", str(tmp_path / "before"))
    assert cli.main(["materialize", "--select", "base_model+", "--home", str(tmp_path / "h")]) == 3
    assert cli.main(["materialize", "--job", "retraining", "--preset", "real"]) == 3
    assert cli.main(["lineage", "sft_checkpoint"]) == 4
    assert cli.main(["lineage", "--nodes", "grpo_checkpoint", "--version", "v1", "--limit", "3"]) == 5
    preset_config = seen[3][2]
    assert seen == [
        "dagster_home",
        ("materialize", "base_model+", {}, None),
        "dagster_home",
        ("materialize", "*", preset_config, "retraining"),
        "dagster_home",
        ("lineage", "sft_checkpoint"),
        "dagster_home",
        ("nodes", "grpo_checkpoint", "v1", 3),
    ]
    assert preset_config["ops"]["base_model"]["config"]["model"] == "smollm2-135m-instruct"  # the real preset
    assert os.environ["CARL_HOME"] == str((tmp_path / "h").resolve())
    assert cli.main(["materialize", "--preset", "fast"]) == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    assert cli.main(["lineage", "--limit", "many"]) == 2


# --------------------------------------------------------------------------------------------
# train / agent wiring (the training and agent libraries are tested in their own files)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FakeSFTConfig:
    max_steps: int = 300
    gate_threshold: float = 0.99
    learning_rate: float = 1e-3


@dataclasses.dataclass
class FakeGRPOConfig:
    max_steps: int = 300
    num_generations: int = 4


def fake_training(calls):
    module = types.ModuleType("carl_assets.carl.training")
    module.SFTRunConfig = FakeSFTConfig
    module.GRPORunConfig = FakeGRPOConfig
    module.load_training_dataset = lambda spec: calls.append(("dataset", spec)) or ["rows"]

    def train_sft(model, tokenizer, dataset, output_dir, config):
        calls.append(("sft", model, tokenizer, dataset, output_dir, config))
        return types.SimpleNamespace(
            triggered=True,
            trigger_step=12,
            window_values=[0.99, 1.0, 0.995],
            peak_entropy=2.5,
            peak_entropy_step=3,
        )

    def train_grpo(model, tokenizer, dataset, output_dir, config):
        calls.append(("grpo", model, tokenizer, dataset, output_dir, config))
        return types.SimpleNamespace(rewards=[0.51, 0.5, 0.55])

    module.train_sft, module.train_grpo = train_sft, train_grpo
    loader = types.ModuleType("carl_assets.models.loading")
    loader.load_model_and_tokenizer = lambda path, trust_remote_code=False, allow_pickle=False, **placement: (
        f"model:{path}",
        "tok",
    )
    return module, loader


def test_train_command_wires_the_training_library(monkeypatch, capsys):
    calls = []
    training, loader = fake_training(calls)
    monkeypatch.setitem(sys.modules, "carl_assets.carl.training", training)
    monkeypatch.setitem(sys.modules, "carl_assets.models.loading", loader)
    assert (
        cli.main(
            [
                "train",
                "--method",
                "sft",
                "--model",
                "m",
                "--dataset",
                "d.jsonl",
                "--output",
                "out",
                "--max-steps",
                "7",
                "--gate-accuracy",
                "0.95",
            ]
        )
        == 0
    )
    assert calls[0] == ("dataset", "d.jsonl")
    assert calls[1] == (
        "sft",
        "model:m",
        "tok",
        ["rows"],
        "out",
        FakeSFTConfig(max_steps=7, gate_threshold=0.95, learning_rate=2e-5),
    )  # a real model's lr
    out = capsys.readouterr().out
    assert (
        "Crystallized at step 12 (window [0.99, 1.0, 0.995])" in out
        and "Peak entropy: 2.5000 at step 3" in out
    )
    calls.clear()
    assert (
        cli.main(["train", "--method", "grpo", "--model", "m", "--dataset", "name/ds", "--max-steps", "2"])
        == 0
    )
    assert calls[1] == (
        "grpo",
        "model:m",
        "tok",
        ["rows"],
        "carl-output",
        FakeGRPOConfig(max_steps=2, num_generations=8),
    )
    assert "CARL reward: first step 0.5100, last step 0.5500 (3 steps)" in capsys.readouterr().out


def test_agent_command_prints_response_or_abstention(monkeypatch, capsys):
    _, loader = fake_training([])
    monkeypatch.setitem(sys.modules, "carl_assets.models.loading", loader)
    seen = []

    def agent_step(model, tokenizer, observation, instruction, gate_threshold, max_new_tokens):
        seen.append((model, observation, instruction, gate_threshold, max_new_tokens))
        act = gate_threshold < 0.5
        return types.SimpleNamespace(
            response="Clicked." if act else None,
            phi_mean=0.42,
            confidence="low" if act else "abstain",
            components={"multiscale": 0.9},
        )

    monkeypatch.setitem(sys.modules, "carl_assets.carl.agent", types.SimpleNamespace(agent_step=agent_step))
    assert cli.main(["agent", "--model", "ck", "--task", "Click submit", "--observation", "a form"]) == 0
    assert capsys.readouterr().out == "Response: Clicked.\nPhi mean: 0.4200 (low)\n multiscale: 0.9000\n"
    assert seen[0] == ("model:ck", "a form", "Click submit", 0.1875, 128)
    assert cli.main(["agent", "--model", "ck", "--task", "t", "--gate-threshold", "0.6"]) == 0
    assert capsys.readouterr().out.startswith("ABSTAIN (phi_mean=0.4200 < 0.6000)\n")


@pytest.fixture()
def saved_tiny_model(tmp_path, tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.slow
def test_agent_command_end_to_end_on_a_saved_tiny_model(saved_tiny_model):
    result = run_carl(
        "agent",
        "--model",
        str(saved_tiny_model),
        "--task",
        "Click the button",
        "--observation",
        "A form with a button.",
        "--max-new-tokens",
        "8",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(("Response: ", "ABSTAIN (phi_mean="))
    assert lines[1].startswith("Phi mean: ")


@pytest.mark.slow
def test_train_sft_end_to_end_from_a_jsonl_file(tmp_path, saved_tiny_model):
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Say {w}."}],
            "completion": [{"role": "assistant", "content": w}],
        }
        for w in ("yes", "no", "maybe", "warm") * 4
    ]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    result = run_carl(
        "train",
        "--method",
        "sft",
        "--model",
        str(saved_tiny_model),
        "--dataset",
        str(data),
        "--output",
        str(out),
        "--max-steps",
        "2",
        "--threads",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert "Did not crystallize within 2 steps" in result.stdout or "Crystallized at step" in result.stdout
    assert (out / "config.json").exists()


def test_train_rejects_zero_threads_in_one_line(tmp_path, saved_tiny_model, capsys):
    status = cli.main(["train", "--model", str(saved_tiny_model), "--dataset", "x.jsonl", "--threads", "0"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1 and "--threads" in err


def test_train_with_a_missing_dataset_file_is_one_line(tmp_path, saved_tiny_model, capsys):
    status = cli.main(
        [
            "train",
            "--method",
            "grpo",
            "--model",
            str(saved_tiny_model),
            "--dataset",
            str(tmp_path / "nope.jsonl"),
            "--max-steps",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert status == 1 and len(err.splitlines()) == 1 and "nope.jsonl" in err
