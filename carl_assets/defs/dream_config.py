"""dream_scenarios' run config: walks, collisions, sampling, the noise schedule and the scorer, each field
resolved against the model's defaults (`carl_assets.models.defaults`) into the library's configs."""

from typing import Any

import dagster as dg
from pydantic import Field

from carl_assets.carl.run_config import Placement, Truncation
from carl_assets.defs.common import library_config
from carl_assets.dreams.cycle_state import PolicyChoice
from carl_assets.dreams.generation import Sampling
from carl_assets.dreams.loop import DreamConfig, DreamSettings
from carl_assets.dreams.schedule import NoiseSchedule, ScheduleSettings
from carl_assets.dreams.walks import WalkConfig, WalkSettings
from carl_assets.models.defaults import dream_sampling_defaults, scorer_defaults


class DreamScenariosConfig(
    dg.Config, DreamSettings, WalkSettings, ScheduleSettings, PolicyChoice, Truncation, Placement
):
    """dream_scenarios: walks, collisions, the filter and the noise schedule. `DreamSettings`: the cycle's
    size, filter and seed (which also seeds the walks); `WalkSettings`: the walks; `ScheduleSettings`: the
    schedule's length and shape (its start and end values below, per model); `PolicyChoice`: the policy
    that dreams; `Truncation` (top_p, top_k, min_p): the truncation of dream sampling; `Placement`: where
    the policy generates and is scored."""

    scorer: str | None = Field(
        default=None,
        description="the training-signal agent: None (the model's default as scorer_validation chose it: "
        "models.defaults.scorer_defaults), 'carl', a CARL component, 'phi_mean', 'self_certainty', "
        "'neg_entropy', 'mean_logprob', "
        "'steering:<emotion>' or a weighted mix such as 'carl:0.7,steering:warmth:0.3'",
    )
    heldout_scenarios: int = Field(
        default=8, description="fixed novel collisions never dreamed on, for the inverse diagnostic"
    )
    cycle: int = Field(default=-1, description="this cycle's number (-1: one after the last in dream_cycles)")
    temperature_start: float | None = Field(
        default=None,
        description="noise schedule: sampling temperature of cycle 0 (None: the model's default, "
        "models.defaults.dream_sampling_defaults)",
    )
    temperature_end: float | None = Field(
        default=None,
        description="noise schedule: temperature of the last cycle (None: the model's default)",
    )
    lr_start: float | None = Field(
        default=None,
        gt=0,
        description="noise schedule: SFT learning rate of cycle 0 (None: the model's default, "
        "models.defaults.dream_sampling_defaults)",
    )
    lr_end: float | None = Field(
        default=None,
        gt=0,
        description="noise schedule: learning rate of the last cycle (None: a tenth of lr_start, as the "
        "reference's schedule)",
    )

    def schedule(self, offline: bool) -> NoiseSchedule:
        """The noise schedule: each None field as the model's default."""
        defaults = dream_sampling_defaults(offline)
        lr_start = _or(self.lr_start, defaults.lr_start)
        lr_end = _or(self.lr_end, lr_start / 10)
        return NoiseSchedule.from_settings(
            library_config(self, ScheduleSettings),
            lr_start=lr_start,
            lr_end=lr_end,
            temperature_start=_or(self.temperature_start, defaults.temperature_start),
            temperature_end=_or(self.temperature_end, defaults.temperature_end),
        )

    def scorer_spec(self, offline: bool) -> str:
        """The scorer spec: as set, or for None the model's default (`models.defaults.scorer_defaults`)."""
        return scorer_defaults(offline).dream_scorer if self.scorer is None else self.scorer

    def sampling(self, offline: bool) -> Sampling:
        """The truncation of dream sampling: each field as set, else the model's default."""
        defaults = dream_sampling_defaults(offline)
        return Sampling(
            top_k=_or(self.top_k, defaults.top_k),
            top_p=_or(self.top_p, defaults.top_p),
            min_p=_or(self.min_p, defaults.min_p),
        )

    def dream_config(self, offline: bool = True) -> DreamConfig:
        """The library's dream config (walks, collisions, filter, sampling) for this model."""
        walk = WalkConfig(**library_config(self, WalkSettings).model_dump(), seed=self.seed)
        return DreamConfig(
            **library_config(self, DreamSettings).model_dump(), walk=walk, sampling=self.sampling(offline)
        )


def _or(value: Any, default: Any) -> Any:
    """`value` unless it is None (then the model's default)."""
    return default if value is None else value
