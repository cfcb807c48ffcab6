"""One dream cycle: walk → collide → prompt → generate at the cycle's temperature → score → filter.

`dream` is the single entry point the Dagster asset calls. Every random choice is seeded from
(`config.seed`, `cycle`), so a cycle is reproducible and different cycles dream different scenes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from carl_assets.dreams.collisions import DEFAULT_SYSTEM_PROMPT, Collision, collide, scenario_messages
from carl_assets.dreams.convergence import cycle_statistics
from carl_assets.dreams.filtering import filter_responses
from carl_assets.dreams.generation import BatchCache, Sampling, generate_responses
from carl_assets.dreams.scoring import score_responses
from carl_assets.dreams.walks import WalkConfig, random_walks

MAX_WALK_ROUNDS = 8  # rounds of extra walks when skips, duplicates and exclusions leave too few scenarios


@dataclass
class DreamConfig:
    n_scenarios: int = 32
    responses_per_scenario: int = 4
    max_new_tokens: int = 48
    batch_size: int = 8  # prompts per generate call (each with responses_per_scenario samples)
    walk: WalkConfig = field(default_factory=WalkConfig)
    min_memories: int = 2
    max_memories: int = 3
    excerpt_chars: int = 160
    top_fraction: float = 0.5
    min_score: float | None = None
    seed: int = 0
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    sampling: Sampling = field(default_factory=Sampling)  # top-k / top-p / min-p truncation (default: none)

    def __post_init__(self) -> None:
        for name in ("n_scenarios", "responses_per_scenario", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DreamConfig.{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.walk, dict):  # from a JSON/YAML config
            self.walk = WalkConfig(**self.walk)
        if isinstance(self.sampling, dict):
            self.sampling = Sampling(**self.sampling)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        walk_config = replace(config.walk, seed=_cycle_seed(config.seed, cycle, 2 * attempt))
        walks = random_walks(nodes, edges, n_walks, walk_config)
        walks_drawn += n_walks
        for c in collide(walks, nodes, config.min_memories, config.max_memories,
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
    prompts = [scenario_messages(c, config.excerpt_chars, config.system_prompt) for c in collisions]
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
