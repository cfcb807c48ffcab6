"""The benchmarks' agreement protocol (bench/_measure.py): no ratio unless the fast path equals its
baseline."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_SPEC = importlib.util.spec_from_file_location(
    "bench_measure", Path(__file__).resolve().parents[1] / "bench" / "_measure.py"
)
measure = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(measure)


def test_max_abs_diff_over_lists_tensors_and_nans():
    assert measure.max_abs_diff([1.0, 2.0, 3.5], np.array([1.0, 2.25, 3.0])) == pytest.approx(0.5)
    assert measure.max_abs_diff(torch.tensor([[1.0, 2.0]]), [[1.0, 2.0]]) == 0.0
    assert measure.max_abs_diff([float("nan"), 1.0], [float("nan"), 1.0]) == 0.0  # NaN in the same place
    assert math.isinf(measure.max_abs_diff([float("nan"), 1.0], [0.0, 1.0]))  # NaN on one side only
    with pytest.raises(measure.Disagreement, match="shapes differ"):
        measure.max_abs_diff([1.0, 2.0], [1.0, 2.0, 3.0])


def test_agree_passes_at_or_below_the_tolerance_and_refuses_above_or_nan():
    record = measure.agree_close("rewards", [0.5, 0.25], [0.5, 0.25 + 1e-6], 1e-5, completions=2)
    assert (
        record["max_abs_diff"] == pytest.approx(1e-6)
        and record["tolerance"] == 1e-5
        and record["completions"] == 2
    )
    assert measure.agree("exact", 0, 0, metric="differing")["differing"] == 0.0
    with pytest.raises(measure.Disagreement, match="rewards: max_abs_diff 0.53"):
        measure.agree_close("rewards", [0.0], [0.53], 1e-5)
    with pytest.raises(measure.Disagreement):
        measure.agree("nan", float("nan"), 1.0)


def test_run_bench_prints_the_record_only_when_it_agrees(capsys):
    good = {
        "name": "x",
        "ratio": 2.5,
        "peak_mb": 1.0,
        "memory_ratio": 3.0,
        "agreement": {"out": measure.agree("out", 0.0, 1e-6)},
    }
    measure.run_bench(lambda: good)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == good

    def disagrees():
        measure.agree_close("out", [1.0], [2.0], 1e-6)
        return good

    with pytest.raises(SystemExit) as exited:
        measure.run_bench(disagrees)
    out = capsys.readouterr()
    assert exited.value.code == 1 and out.out == "" and "no ratio" in out.err and "ratio" not in out.out

    with pytest.raises(SystemExit) as exited:
        measure.run_bench(lambda: {k: v for k, v in good.items() if k != "agreement"})
    assert exited.value.code == 1 and capsys.readouterr().out == ""


def test_memory_ratio():
    assert measure.memory_ratio(100.0, 25.0) == 4.0
    assert measure.memory_ratio(None, 25.0) is None
    assert measure.memory_ratio(5.0, 0.0) == 50.0  # ours floored at 0.1 MB


@pytest.mark.slow
def test_carl_reward_bench_scores_real_completions_and_agrees(tmp_path):
    """The CARL bench at its smallest: every completion is a real (non-blank) text that gets scored, and
    the fast reward equals the reference way's before a ratio is printed."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "carl_reward.py"
    env = {**os.environ, "CARL_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            str(bench),
            "--sequences",
            "4",
            "--max-completion",
            "16",
            "--vocab",
            "4096",
            "--hidden",
            "64",
            "--repeats",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    rewards = record["agreement"]["rewards_vs_reference_way"]
    assert rewards["max_abs_diff"] <= rewards["tolerance"] == 1e-5
    assert record["agreement"]["scored"] == {"skipped_completions": 0.0, "tolerance": 0, "completions": 4}
    assert (
        rewards["reward_std"] > 0 and 0.0 < rewards["reward_mean"] < 1.0
    )  # real rewards, not the blank rule's 0
    assert record["ratio"] > 0 and record["peak_mb"] >= 0 and record["memory_ratio"] is not None
