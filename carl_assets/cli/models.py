"""`carl train`, `carl agent`, `carl readout` and `carl sft-rank`: the library's trainers, agent step and
emotion readout on a model folder or hub id, without Dagster.

The library modules are imported inside the commands: they load torch and transformers (about 10 s on a
small CPU), which `carl constants` or `carl lineage` never need.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

from carl_assets.carl import KAPPA, KAPPA_SIGMA, SIGMA
from carl_assets.cli.arguments import (
    UsageError,
    add_allow_pickle,
    add_placement_flags,
    finite_float,
    positive_int,
)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `train`, `agent`, `readout` and `sft-rank` on `carl`'s subparsers."""
    _add_train(sub)
    agent = sub.add_parser("agent", help="one coherence-gated agent step")
    agent.add_argument("--model", required=True, help="hub id or local folder")
    agent.add_argument("--task", required=True, help="the instruction")
    agent.add_argument("--observation", default="", help="what the agent sees")
    agent.add_argument("--gate-threshold", type=finite_float, default=SIGMA)
    agent.add_argument("--max-new-tokens", type=positive_int, default=128)
    agent.add_argument("--trust-remote-code", action="store_true")
    add_placement_flags(agent)
    add_allow_pickle(agent)
    agent.set_defaults(run=cmd_agent)

    readout = sub.add_parser("readout", help="a text's emotion projections on the amygdala readout vectors")
    readout.add_argument("--text", action="append", required=True, help="a text to read (repeat for several)")
    readout.add_argument("--vectors", default=None, help="readout folder (default: the current "
                         "$CARL_HOME/artifacts/steering_vectors)")
    readout.add_argument("--model", default=None, help="model to run (default: the one the vectors were made "
                         "on, from the manifest)")
    readout.add_argument("--layer", type=int, default=None, help="readout layer (default: the deepest)")
    add_allow_pickle(readout)
    readout.set_defaults(run=cmd_readout)
    _add_sft_rank(sub)


def _add_train(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="SFT until crystallization, or GRPO on the CARL reward")
    train.add_argument("--method", choices=("sft", "grpo"), default="grpo")
    train.add_argument("--model", required=True, help="hub id or local folder (e.g. the base_model asset's)")
    train.add_argument("--dataset", required=True,
                       help="a local .jsonl/.json/.parquet file or a Hugging Face dataset name")
    train.add_argument("--output", default="carl-output")
    train.add_argument("--max-steps", type=positive_int, default=300)
    train.add_argument("--gate-accuracy", type=finite_float, default=None,
                       help="SFT: stop when 3 of the last 5 logged token accuracies reach this "
                       "(default 0.99)")
    train.add_argument("--threads", type=positive_int, default=None,
                       help="torch CPU threads while training (default: torch's; 1 is fastest for tiny "
                       "models)")
    train.add_argument("--trust-remote-code", action="store_true")
    add_placement_flags(train)
    train.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                       help="recompute activations (default: on for a real model, off for the offline one)")
    train.add_argument("--lr", type=finite_float, default=None, help="peak learning rate (default: the "
                       "model's: "
                       "SFT 2e-5 / GRPO 1e-6 for a real model, 1.5e-3 / 1e-4 for the offline one)")
    train.add_argument("--lr-scheduler", default=None,
                       help="transformers schedule: constant, linear, cosine, ...")
    train.add_argument("--warmup-ratio", type=finite_float, default=None,
                       help="share of steps warming up, [0, 1)")
    train.add_argument("--batch-size", type=positive_int, default=None, help="examples (SFT) or completions "
                       "(GRPO) per device step")
    train.add_argument("--grad-accum", type=positive_int, default=None, help="batches per optimizer step")
    train.add_argument("--num-generations", type=positive_int, default=None,
                       help="GRPO: completions per prompt")
    train.add_argument("--max-completion-length", type=positive_int, default=None,
                       help="GRPO: tokens per completion")
    add_allow_pickle(train)
    train.set_defaults(run=cmd_train)


