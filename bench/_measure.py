"""Timing, peak-memory measurement and agreement checks shared by the benchmarks: one protocol on both
sides of a ratio, and no ratio unless the fast path computed what its baseline computed (`run_bench`)."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def prepare_process() -> None:
    """Run before importing torch. Restarts the interpreter once with glibc's mmap threshold fixed (else
    it adapts upwards and freed tensors stay in the heap, so peak-RSS readings depend on history; set
    NOREEXEC to skip), keeps the benchmark offline and single-tokenizer-threaded, and puts the project
    root on sys.path."""
    if (
        os.environ.get(MMAP_ENV) is None
        and sys.platform.startswith("linux")
        and not os.environ.get("NOREEXEC")
    ):
        os.environ[MMAP_ENV] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(seconds, peak extra resident MB, result) of one call."""
    rss_before = status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the high-water mark VmHWM to the current RSS
    except OSError:
        pass
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return seconds, max(0, status_kb("VmHWM") - rss_before) / 1024.0, result


# ---------------------------------------------------------------------------------------------- agreement

REQUIRED_KEYS = ("name", "ratio", "agreement", "peak_mb", "memory_ratio")


class Disagreement(RuntimeError):
    """A fast path computed something other than its baseline on the same inputs: the bench prints no
    ratio and exits 1."""


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def max_abs_diff(fast: Any, baseline: Any) -> float:
    """max |fast - baseline| over arrays, tensors or nested lists of one shape; NaN in the same place on both
    sides counts as equal, NaN on one side only as an infinite difference. Raises Disagreement when the
    shapes differ."""
    a, b = _as_array(fast), _as_array(baseline)
    if a.shape != b.shape:
        raise Disagreement(f"shapes differ: fast {a.shape} vs baseline {b.shape}")
    if a.size == 0:
        return 0.0
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.abs(a - b))
    return float(np.nan_to_num(diff, nan=np.inf).max())


def agree(
    check: str, value: float, tolerance: float, metric: str = "max_abs_diff", **details: Any
) -> dict[str, Any]:
    """The record of one agreement check, `{metric: value, "tolerance": tolerance, **details}`.

    Raises Disagreement naming `check` when `value` exceeds `tolerance` or is NaN (a check is passed only
    by a number at or below its tolerance)."""
    value = float(value)
    if not value <= tolerance:
        raise Disagreement(
            f"{check}: {metric} {value:.3g} exceeds the tolerance {tolerance:g} ({details or ''})"
        )
    return {metric: value, "tolerance": tolerance, **details}


def agree_close(check: str, fast: Any, baseline: Any, tolerance: float, **details: Any) -> dict[str, Any]:
    """`agree` on max |fast - baseline| (see `max_abs_diff`)."""
    return agree(check, max_abs_diff(fast, baseline), tolerance, **details)


def memory_ratio(baseline_mb: float | None, ours_mb: float | None) -> float | None:
    """Baseline peak extra memory / ours (None when either was not measured); ours is floored at 0.1 MB."""
    if baseline_mb is None or ours_mb is None:
        return None
    return round(baseline_mb / max(ours_mb, 0.1), 2)


def run_bench(main: Callable[[], dict[str, Any]]) -> None:
    """Run a bench's `main`, which returns its JSON record after its agreement checks, and print that
    record as the bench's last line. A Disagreement ends the process with status 1 and no JSON line (no
    ratio); so does a record without the keys every bench reports (`REQUIRED_KEYS`)."""
    try:
        record = main()
    except Disagreement as exc:
        print(
            f"{Path(sys.argv[0]).stem}: the fast path disagrees with its baseline, no ratio: {exc}",
            file=sys.stderr,
        )
        sys.exit(1)
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing or not record["agreement"]:
        print(f"{Path(sys.argv[0]).stem}: record lacks {missing or ['agreement figures']}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(record))


def time_interleaved(ways: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, Any]]:
    """The protocol for every side of every ratio: one warm-up call per way, then `repeats` interleaved
    rounds (each way once per round, `measure`d). Per way: seconds (list), median, best, peak_mb (the
    largest peak extra MB over the rounds) and result (the last round's output)."""
    for fn in ways.values():
        fn()  # warm-up: lazy inits, first touch of the weights
    runs: dict[str, list[tuple[float, float, Any]]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            runs[name].append(measure(fn))
    return {
        name: {
            "seconds": [r[0] for r in rs],
            "median": statistics.median(r[0] for r in rs),
            "best": min(r[0] for r in rs),
            "peak_mb": max(r[1] for r in rs),
            "result": rs[-1][2],
        }
        for name, rs in runs.items()
    }
