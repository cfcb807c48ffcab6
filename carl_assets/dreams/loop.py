"""One dream cycle: walk → collide → prompt → generate at the cycle's temperature → score → filter.

`dream` is the single entry point the Dagster asset calls. Every random choice is seeded from
(`config.seed`, `cycle`), so a cycle is reproducible and different cycles dream different scenes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from carl_assets.dreams.collisions import DEFAULT_SYSTEM_PROMPT, Collision, collide, scenario_messages
from carl_assets.dreams.convergence import cycle_statistics
from carl_assets.dreams.filtering import filter_responses
from carl_assets.dreams.generation import BatchCache, Sampling, generate_responses
from carl_assets.dreams.scoring import score_responses
from carl_assets.dreams.walks import WalkConfig, random_walks
from carl_assets.settings import Settings

MAX_WALK_ROUNDS = 8  # rounds of extra walks when skips, duplicates and exclusions leave too few scenarios


class DreamSettings(Settings):
    """A dream cycle's size, filter and seed, as `dream_scenarios` exposes them (flat: the walks are
    `WalkSettings`, the sampling's truncation is resolved per model). Raises ``ValueError`` (a pydantic
    ``ValidationError``) on a count below 1, a `top_fraction` outside (0, 1] or `max_memories` below 2."""

    n_scenarios: int = Field(default=32, description="scenarios (memory collisions) dreamed per cycle")
    responses_per_scenario: int = Field(default=4, description="responses sampled per scenario (k)")
    max_new_tokens: int = Field(default=32, description="tokens per response")
    # Not performance-only: each generate batch samples from its own seeded stream, so the batching
    # changes which answers are drawn.
    batch_size: int = Field(
        default=8,
        description="scenarios per generate call (each batch has its own "
        "seeded sampling stream, so this changes the answers drawn)",
    )
    max_memories: int = Field(default=3, description="memories collided per scenario (at least 2)")
    excerpt_chars: int = Field(default=160, description="characters of each memory shown in the prompt")
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
    seed: int = Field(default=0, description="seed of walks, collisions and sampling (mixed with the cycle)")

    @model_validator(mode="after")
    def _check_counts(self) -> Self:
        # Checked here, not first where they are used (filtering after generation, collide), so that a bad
        # value is refused before a cycle runs; the messages start with the field, as the run config names it.
        for name in ("n_scenarios", "responses_per_scenario", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must lie in (0, 1], got {self.top_fraction}")
        if self.max_memories < 2:
            raise ValueError("max_memories must be at least 2 (a scenario collides 2 or more memories), "
                             f"got {self.max_memories}")
        return self


class DreamConfig(DreamSettings):
    """The dream settings plus what the asset builds or never exposes: the walks (`walk`; its seed is
    replaced per cycle from `seed`), the sampling's truncation (default: none), the fewest memories a
    scenario collides and the system prompt."""

    walk: WalkConfig = Field(default_factory=WalkConfig, description="how scenarios' walks are drawn")
    min_memories: int = Field(default=2, description="memories collided per scenario, at least")
    system_prompt: str | None = Field(
        default=DEFAULT_SYSTEM_PROMPT, description="the dream prompt's system message (None: none)"
    )
    sampling: Sampling = Field(default_factory=Sampling, description="top-k / top-p / min-p truncation")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able values (the walk and sampling as dicts)."""
        return self.model_dump(mode="json")


@dataclass
class DreamResult:
    """One row per response in `frame`; the scenarios dreamed; the cycle's statistics."""

    frame: pd.DataFrame
    collisions: list[Collision]
    statistics: dict[str, float | int]
    walks: int  # walks drawn to find the scenarios
    reused_batches: int = 0  # generation batches taken from `cache_dir` (made by an earlier, interrupted run)


def _cycle_seed(seed: int, cycle: int, purpose: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(cycle), purpose]).generate_state(1)[0])