def _add_sft_rank(sub: argparse._SubParsersAction) -> None:
    # What `torchrun` / `accelerate launch` start once per process (carl.distributed.launch_command).
    rank = sub.add_parser("sft-rank", help="one process of a multi-process SFT run (started by torchrun or "
                          "accelerate launch; see carl_assets/carl/distributed.py)")
    rank.add_argument("--model", required=True, help="folder of the starting checkpoint (safetensors)")
    rank.add_argument("--dataset", required=True,
                      help="save_to_disk folder or .jsonl/.json/.parquet/.csv file")
    rank.add_argument("--output", required=True, help="folder rank 0 saves the checkpoint to")
    rank.add_argument("--config", default="{}",
                      help="JSON object of SFTRunConfig fields (batch_size is global)")
    rank.add_argument("--log-every", type=positive_int, default=None,
                      help="progress line every this many steps (default: run_sft's SFT interval)")
    rank.add_argument("--launcher", default="inprocess",
                      help="recorded in the log: how the processes were started")
    rank.set_defaults(run=cmd_sft_rank)


def _placement(args: argparse.Namespace, purpose: str = "inference") -> tuple[bool, Any, Any]:
    """(offline model?, device, dtype) for `--model`, `--device` and `--dtype`
    (models.defaults.resolve_placement)."""
    from carl_assets.models.defaults import is_offline_model, resolve_placement

    offline = Path(args.model).is_dir() and is_offline_model(args.model)
    return (offline, *resolve_placement(args.device, args.dtype, offline, purpose))


def _config(cls: Any, **values: Any) -> Any:
    """Build a run-config dataclass from the values it has fields for (None means: keep its default)."""
    # pydantic run configs (carl.run_config), or a dataclass
    names = set(getattr(cls, "model_fields", ())) or (
        {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set())
    return cls(**{k: v for k, v in values.items() if k in names and v is not None})


def _get(outcome: Any, name: str) -> Any:
    return outcome.get(name) if isinstance(outcome, dict) else getattr(outcome, name, None)


def _shared_values(args: argparse.Namespace, defaults: Any, device: Any, dtype: Any) -> dict[str, Any]:
    """The run-config values both trainers take: each flag left out takes this model's default."""
    from carl_assets.models.device import dtype_name

    return {
        "device": str(device), "dtype": dtype_name(dtype),
        "learning_rate": args.lr if args.lr is not None else defaults.learning_rate,
        "lr_scheduler_type": args.lr_scheduler or defaults.lr_scheduler_type,
        "warmup_ratio": args.warmup_ratio if args.warmup_ratio is not None else defaults.warmup_ratio,
        "batch_size": args.batch_size or defaults.batch_size,
        "gradient_accumulation_steps": args.grad_accum or defaults.gradient_accumulation_steps,
        "gradient_checkpointing": defaults.gradient_checkpointing if args.gradient_checkpointing is None
        else args.gradient_checkpointing,
    }


def cmd_train(args: argparse.Namespace) -> int:
    from carl_assets.models.defaults import training_defaults
    from carl_assets.models.device import training_weights_dtype
    from carl_assets.models.loading import load_model_and_tokenizer

    training = importlib.import_module("carl_assets.carl.training")
    print(f"CARL train: {args.model} → {args.output}")
    print(f" method={args.method} steps={args.max_steps}")
    print(f" kappa={KAPPA:.4f} sigma={SIGMA:.4f} kappa*sigma={KAPPA_SIGMA}")
    offline, device, dtype = _placement(args, "training")
    defaults = getattr(training_defaults(offline), args.method)
    dataset = training.load_training_dataset(args.dataset)
    model, tokenizer = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code,
                                                allow_pickle=args.allow_pickle, device=device,
                                                dtype=training_weights_dtype(dtype))
    shared = _shared_values(args, defaults, device, dtype)
    print(f" device={shared['device']} dtype={shared['dtype']} lr={shared['learning_rate']:.2e} "
          f"({shared['lr_scheduler_type']}) "
          f"batch={shared['batch_size']}x{shared['gradient_accumulation_steps']}")
    run = _run_sft if args.method == "sft" else _run_grpo
    run(training, args, defaults, shared, (model, tokenizer, dataset))
    print(f" Done. Model at: {args.output}")
    return 0


