"""dream_scenarios' run config: walks, collisions, sampling, the noise schedule and the scorer, each field
resolved against the model's defaults (`carl_assets.models.defaults`) into the library's configs."""

from typing import Any

import dagster as dg
from pydantic import Field

from carl_assets.carl.run_config import Placement, Truncation
from carl_assets.dreams import DreamConfig, NoiseSchedule, WalkConfig
from carl_assets.dreams.cycle_state import PolicyChoice
from carl_assets.dreams.generation import Sampling
from carl_assets.models.defaults import dream_sampling_defaults, scorer_defaults


class DreamScenariosConfig(dg.Config, PolicyChoice, Truncation, Placement):
    """dream_scenarios: walks, collisions, the filter and the noise schedule. `PolicyChoice`: the policy
    that dreams; `Truncation` (top_p, top_k, min_p): the truncation of dream sampling; `Placement`: where
    the policy generates and is scored."""

    scorer: str | None = Field(
        default=None,
        description="the training-signal agent: None (the model's default as scorer_validation chose it: "
        "models.defaults.scorer_defaults), 'carl', a CARL component, 'phi_mean', 'self_certainty', "
        "'neg_entropy', 'mean_logprob', "
        "'steering:<emotion>' or a weighted mix such as 'carl:0.7,steering:warmth:0.3'",
    )
    n_scenarios: int = Field(default=32, description="scenarios (memory collisions) dreamed per cycle")
    responses_per_scenario: int = Field(default=4, description="responses sampled per scenario (k)")
    max_new_tokens: int = Field(default=32, description="tokens per response")
    top_fraction: float = Field(
        default=0.25,
        description="the filter keeps this top share of each scenario's responses (0.25 of 4: the best one)",
    )
    min_score: float | None = Field(
        default=None,
        description="the filter keeps only responses scoring at "
        "least this (None: no minimum; the inverse diagnostic then uses the score "
        "the filter kept at, the cycle's (1 - top_fraction) quantile)",
    )
    restart_prob: float = Field(
        default=0.15, description="random walk: probability of jumping back to the start node at each step"
    )
    walk_length: int = Field(default=8, description="random walk: steps per walk")
    relation_weights: dict[str, float] = Field(
        default={}, description="random walk: edge weight per relation type (others weigh 1)"
    )
    conditioning_kinds: list[str] = Field(
        default=[],
        description="walks start at recent nodes of these "
        "kinds; [] (the default) means the graph's own: reflection/lesson "
        "when it has at least 8 of them, else its most populous kinds "
        "covering half its nodes (carl_assets.dreams.walks)",
    )
    recent_nodes: int = Field(
        default=64, description="walks start among this many most recent nodes of the conditioning kinds"
    )
    recency_half_life_days: float = Field(
        default=30.0,
        description="when nodes carry dates (updated_at), a "
        "start dated this many days before the newest seeds half as many "
        "walks (<= 0: equal shares; without dates shares are equal)",
    )
    max_memories: int = Field(default=3, description="memories collided per scenario (at least 2)")
    excerpt_chars: int = Field(default=160, description="characters of each memory shown in the prompt")
    heldout_scenarios: int = Field(
        default=8, description="fixed novel collisions never dreamed on, for the inverse diagnostic"
    )
    cycle: int = Field(default=-1, description="this cycle's number (-1: one after the last in dream_cycles)")
    schedule_cycles: int = Field(
        default=3, description="noise schedule: cycles from the start to the end values"
    )
    schedule_shape: str = Field(
        default="cosine", description="noise schedule: 'linear', 'cosine' or 'geometric'"
    )
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
    seed: int = Field(default=0, description="seed of walks, collisions and sampling (mixed with the cycle)")
    # Not performance-only: each generate batch samples from its own seeded stream, so the batching
    # changes which answers are drawn.
    batch_size: int = Field(
        default=8,
        description="scenarios per generate call (each batch has its own "
        "seeded sampling stream, so this changes the answers drawn)",
    )

    def schedule(self, offline: bool) -> NoiseSchedule:
        """The noise schedule: each None field as the model's default."""
        defaults = dream_sampling_defaults(offline)
        lr_start = _or(self.lr_start, defaults.lr_start)
        lr_end = _or(self.lr_end, lr_start / 10)
        return NoiseSchedule(
            cycles=self.schedule_cycles,
            lr_start=lr_start,
            lr_end=lr_end,
            temperature_start=_or(self.temperature_start, defaults.temperature_start),
            temperature_end=_or(self.temperature_end, defaults.temperature_end),
            shape=self.schedule_shape,
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
        walk = WalkConfig(
            restart_prob=self.restart_prob,
            walk_length=self.walk_length,
            relation_weights=dict(self.relation_weights),
            conditioning_kinds=tuple(self.conditioning_kinds),
            recent_nodes=self.recent_nodes,
            recency_half_life_days=self.recency_half_life_days,
            seed=self.seed,
        )
        return DreamConfig(
            n_scenarios=self.n_scenarios,
            responses_per_scenario=self.responses_per_scenario,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            walk=walk,
            max_memories=self.max_memories,
            excerpt_chars=self.excerpt_chars,
            top_fraction=self.top_fraction,
            min_score=self.min_score,
            seed=self.seed,
            sampling=self.sampling(offline),
        )


def _or(value: Any, default: Any) -> Any:
    """`value` unless it is None (then the model's default)."""
    return default if value is None else value
