"""The noise schedule: learning rate and dreaming temperature fall together over cycles.

Early cycles dream hot (diverse scenarios) and train with large steps; late cycles dream cool and
refine with small steps, like a diffusion model's noise schedule. Cycle 0 gets the start values, cycle
`cycles - 1` the end values exactly, cycles in between move monotonically, and later cycles hold the
end values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SHAPES = ("linear", "cosine", "geometric")


@dataclass(frozen=True)
class ScheduleStep:
    cycle: int
    learning_rate: float
    temperature: float
    progress: float  # 0 at the first cycle, 1 at the last and beyond


@dataclass(frozen=True)
class NoiseSchedule:
    """`shape`: "linear" (straight line), "cosine" (half cosine: slow, fast, slow) or "geometric"
    (straight in log space: the same ratio every cycle)."""

    cycles: int = 3
    lr_start: float = 1e-4
    lr_end: float = 1e-5
    temperature_start: float = 1.3
    temperature_end: float = 0.7
    shape: str = "cosine"

    def __post_init__(self) -> None:
        if self.cycles < 1:
            raise ValueError(f"cycles must be >= 1, got {self.cycles}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown schedule shape {self.shape!r} (known: {', '.join(SHAPES)})")
        for name in ("lr_start", "lr_end", "temperature_start", "temperature_end"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}")

    def progress(self, cycle: int) -> float:
        if cycle < 0:
            raise ValueError(f"cycle must be >= 0, got {cycle}")
        if self.cycles == 1:
            return 0.0
        return min(cycle, self.cycles - 1) / (self.cycles - 1)

    def _interpolate(self, start: float, end: float, progress: float) -> float:
        # The endpoints are returned as configured, not recomputed (float round-off would move them).
        if progress <= 0.0:
            return start
        if progress >= 1.0:
            return end
        if self.shape == "linear":
            value = start + (end - start) * progress
        elif self.shape == "cosine":
            value = end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            value = start * (end / start) ** progress
        low, high = min(start, end), max(start, end)
        return min(max(value, low), high)

    def at(self, cycle: int) -> ScheduleStep:
        p = self.progress(cycle)
        return ScheduleStep(cycle=cycle, learning_rate=self._interpolate(self.lr_start, self.lr_end, p),
                            temperature=self._interpolate(self.temperature_start, self.temperature_end, p),
                            progress=p)

    def steps(self) -> list[ScheduleStep]:
        return [self.at(c) for c in range(self.cycles)]