def _run_sft(training: Any, args: argparse.Namespace, defaults: Any, shared: dict[str, Any],
             inputs: tuple) -> None:
    config = _config(training.SFTRunConfig, max_steps=args.max_steps, gate_threshold=args.gate_accuracy,
                     threads=args.threads, **shared)
    outcome = training.train_sft(*inputs, args.output, config)
    if _get(outcome, "triggered"):
        print(f" Crystallized at step {_get(outcome, 'trigger_step')} "
              f"(window {[round(v, 4) for v in _get(outcome, 'window_values') or []]})")
    else:
        print(f" Did not crystallize within {args.max_steps} steps")
    peak = _get(outcome, "peak_entropy")
    if peak is not None:
        print(f" Peak entropy: {peak:.4f} at step {_get(outcome, 'peak_entropy_step')}")


def _run_grpo(training: Any, args: argparse.Namespace, defaults: Any, shared: dict[str, Any],
              inputs: tuple) -> None:
    generations = args.num_generations or defaults.num_generations
    if not args.batch_size:  # the default batch holds whole groups
        shared["batch_size"] = -(-max(defaults.batch_size, generations) // generations) * generations
    config = _config(training.GRPORunConfig, max_steps=args.max_steps, threads=args.threads, **shared,
                     num_generations=generations,
                     max_completion_length=args.max_completion_length or defaults.max_completion_length)
    outcome = training.train_grpo(*inputs, args.output, config)
    rewards = list(_get(outcome, "rewards") or [])
    if rewards:
        print(f" CARL reward: first step {rewards[0]:.4f}, last step {rewards[-1]:.4f} "
              f"({len(rewards)} steps)")


def cmd_agent(args: argparse.Namespace) -> int:
    from carl_assets.carl.agent import agent_step
    from carl_assets.models.loading import load_model_and_tokenizer

    _, device, dtype = _placement(args)
    model, tokenizer = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code,
                                                allow_pickle=args.allow_pickle, device=device, dtype=dtype)
    step = agent_step(model, tokenizer, args.observation, args.task, gate_threshold=args.gate_threshold,
                      max_new_tokens=args.max_new_tokens)
    if step.response is None:
        print(f"ABSTAIN (phi_mean={step.phi_mean:.4f} < {args.gate_threshold:.4f})")
    else:
        print(f"Response: {step.response}")
    print(f"Phi mean: {step.phi_mean:.4f} ({step.confidence})")
    for key, value in (step.components or {}).items():
        print(f" {key}: {value:.4f}")
    return 0


def cmd_readout(args: argparse.Namespace) -> int:
    from carl_assets import storage
    from carl_assets.models.loading import load_model_and_tokenizer
    from carl_assets.steering import MANIFEST_FILE, load_readout
    from carl_assets.steering.readout import SERVING_READ, readout_projections

    current = storage.carl_home() / "artifacts" / "steering_vectors" / "current"
    folder = Path(args.vectors) if args.vectors else current
    if not (folder / MANIFEST_FILE).is_file():
        raise UsageError(f"no readout at {folder}: materialize steering_vectors or pass --vectors")
    vectors = load_readout(folder)
    model_path = args.model or json.loads((folder / MANIFEST_FILE).read_text()).get("model")
    if not model_path:
        raise UsageError("the manifest names no model: pass --model")
    layer = vectors.layers[-1] if args.layer is None else args.layer
    if layer not in vectors.layers:
        raise UsageError(f"layer {layer} is not a readout layer (layers: {vectors.layers})")
    model, tokenizer = load_model_and_tokenizer(model_path, allow_pickle=args.allow_pickle)
    frame = readout_projections(model, tokenizer, args.text, vectors, SERVING_READ)
    frame = frame[frame["layer"] == layer]
    calibrated = bool(frame["calibrated"].notna().any())
    for index, text in enumerate(args.text):
        rows = frame[frame["text_index"] == index].sort_values("calibrated" if calibrated else "projection",
                                                                ascending=False)
        print(f"{text[:70]!r} (layer {layer}; calibrated: 0 = a typical negative, 1 = a typical positive):")
        for row in rows.itertuples(index=False):
            print(f"  {row.emotion:<16}projection {row.projection:+.4f}   calibrated {row.calibrated:+.3f}")
    return 0


def cmd_sft_rank(args: argparse.Namespace) -> int:
    from carl_assets.carl.distributed import config_from_json, run_sft

    try:
        config = config_from_json(args.config)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    every = {} if args.log_every is None else {"log_every": args.log_every}
    run_sft(args.model, args.dataset, args.output, config, launcher=args.launcher, **every)
    return 0
