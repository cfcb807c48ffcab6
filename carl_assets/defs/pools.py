"""Concurrency pools: each asset that must not run beside another of its kind names its pool in its decorator
(`@dg.asset(pool=TRAINING_POOL)`), and every pool is limited to 1 across all runs (`concurrency: pools:
default_limit: 1` in the project's dagster.yaml, written by carl_assets/dagster_instance.py), so two
overlapping runs take turns on these steps while every other step runs freely.

- `training`: assets that train or generate for long; they share one machine's cores, and two at once
  would each take twice as long (or run out of memory on a GPU).
- `ledger`: `crystallization_events` reads its tables kept across runs, then writes them back with its row
  added; two at once would each write back what they read, and one run's row would be lost.

`POOLED` lists the members the decorators are expected to declare; tests/test_concurrency.py compares it
with the pool Dagster reports for each asset's op, so a decorator that loses its `pool=` fails a test.
"""

from __future__ import annotations

TRAINING_POOL = "training"
LEDGER_POOL = "ledger"

POOLED: dict[str, frozenset[str]] = {
    TRAINING_POOL: frozenset({"base_model", "dream_scenarios", "scorer_validation", "sft_checkpoint",
                              "grpo_checkpoint", "leworld_model"}),
    LEDGER_POOL: frozenset({"crystallization_events"}),
}
