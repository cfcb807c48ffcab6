"""Timing and peak-memory measurement shared by the benchmarks (one protocol on both sides of a ratio)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def prepare_process() -> None:
    """Run before importing torch. Restarts the interpreter once with glibc's mmap threshold fixed (else
    it adapts upwards and freed tensors stay in the heap, so peak-RSS readings depend on history; set
    NOREEXEC to skip), keeps the benchmark offline and single-tokenizer-threaded, and puts the project
    root on sys.path."""
    if os.environ.get(MMAP_ENV) is None and sys.platform.startswith("linux") and not os.environ.get("NOREEXEC"):
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
