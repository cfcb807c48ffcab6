"""Interruption: a killed training resumes from its last trainer checkpoint, a killed dream cycle reuses the
batches it generated, and no half-written artifact or version is ever visible.

(a) the library: `train_sft` interrupted after k steps and resumed equals an uninterrupted run (weights,
    losses, the gate's trigger step and window), and the log continues rather than restarting at step 1;
    the same for `train_grpo`; half-written checkpoints are passed over.
(b) a real SIGKILL of a process materializing `sft_checkpoint`: no version appears, and the next
    materialization resumes from the checkpoint on disk.
(c) `dream_scenarios` stopped after some generation batches: the rerun generates only the rest, and its
    table equals an uninterrupted run's.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from carl_assets import storage
from carl_assets.artifacts import ArtifactVersions
from carl_assets.carl import PhaseTransitionGate
from carl_assets.carl.sft_data import chat_prompt
from carl_assets.carl.training import (
    GRPO_COMPLETIONS_FILE,
    GRPORunConfig,
    SFTRunConfig,
    latest_checkpoint,
    train_grpo,
    train_sft,
)
from carl_assets.defs import dreams, memory, models, sft, sft_training, steering
from carl_assets.defs.checkpoints import resume_dir
from carl_assets.defs.common import config_values
from carl_assets.defs.resources import build_resources
from carl_assets.defs.training_config import SFTCheckpointConfig
from carl_assets.dreams import generation
from carl_assets.dreams.generation import BatchCache, generate_responses
from tests.tiny_run import TINY_BASE_MODEL
from tests.upstreams import with_upstreams

REPO = Path(__file__).resolve().parents[1]


class Interrupt(Exception):
    """Stands for a crash: raised from a callback at a chosen step."""


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt(f"interrupted at step {self.step}")


def answer_dataset(n: int = 8) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [
                chat_prompt(f"Memory number {i} about the garden.", "Is this a memory?") for i in range(n)
            ],
            "completion": [[{"role": "assistant", "content": "Yes."}] for _ in range(n)],
        }
    )


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def max_weight(model: torch.nn.Module) -> float:
    return max(float(t.abs().max()) for t in model.state_dict().values())


@pytest.fixture()
def tiny(tiny_model_and_tokenizer):
    return tiny_model_and_tokenizer


# --------------------------------------------------------------------------------------------
# (a) the library
# --------------------------------------------------------------------------------------------


SFT = SFTRunConfig(max_steps=150, learning_rate=1e-2, batch_size=4, seed=0)


@pytest.fixture(scope="module")
def uninterrupted_sft(tiny_model_and_tokenizer):
    base, tokenizer = tiny_model_and_tokenizer
    model = copy.deepcopy(base)
    outcome = train_sft(model, tokenizer, answer_dataset(), None, SFT)
    assert outcome.crystallized and outcome.trigger_step >= 8  # late enough to interrupt inside the window
    return model, outcome


@pytest.mark.slow
def test_sft_resumes_where_it_was_interrupted(tiny, uninterrupted_sft, tmp_path):
    base, tokenizer = tiny
    reference, ref = uninterrupted_sft
    trigger = ref.trigger_step
    # A checkpoint every 3 steps, interrupted 1 step before the gate fires: the resumed run starts from the
    # last checkpoint with part of the gate's window already behind it.
    stop = trigger - 1
    saved = (stop // 3) * 3
    assert 0 < saved < stop
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        train_sft(
            copy.deepcopy(base),
            tokenizer,
            answer_dataset(),
            None,
            SFT,
            extra_callbacks=[StopAt(stop)],
            checkpoint_dir=ckpt,
            save_steps=3,
        )
    found = latest_checkpoint(ckpt)
    assert found is not None and found.step == saved
    assert len([p for p in ckpt.iterdir() if p.name.startswith("checkpoint-")]) <= 2  # save_total_limit

    model = copy.deepcopy(base)
    out = train_sft(
        model, tokenizer, answer_dataset(), tmp_path / "out", SFT, checkpoint_dir=ckpt, save_steps=3
    )
    assert out.resumed_from_step == saved
    # the gate fires at the same step, on the same window
    assert out.triggered and out.trigger_step == trigger and out.steps == ref.steps
    assert out.window_values == ref.window_values
    assert out.peak_entropy_step == ref.peak_entropy_step
    # the log continues: each step once, 1..N, and the steps after the checkpoint were trained again
    # from the same state (same data order, optimizer and RNG): losses equal the uninterrupted run's
    steps = [r["step"] for r in out.log_history]
    assert steps == list(range(1, ref.steps + 1))
    ref_loss = [r["loss"] for r in ref.log_history]
    assert [r["loss"] for r in out.log_history] == pytest.approx(ref_loss, rel=1e-5)
    assert max_abs_diff(model, reference) <= 1e-6 * max_weight(reference)
    assert max_abs_diff(model, base) > 1e-3  # it did train (a copy of the base would also "resume")
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    assert log["resumed_from_step"] == saved


def test_sft_resume_after_the_last_step_trains_no_more(tiny, uninterrupted_sft, tmp_path):
    """Killed after the final checkpoint was saved (here: at the gate's step) but before the model was
    written: the rerun takes that checkpoint as it is instead of training one step more."""
    base, tokenizer = tiny
    reference, ref = uninterrupted_sft

    class StopAtEnd(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            raise Interrupt("killed after the last save")

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        train_sft(
            copy.deepcopy(base),
            tokenizer,
            answer_dataset(),
            None,
            SFT,
            extra_callbacks=[StopAtEnd()],
            checkpoint_dir=ckpt,
            save_steps=ref.trigger_step,
        )
    assert latest_checkpoint(ckpt).step == ref.trigger_step
    model = copy.deepcopy(base)
    out = train_sft(model, tokenizer, answer_dataset(), None, SFT, checkpoint_dir=ckpt)
    assert out.resumed_from_step == ref.trigger_step == out.trigger_step == out.steps
    assert out.triggered and out.window_values == ref.window_values
    assert max_abs_diff(model, reference) <= 1e-6 * max_weight(reference)


def test_half_written_checkpoints_are_passed_over(tiny, tmp_path):
    base, tokenizer = tiny
    ckpt = tmp_path / "ckpt"
    config = SFTRunConfig(max_steps=4, learning_rate=1e-2, batch_size=4, gate_threshold=1.01)
    train_sft(
        copy.deepcopy(base), tokenizer, answer_dataset(), None, config, checkpoint_dir=ckpt, save_steps=2
    )
    assert latest_checkpoint(ckpt).step == 4
    # a kill while checkpoint-6 was written: its state file is cut short; checkpoint-8 has no state at all
    partial = ckpt / "checkpoint-6"
    partial.mkdir()
    (partial / "trainer_state.json").write_text('{"global_step": 6, "log_hi')
    (ckpt / "checkpoint-8").mkdir()
    found = latest_checkpoint(ckpt)
    assert found.step == 4 and found.path.name == "checkpoint-4"
    assert [r["step"] for r in found.log_history if "loss" in r] == [1, 2, 3, 4]
    # a checkpoint without its optimizer state cannot resume exactly: passed over too
    (ckpt / "checkpoint-4" / "optimizer.pt").unlink()
    assert latest_checkpoint(ckpt).step == 2
    assert latest_checkpoint(tmp_path / "missing") is None and latest_checkpoint(None) is None

    longer = SFTRunConfig(max_steps=6, learning_rate=1e-2, batch_size=4, gate_threshold=1.01)
    out = train_sft(
        copy.deepcopy(base), tokenizer, answer_dataset(), None, longer, checkpoint_dir=ckpt, save_steps=2
    )
    assert out.resumed_from_step == 2 and out.steps == 6
    assert [r["step"] for r in out.log_history] == [1, 2, 3, 4, 5, 6]
    assert not (ckpt / "checkpoint-8").exists()  # the partial ones after the resume point are removed


def test_gate_rebuilds_its_window_on_resume():
    """The gate resumes from the Trainer's restored log (on_train_begin with global_step > 0); a fresh run
    (step 0) keeps it as it is."""
    logs = [
        {"step": 1, "mean_token_accuracy": 0.5, "entropy": 1.0},
        {"step": 2, "mean_token_accuracy": 0.995, "entropy": 3.0},
        {"step": 3, "loss": 0.2, "entropy": 4.0},  # no accuracy: only the entropy peak
        {"step": 4, "mean_token_accuracy": 0.999, "entropy": 0.5},
    ]
    gate = PhaseTransitionGate(threshold=0.99, window=5, min_above=3)
    control = types.SimpleNamespace(should_training_stop=False)
    gate.on_train_begin(None, types.SimpleNamespace(global_step=4, log_history=logs), control)
    assert [h["step"] for h in gate.history] == [1, 2, 4]
    assert gate._recent == [0.5, 0.995, 0.999] and not gate.triggered and not control.should_training_stop
    assert gate.peak_entropy == 4.0 and gate.peak_entropy_step == 3
    # the next logged step completes 3 of 5 at >= 0.99: fires at step 5, as the uninterrupted run would
    gate.on_log(None, types.SimpleNamespace(global_step=5), control, logs={"mean_token_accuracy": 0.992})
    assert gate.triggered and gate.trigger_step == 5 and control.should_training_stop
    # a resume whose log already holds the trigger stops at once
    again = PhaseTransitionGate(threshold=0.99, window=5, min_above=3)
    control = types.SimpleNamespace(should_training_stop=False)
    done = [*logs, {"step": 5, "mean_token_accuracy": 0.992}, {"train_runtime": 1.0}]
    again.on_train_begin(None, types.SimpleNamespace(global_step=5, log_history=done), control)
    assert again.trigger_step == 5 and control.should_training_stop
    # fresh run: nothing replayed
    fresh = PhaseTransitionGate()
    fresh.on_train_begin(None, types.SimpleNamespace(global_step=0, log_history=done), control)
    assert fresh.history == [] and not fresh.triggered


@pytest.mark.slow
def test_grpo_resumes_with_its_completions(tiny, tmp_path):
    base, tokenizer = tiny
    prompts = Dataset.from_dict(
        {"prompt": [chat_prompt(f"Memory {i} about rain.", "How did it feel?") for i in range(8)]}
    )
    config = GRPORunConfig(max_steps=4, batch_size=4, num_generations=2, max_completion_length=6)
    reference = copy.deepcopy(base)
    ref = train_grpo(reference, tokenizer, prompts, None, config)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        train_grpo(
            copy.deepcopy(base),
            tokenizer,
            prompts,
            None,
            config,
            extra_callbacks=[StopAt(3)],
            checkpoint_dir=ckpt,
            save_steps=2,
        )
    assert (latest_checkpoint(ckpt).path / GRPO_COMPLETIONS_FILE).is_file()
    model = copy.deepcopy(base)
    out = train_grpo(model, tokenizer, prompts, None, config, checkpoint_dir=ckpt, save_steps=2)
    assert out.resumed_from_step == 2 and out.steps == 4
    assert [r["step"] for r in out.log_history] == [1, 2, 3, 4]
    assert out.rewards == pytest.approx(ref.rewards, rel=1e-5)
    # every completion of the run, the ones before the checkpoint read back from it
    assert [(c["step"], c["completion"]) for c in out.completions] == [
        (c["step"], c["completion"]) for c in ref.completions
    ]
    assert max_abs_diff(model, reference) <= 1e-6 * max_weight(reference)


# --------------------------------------------------------------------------------------------
# (b) a real SIGKILL of a materialization
# --------------------------------------------------------------------------------------------

TINY_BASE = TINY_BASE_MODEL
# never crystallizes (threshold above 1): runs all its steps, a checkpoint every 4
KILLED_SFT = {
    "max_steps": 48,
    "learning_rate": 1e-2,
    "batch_size": 4,
    "gate_threshold": 1.01,
    "checkpoint_every": 4,
    "max_length": 128,
}

MATERIALIZE_SFT = """
import json, sys
import dagster as dg
from carl_assets.defs.resources import build_resources
from carl_assets.defs.sft_training import sft_checkpoint
from tests.upstreams import with_upstreams
home, config = sys.argv[1], json.loads(sys.argv[2])
dg.materialize(with_upstreams(sft_checkpoint), resources=build_resources(home),
               run_config={"ops": {"sft_checkpoint": {"config": config}}})
"""


def _user_messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [e.user_message for e in instance.all_logs(run_id) if e.user_message]


@pytest.mark.slow
def test_sigkilled_sft_materialization_resumes(tmp_path):
    home = tmp_path / "home"
    resources = build_resources(home)
    prepared = dg.materialize(
        with_upstreams(memory.memory_graph, models.base_model, sft.sft_dataset),
        resources=resources,
        run_config={
            "ops": {
                "base_model": {"config": TINY_BASE},
                "sft_dataset": {"config": {"source": "templates", "max_examples": 8, "holdout_tasks": 2}},
            }
        },
    )
    assert prepared.success
    art = home / storage.ARTIFACTS_DIR / "sft_checkpoint"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "CARL_TEST_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", MATERIALIZE_SFT, str(home), json.dumps(KILLED_SFT)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        found = None
        while found is None and proc.poll() is None and time.monotonic() < deadline:
            resume_dirs = list(art.glob(".resume-*")) if art.is_dir() else []
            found = next((c for d in resume_dirs if (c := latest_checkpoint(d)) is not None), None)
            time.sleep(0.02)
        assert proc.poll() is None, (
            f"the run ended before a checkpoint was seen: {proc.stderr.read()[-2000:]!r}"
        )
        assert found is not None, "no trainer checkpoint appeared within 240 s"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    # nothing half-written is visible: no version, no `current`, no row in artifact_versions
    versions = ArtifactVersions(art, "sft_checkpoint")
    assert versions.names() == [] and versions.current_name() is None
    assert not (art / "current").exists()
    assert all(p.name.startswith(".") for p in art.iterdir())  # only the hidden temp and resume folders
    table = storage.read_table(home / storage.DATABASE_NAME, "artifact_versions")
    assert "sft_checkpoint" not in set(table["asset"])
    [resume_dir] = list(art.glob(".resume-*"))
    at_kill = latest_checkpoint(resume_dir)
    assert at_kill is not None and 4 <= at_kill.step < KILLED_SFT["max_steps"]

    # materialized again: resumes from the checkpoint, and the version is complete and loadable
    instance = dg.DagsterInstance.ephemeral()
    again = dg.materialize(
        with_upstreams(sft_training.sft_checkpoint),
        resources=resources,
        instance=instance,
        run_config={"ops": {"sft_checkpoint": {"config": KILLED_SFT}}},
    )
    assert again.success
    event = again.get_asset_materialization_events()[-1].materialization
    meta = {k: getattr(v, "value", v) for k, v in event.metadata.items()}
    assert meta["resumed_from_step"] == at_kill.step > 0
    assert meta["steps"] == KILLED_SFT["max_steps"]
    assert any(f"resuming from step {at_kill.step}" in m for m in _user_messages(instance, again.run_id))
    assert versions.names() == [versions.current_name()]
    folder = versions.path()
    log = json.loads((folder / "training_log.json").read_text())
    assert log["resumed_from_step"] == at_kill.step
    assert [r["step"] for r in log["log_history"]] == list(range(1, KILLED_SFT["max_steps"] + 1))
    from carl_assets.models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(folder)
    assert all(t.isfinite().all() for t in model.state_dict().values()) and tokenizer("hello")["input_ids"]
    assert not resume_dir.exists()  # removed once the version was written


def test_resume_key_follows_the_run_definition(tmp_path):
    """Same inputs and data-defining config: the same checkpoint folder; a changed value that defines the
    data or training: another one (a stale checkpoint is never resumed); performance-only fields: same."""
    store = build_resources(tmp_path)["artifacts"]
    parents = {"base_model": "v1", "sft_dataset": "d1"}

    def folder(config, parents=parents, lr=1e-2):
        return resume_dir(store, "sft_checkpoint", parents, config_values(config), lr)

    base = SFTCheckpointConfig(max_steps=6)
    assert folder(base) == folder(SFTCheckpointConfig(max_steps=6, checkpoint_every=2, log_every=1))
    assert folder(base).parent == tmp_path / storage.ARTIFACTS_DIR / "sft_checkpoint"
    assert folder(base).name.startswith(".resume-")
    assert folder(base) != folder(SFTCheckpointConfig(max_steps=7))
    assert folder(base) != folder(SFTCheckpointConfig(max_steps=6, seed=1))
    assert folder(base) != folder(base, parents={**parents, "sft_dataset": "d2"})
    assert folder(base) != folder(base, lr=2e-2)


# --------------------------------------------------------------------------------------------
# (c) dream_scenarios
# --------------------------------------------------------------------------------------------


def test_batch_cache_reuses_only_matching_batches(tiny, tmp_path):
    model, tokenizer = tiny
    prompts = [[{"role": "user", "content": f"Tell me about memory {i}."}] for i in range(5)]
    kwargs = {"k": 2, "temperature": 1.0, "max_new_tokens": 5, "batch_size": 2, "seed": 7}
    plain = generate_responses(model, tokenizer, prompts, **kwargs)
    cache = BatchCache(tmp_path / "cache")
    first = generate_responses(model, tokenizer, prompts, **kwargs, cache=cache)
    assert first == plain and (cache.generated, cache.reused) == (3, 0)
    again = BatchCache(tmp_path / "cache")
    assert generate_responses(model, tokenizer, prompts, **kwargs, cache=again) == plain
    assert (again.generated, again.reused) == (0, 3)
    # another seed or other prompts do not match the stored batches: generated afresh and overwritten
    other = BatchCache(tmp_path / "cache")
    generate_responses(model, tokenizer, prompts, **{**kwargs, "seed": 8}, cache=other)
    assert (other.generated, other.reused) == (3, 0)
    # a cut-short batch file (not possible through save(), which renames a whole file) is regenerated
    (tmp_path / "cache" / "batch-00001.json").write_text('{"key": ')
    last = BatchCache(tmp_path / "cache")
    generate_responses(model, tokenizer, prompts, **{**kwargs, "seed": 8}, cache=last)
    assert (last.generated, last.reused) == (1, 2)


DREAMS = {
    "n_scenarios": 6,
    "responses_per_scenario": 2,
    "max_new_tokens": 6,
    "heldout_scenarios": 2,
    "excerpt_chars": 40,
    "batch_size": 2,
    "cycle": 0,
}


@pytest.mark.slow
def test_interrupted_dream_cycle_reuses_its_batches(tmp_path, monkeypatch):
    resources = build_resources(tmp_path)
    upstream = dg.materialize(
        with_upstreams(
            memory.memory_graph, memory.emotion_training_pairs, models.base_model, steering.steering_vectors
        ),
        resources=resources,
        run_config={
            "ops": {"base_model": {"config": TINY_BASE}, "steering_vectors": {"config": {"max_length": 64}}}
        },
    )
    assert upstream.success
    run_config = {"ops": {"dream_scenarios": {"config": DREAMS}}}
    real = generation._run_generate
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(len(args[2]))  # prompt rows of this generate call
        if fail_after is not None and len(calls) > fail_after:
            raise Interrupt("killed after 2 batches")
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "_run_generate", counted)
    fail_after = 2  # the 3rd of 3 dream batches fails (the held-out diagnostic never starts)
    broken = dg.materialize(
        with_upstreams(dreams.dream_scenarios),
        resources=resources,
        run_config=run_config,
        raise_on_error=False,
    )
    assert not broken.success and len(calls) == 3
    db = tmp_path / storage.DATABASE_NAME
    with storage.connect(db, read_only=True) as con:
        assert "dream_scenarios" not in set(con.execute("SHOW TABLES").fetchdf()["name"])
    [partial] = list((tmp_path / storage.ARTIFACTS_DIR / "dream_scenarios").glob(".partial-*"))
    assert sorted(p.name for p in partial.glob("batch-*.json")) == ["batch-00000.json", "batch-00001.json"]

    calls.clear()
    fail_after = None
    resumed = dg.materialize(
        with_upstreams(dreams.dream_scenarios), resources=resources, run_config=run_config
    )
    assert resumed.success
    meta = resumed.get_asset_materialization_events()[-1].materialization.metadata
    assert meta["reused_batches"].value == 2
    dream_calls = len(calls) - 1  # the held-out diagnostic's 2 prompts are one more generate call
    assert dream_calls == 1 and not partial.exists()
    resumed_frame = storage.read_table(db, "dream_scenarios")

    calls.clear()
    uninterrupted = dg.materialize(
        with_upstreams(dreams.dream_scenarios), resources=resources, run_config=run_config
    )
    assert uninterrupted.success and len(calls) == 3 + 1
    assert (
        uninterrupted.get_asset_materialization_events()[-1].materialization.metadata["reused_batches"].value
        == 0
    )
    fresh_frame = storage.read_table(db, "dream_scenarios")
    assert len(fresh_frame) == 6 * 2
    pd.testing.assert_frame_equal(resumed_frame, fresh_frame)
