"""Timing and peak-memory measurement shared by the benchmarks (one protocol on both sides of a ratio)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


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
