"""The dream loop (seed `dreaming-as-diffusion.md`): the memory graph as latent space, random walks that
collide memories into scenarios, the model's own responses at a falling temperature, scored by a
training-signal agent and filtered into behavioural-cloning data.

- `walks`: random walks with restart from recent reflections/lessons (the sampling).
- `collisions`: memories collided into a scenario and its chat prompt; held-out collisions.
- `generation`: batched decoding of k responses per scenario (and the naive one-at-a-time path).
- `scoring`: pluggable scorers (CARL, steering projection, weighted combinations from a spec).
- `filtering`: which responses are kept; TRL prompt-completion examples from them.
- `schedule`: the noise schedule (learning rate and temperature fall together).
- `convergence`: per-cycle statistics and the inverse diagnostic on held-out scenarios.
- `loop`: `dream`, one cycle end to end.

No Dagster import here: the assets in `carl_assets.defs` call these.
"""

from carl_assets.dreams.collisions import (
    DEFAULT_SYSTEM_PROMPT,
    Collision,
    collide,
    dream_id_of,
    heldout_collisions,
    scenario_messages,
)
from carl_assets.dreams.convergence import cycle_statistics, inverse_diagnostic_pass_rate
from carl_assets.dreams.filtering import filter_responses, normalise_text, sft_examples_from_dreams
from carl_assets.dreams.generation import GeneratedResponse, generate_one_at_a_time, generate_responses
from carl_assets.dreams.loop import DreamConfig, DreamResult, dream, dream_scenarios
from carl_assets.dreams.schedule import NoiseSchedule, ScheduleStep
from carl_assets.dreams.scoring import (
    CarlScorer,
    CombinedScorer,
    Scorer,
    SteeringScorer,
    parse_scorer_spec,
    score_responses,
)
from carl_assets.dreams.walks import WalkConfig, WalkSample, random_walks, sample_walks, start_candidates

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "CarlScorer",
    "Collision",
    "CombinedScorer",
    "DreamConfig",
    "DreamResult",
    "GeneratedResponse",
    "NoiseSchedule",
    "ScheduleStep",
    "Scorer",
    "SteeringScorer",
    "WalkConfig",
    "WalkSample",
    "collide",
    "cycle_statistics",
    "dream",
    "dream_id_of",
    "dream_scenarios",
    "filter_responses",
    "generate_one_at_a_time",
    "generate_responses",
    "heldout_collisions",
    "inverse_diagnostic_pass_rate",
    "normalise_text",
    "parse_scorer_spec",
    "random_walks",
    "sample_walks",
    "scenario_messages",
    "score_responses",
    "sft_examples_from_dreams",
    "start_candidates",
]
