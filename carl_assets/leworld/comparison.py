"""Is memory worth it? The same architecture trained with and without memory reads, over several seeds.

Zeroing a trained system's reads at test time (the `memory_ablated` row of `evaluate`) is not a fair
baseline: the network was trained to expect reads and is crippled without them. The fair one is the
same architecture *trained* with `memory_reads=False`, by the same phases, data and seeds. Each variant
is trained once per seed (the seed sets the initialisation, the batch order and phase 3's sampled
decisions); both are evaluated on the same validation sequences, and the verdict compares the means
over seeds with the spread between seeds:

    gap = mean(no-memory error) − mean(with-memory error)        (positive: memory lowers the error)
    spread = the larger of the two variants' sample standard deviations over seeds
    "memory helps" only if gap > 2·spread, "memory hurts" if gap < −2·spread, otherwise
    "no difference shown" (and "undetermined" with fewer than 2 seeds per variant).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd

from carl_assets.leworld.architecture import LeWorldSystem
from carl_assets.leworld.data import SequenceBatch
from carl_assets.leworld.evaluation import HORIZON, model_errors
from carl_assets.leworld.training import TrainingConfig, train_system

VARIANTS = ("memory", "no_memory")  # trained with memory reads | the same architecture trained without
VERDICT_METRICS = ("mse", "one_step_mse")  # rollout MSE (the headline) and teacher-forced one-step MSE


@dataclass
class Replicate:
    variant: str  # one of VARIANTS
    seed: int
    system: LeWorldSystem
    metrics: pd.DataFrame = field(
        default_factory=pd.DataFrame
    )  # train_system's long-format log (when trained here)


def train_replicates(
    make_system: Callable[[int, bool], LeWorldSystem],
    train: SequenceBatch,
    validation: SequenceBatch | None,
    config: TrainingConfig,
    seeds: Sequence[int],
    variants: Sequence[str] = VARIANTS,
    log: Callable[[str], None] | None = None,
    num_threads: int | None = 1,
) -> list[Replicate]:
    """Train every (variant, seed): `make_system(seed, memory_reads)` builds the initialised system, the
    training config's `seed` is set to the replicate's seed. Validation (logged per epoch) is passed only
    to the first replicate: the per-epoch log is for the primary model, the comparison uses `evaluate`."""
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        raise ValueError(f"variants must be a non-empty subset of {VARIANTS}, got {list(variants)}")
    if not seeds:
        raise ValueError("train_replicates needs at least one seed")
    replicates = []
    for variant in variants:
        for seed in seeds:
            system = make_system(int(seed), variant == "memory")
            if system.memory_reads != (variant == "memory"):
                raise ValueError(
                    f"make_system built memory_reads={system.memory_reads} for variant {variant!r}"
                )
            first = not replicates
            say = (lambda m, v=variant, s=seed: log(f"[{v} seed {s}] {m}")) if log else None
            cfg = config.model_copy(update={"seed": int(seed)})
            metrics = train_system(
                system, train, validation if first else None, cfg, log=say, num_threads=num_threads
            )
            replicates.append(Replicate(variant, int(seed), system, metrics))
    return replicates


def evaluate_replicates(
    replicates: Sequence[Replicate], data: SequenceBatch, n_steps: int = HORIZON
) -> pd.DataFrame:
    """One row per replicate: variant, seed and the trained system's own errors (`model_errors`, the
    `leworld` row of `evaluate`: rollout mse/mae and one_step_mse) on the same sequences."""
    rows = [
        {"variant": rep.variant, "seed": rep.seed, **model_errors(rep.system, data, n_steps)}
        for rep in replicates
    ]
    return pd.DataFrame(rows, columns=["variant", "seed", "mse", "mae", "one_step_mse"])


def verdict_for(gap: float, twice_spread: float, n_seeds: int) -> str:
    if n_seeds < 2 or math.isnan(twice_spread):
        return "undetermined (needs >= 2 seeds per variant)"
    if gap > twice_spread:
        return "memory helps"
    if gap < -twice_spread:
        return "memory hurts"
    return "no difference shown"


def memory_verdict(per_seed: pd.DataFrame, metrics: Sequence[str] = VERDICT_METRICS) -> pd.DataFrame:
    """One row per metric: mean ± sample std over seeds per variant, the gap, twice the spread and the
    verdict (see the module docstring). `per_seed` is `evaluate_replicates`' table."""
    missing = set(VARIANTS) - set(per_seed["variant"])
    if missing:
        raise ValueError(f"memory_verdict needs both variants {VARIANTS}; missing {sorted(missing)}")
    rows = []
    for metric in metrics:
        values = {v: per_seed.loc[per_seed["variant"] == v, metric].astype(float) for v in VARIANTS}
        n = min(len(x) for x in values.values())
        std = {v: float(x.std(ddof=1)) if len(x) > 1 else math.nan for v, x in values.items()}
        mean = {v: float(x.mean()) for v, x in values.items()}
        gap = mean["no_memory"] - mean["memory"]
        twice_spread = 2 * max(std.values())
        rows.append(
            {
                "metric": metric,
                "seeds": n,
                "memory_mean": mean["memory"],
                "memory_std": std["memory"],
                "no_memory_mean": mean["no_memory"],
                "no_memory_std": std["no_memory"],
                "gap": gap,
                "twice_spread": twice_spread,
                "verdict": verdict_for(gap, twice_spread, n),
            }
        )
    return pd.DataFrame(rows)


def verdict_sentence(row: pd.Series) -> str:
    """e.g. "memory helps: rollout MSE 0.101 ± 0.003 with memory vs 0.140 ± 0.004 trained without (3 seeds;
    gap 0.039 > 2×spread 0.008)"."""
    name = {"mse": "rollout MSE", "one_step_mse": "one-step MSE"}.get(row["metric"], row["metric"])
    relation = ">" if abs(row["gap"]) > row["twice_spread"] else "<="
    return (
        f"{row['verdict']}: {name} {row['memory_mean']:.4f} ± {row['memory_std']:.4f} with memory vs "
        f"{row['no_memory_mean']:.4f} ± {row['no_memory_std']:.4f} trained without ({row['seeds']} seeds; "
        f"|gap| {abs(row['gap']):.4f} {relation} 2×spread {row['twice_spread']:.4f})"
    )