def dream_scenarios(nodes: pd.DataFrame, edges: pd.DataFrame, config: DreamConfig, cycle: int,
                    exclude: set[frozenset[str]] | None = None) -> tuple[list[Collision], int]:
    """Up to `n_scenarios` distinct collisions for this cycle (none in `exclude`), and the walks drawn."""
    found: list[Collision] = []
    seen = set(exclude or ())
    walks_drawn = 0
    for attempt in range(MAX_WALK_ROUNDS):
        need = config.n_scenarios - len(found)
        n_walks = 2 * need + 8  # some walks are skipped (too few distinct nodes, duplicates, excluded)
        walk_config = config.walk.model_copy(update={"seed": _cycle_seed(config.seed, cycle, 2 * attempt)})
        walks = random_walks(nodes, edges, n_walks, walk_config)
        walks_drawn += n_walks
        for c in collide(walks, nodes, min_memories=config.min_memories, max_memories=config.max_memories,
                         seed=_cycle_seed(config.seed, cycle, 2 * attempt + 1), exclude=seen):
            seen.add(c.node_set)
            found.append(c)
        if len(found) >= config.n_scenarios:
            break
    return found[: config.n_scenarios], walks_drawn


def dream(model: Any, tokenizer: Any, nodes: pd.DataFrame, edges: pd.DataFrame, config: DreamConfig,
          scorer: Any, cycle: int, temperature: float, exclude: set[frozenset[str]] | None = None,
          progress: Callable[[int, int], None] | None = None,
          cache_dir: str | os.PathLike[str] | None = None) -> DreamResult:
    """Dream one cycle and score it.

    `scorer` is any scorer (see `carl_assets.dreams.scoring`); its components become columns and its
    `score` (or primary component) ranks responses for the filter (`top_fraction`, `min_score`).
    `exclude` holds node sets never to dream (the held-out collisions). `progress(done, total)` counts
    scenarios generated, then all of them once scored. The frame has one row per response: dream_id,
    cycle, seed_node_ids (JSON list), seed_kinds (JSON list), prompt (JSON messages), temperature,
    sample_index, response, completion_tokens, finished, the score columns, score, kept, reason.

    `cache_dir`: generated batches are kept there as they are made, and batches already there (from a
    run of the same cycle that was killed) are reused, not generated again; the frame is the same as
    an uninterrupted run's. The caller picks one folder per cycle, policy and config, and removes it
    when the result is stored.
    """
    if cycle < 0:
        raise ValueError(f"cycle must be >= 0, got {cycle}")
    collisions, walks_drawn = dream_scenarios(nodes, edges, config, cycle, exclude)
    prompts = [
        scenario_messages(c, excerpt_chars=config.excerpt_chars, system_prompt=config.system_prompt)
        for c in collisions
    ]
    total = len(prompts)
    cache = BatchCache(cache_dir) if cache_dir is not None else None
    responses = generate_responses(model, tokenizer, prompts, k=config.responses_per_scenario,
                                   temperature=temperature, max_new_tokens=config.max_new_tokens,
                                   batch_size=config.batch_size, seed=_cycle_seed(config.seed, cycle, 10_000),
                                   progress=progress, cache=cache, sampling=config.sampling)
    components = score_responses(scorer, model, tokenizer, responses) if responses else {"score": np.zeros(0)}
    if progress is not None:
        progress(total, total)
    prompt_json = [json.dumps(p, ensure_ascii=False) for p in prompts]
    frame = pd.DataFrame({
        "dream_id": [collisions[r.prompt_index].dream_id for r in responses],
        "cycle": np.full(len(responses), cycle, dtype=np.int64),
        "seed_node_ids": [json.dumps(list(collisions[r.prompt_index].node_ids)) for r in responses],
        "seed_kinds": [json.dumps(list(collisions[r.prompt_index].kinds)) for r in responses],
        "prompt": [prompt_json[r.prompt_index] for r in responses],
        "temperature": np.full(len(responses), float(temperature)),
        "sample_index": np.array([r.sample_index for r in responses], dtype=np.int64),
        "response": [r.text for r in responses],
        "completion_tokens": np.array([len(r.completion_ids) for r in responses], dtype=np.int64),
        "finished": np.array([r.finished for r in responses], dtype=bool),
    })
    for name, values in components.items():
        if name != "score":
            frame[name] = values
    frame["score"] = components["score"]
    frame = filter_responses(frame, top_fraction=config.top_fraction, min_score=config.min_score)
    return DreamResult(frame=frame, collisions=collisions, statistics=cycle_statistics(frame),
                       walks=walks_drawn, reused_batches=0 if cache is None else cache.reused)
