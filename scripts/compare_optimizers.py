"""SFT with AdamW vs APOLLO (`apollo_adamw`) on the same data from the same weights, several seeds.

Used to choose the dream cycles' default optimizer: prints, per optimizer and seed, whether the
crystallization gate fired, at which step, the final token accuracy and loss, and the wall time.

    .venv/bin/python scripts/compare_optimizers.py MODEL_DIR DATASET_DIR [--lr 1.5e-3] [--seeds 0 1 2]

MODEL_DIR: e.g. <CARL_HOME>/artifacts/base_model/current;
DATASET_DIR: <CARL_HOME>/artifacts/sft_dataset/<v>/dataset.
"""

from __future__ import annotations

import argparse
import json
import statistics

from datasets import load_from_disk

from carl_assets.carl.training import SFTRunConfig, train_sft
from carl_assets.models.loading import load_model_and_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("dataset")
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--optims", nargs="+", default=["adamw_torch", "apollo_adamw"])
    args = parser.parse_args()
    dataset = load_from_disk(args.dataset)
    rows = []
    for optim in args.optims:
        for seed in args.seeds:
            model, tokenizer = load_model_and_tokenizer(args.model)
            config = SFTRunConfig(
                max_steps=args.max_steps,
                learning_rate=args.lr,
                seed=seed,
                threads=1,
                optim=optim,
                max_length=512,
            )
            outcome = train_sft(model, tokenizer, dataset, None, config)
            losses = [r["loss"] for r in outcome.log_history if r.get("loss") is not None]
            row = {
                "optim": optim,
                "seed": seed,
                "crystallized": outcome.crystallized,
                "trigger_step": outcome.trigger_step,
                "steps": outcome.steps,
                "final_accuracy": outcome.final_accuracy,
                "final_loss": losses[-1] if losses else None,
                "seconds": round(outcome.seconds, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    for optim in args.optims:
        mine = [r for r in rows if r["optim"] == optim]
        steps = [r["steps"] for r in mine]
        print(
            json.dumps(
                {
                    "optim": optim,
                    "crystallized": sum(r["crystallized"] for r in mine),
                    "runs": len(mine),
                    "steps_mean": statistics.mean(steps),
                    "steps_std": statistics.pstdev(steps),
                    "seconds_mean": statistics.mean(r["seconds"] for r in mine),
                }
            )
        )


if __name__ == "__main__":
    main()
