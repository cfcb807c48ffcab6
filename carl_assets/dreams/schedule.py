"""The noise schedule: learning rate and dreaming temperature fall together over cycles.

Early cycles dream hot (diverse scenarios) and train with large steps; late cycles dream cool and
refine with small steps, like a diffusion model's noise schedule. Cycle 0 gets the start values, cycle
`cycles - 1` the end values exactly, cycles in between move monotonically, and later cycles hold the
end values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from pydantic import Field

from carl_assets.settings import Settings

Shape = Literal["linear", "cosine", "geometric"]
SHAPES: tuple[str, ...] = get_args(Shape)


class ScheduleSettings(Settings):
    """The schedule's length and shape, as `dream_scenarios` exposes them (its start and end values depend
    on the model: `carl_assets.models.defaults.dream_sampling_defaults`, resolved by the caller)."""

    schedule_cycles: int = Field(
        default=3, description="noise schedule: cycles from the start to the end values"
    )
    schedule_shape: Shape = Field(
        default="cosine", description="noise schedule: 'linear', 'cosine' or 'geometric'"
    )


@dataclass(frozen=True)
class ScheduleStep:
    cycle: int
    learning_rate: float
    temperature: float
    progress: float  # 0 at the first cycle, 1 at the last and beyond


@dataclass(frozen=True, kw_only=True)
class NoiseSchedule:
    """`shape`: "linear" (straight line), "cosine" (half cosine: slow, fast, slow) or "geometric"
    (straight in log space: the same ratio every cycle). No defaults: the start and end values depend on the
    model (`carl_assets.models.defaults.dream_sampling_defaults`), `cycles` and `shape` are
    `ScheduleSettings`' (see `from_settings`)."""

    cycles: int
    lr_start: float
    lr_end: float
    temperature_start: float
    temperature_end: float
    shape: str

    @classmethod
    def from_settings(
        cls,
        settings: ScheduleSettings,
        *,
        lr_start: float,
        lr_end: float,
        temperature_start: float,
        temperature_end: float,
    ) -> NoiseSchedule:
        """The schedule of `settings`' cycles and shape between these start and end values."""
        return cls(cycles=settings.schedule_cycles, shape=settings.schedule_shape, lr_start=lr_start,
                   lr_end=lr_end, temperature_start=temperature_start, temperature_end=temperature_end)

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
