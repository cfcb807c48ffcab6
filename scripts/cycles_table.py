"""The three-cycle table of README "Behaviour across three dream cycles", from the `behaviour.json` files that
`scripts/real_cycles.py` writes (one per seed): per arm and cycle, mean ± standard deviation over the
seeds, then each seed's bootstrap interval for the last cycle.

    usage: python scripts/cycles_table.py HOME_SEED0/behaviour.json HOME_SEED1/behaviour.json ...
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

SPLITS = ("heldout", "dreamed", "generic")


def spread(values: list[float], digits: int) -> str:
    """`mean ± sd` over seeds (the sd only when there are two or more)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def pick(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    return next(r for r in rows if all(r.get(k) == v for k, v in match.items()))


def table_rows(runs: list[dict[str, Any]]) -> list[str]:
    cycles = sorted({r["cycle"] for r in runs[0]["absorption"]})
    lines = [
        "| arm | cycle | T | SFT lr | kept score | held-out pass | Δ NLL held-out | Δ NLL dreamed | "
        "Δ NLL generic | anxiety vs base | steering − plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ("plain", "steering"):
        for c in cycles:
            nll = {
                s: [pick(r["absorption"], arm=arm, cycle=c, split=s)["delta"]["mean"] for r in runs]
                for s in SPLITS
            }
            readout = [pick(r["readout"], arm=arm, cycle=c) for r in runs]
            dreams = [pick(r["dream_cycles"][arm], cycle=c) for r in runs]
            diff = (
                spread([x["steering_minus_plain"]["mean"] for x in readout], 1) if arm == "steering" else ""
            )
            lines.append(
                f"| {arm} | {c} | {dreams[0]['temperature']:.1f} | {dreams[0]['learning_rate']:.1e} | "
                f"{spread([d['score_mean'] for d in dreams], 2)} | "
                f"{spread([d['heldout_pass_rate'] for d in dreams], 2)} | "
                + " | ".join(spread(nll[s], 3) for s in SPLITS)
                + f" | {spread([x['vs_base']['mean'] for x in readout], 1)} | {diff} |"
            )
    return lines


def interval(i: dict[str, float], digits: int) -> str:
    return f"{i['mean']:+.{digits}f} [{i['low']:+.{digits}f}, {i['high']:+.{digits}f}]"


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    runs = [json.loads(Path(p).read_text()) for p in paths]
    print("\n".join(table_rows(runs)))
    last = max(r["cycle"] for r in runs[0]["absorption"])
    for path, run in zip(paths, runs, strict=True):
        steer = pick(run["readout"], arm="steering", cycle=last)["steering_minus_plain"]
        held = {
            a: pick(run["absorption"], arm=a, cycle=last, split="heldout")["delta"]
            for a in ("plain", "steering")
        }
        print(
            f"{path}: cycle {last} steering - plain {interval(steer, 1)}; held-out Δ NLL plain "
            f"{interval(held['plain'], 4)}, steering {interval(held['steering'], 4)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
