"""Convergence of the dream loop, as the reference defines it.

Per cycle: how many responses the filter rejects, the spread of scores, and the fraction of
scenarios with no signal (every response scored alike: the scenario is too easy or too hard to teach
anything). Across cycles: the inverse diagnostic, the policy's greedy ("reflex") response to held-out
novel scenarios, which passes when the filter would keep it. The behaviour is learned when it passes
on scenarios it was never trained on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from carl_assets.dreams.collisions import DEFAULT_SYSTEM_PROMPT, Collision, scenario_messages
from carl_assets.dreams.generation import generate_responses
from carl_assets.dreams.scoring import score_responses


def cycle_statistics(
    frame: pd.DataFrame, score_column: str = "score", no_signal_tolerance: float = 1e-6
) -> dict[str, float | int]:
    """dreams (scenarios), responses, kept, reject_fraction, score_mean, score_std (population),
    no_signal_fraction (scenarios whose scores span at most `no_signal_tolerance`), and
    score_spread_mean (the mean max-min score within a scenario). An empty frame gives zero counts and
    NaN for the rest."""
    missing = {score_column, "dream_id", "kept"} - set(frame.columns)
    if missing:
        raise ValueError(f"cycle_statistics: frame lacks columns {sorted(missing)}")
    n = len(frame)
    if n == 0:
        nan = float("nan")
        return {
            "dreams": 0,
            "responses": 0,
            "kept": 0,
            "reject_fraction": nan,
            "score_mean": nan,
            "score_std": nan,
            "no_signal_fraction": nan,
            "score_spread_mean": nan,
        }
    scores = frame[score_column].astype(float)
    spread = scores.groupby(frame["dream_id"].astype(str)).agg(lambda s: float(s.max() - s.min()))
    kept = int(frame["kept"].astype(bool).sum())
    return {
        "dreams": int(len(spread)),
        "responses": int(n),
        "kept": kept,
        "reject_fraction": 1.0 - kept / n,
        "score_mean": float(scores.mean()),
        "score_std": float(scores.std(ddof=0)),
        "no_signal_fraction": float((spread <= no_signal_tolerance).mean()),
        "score_spread_mean": float(spread.mean()),
    }


def inverse_diagnostic_pass_rate(
    model: Any,
    tokenizer: Any,
    collisions: Sequence[Collision],
    scorer: Any,
    *,
    min_score: float | None = None,
    max_new_tokens: int,
    batch_size: int,
    excerpt_chars: int,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> tuple[float, pd.DataFrame]:
    """The policy's greedy response to each held-out collision, scored; it passes when the filter's
    minimum would keep it (non-empty and, when `min_score` is set, score >= min_score).

    Returns (pass rate, one row per collision: dream_id, node_ids_json, response, every score column,
    passed). No collisions: pass rate NaN and an empty frame.
    """
    columns = ["dream_id", "node_ids_json", "response", "score", "passed"]
    if not collisions:
        return float("nan"), pd.DataFrame(columns=columns)
    prompts = [
        scenario_messages(c, excerpt_chars=excerpt_chars, system_prompt=system_prompt) for c in collisions
    ]
    responses = generate_responses(
        model, tokenizer, prompts, k=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    components = score_responses(scorer, model, tokenizer, responses)
    frame = pd.DataFrame(
        {
            "dream_id": [c.dream_id for c in collisions],
            "node_ids_json": [json.dumps(list(c.node_ids)) for c in collisions],
            "response": [r.text for r in responses],
            **components,
        }
    )
    non_empty = frame["response"].str.strip().str.len() > 0
    passed = non_empty if min_score is None else non_empty & (frame["score"] >= min_score)
    frame["passed"] = passed.to_numpy(dtype=bool)
    return float(np.mean(frame["passed"])), frame
