"""The `carl` console script.

    carl phi --logits-file logits.npy
    carl reward --logits-file logits.npy --token-ids-file ids.npy
    carl gate-check --phi 0.85
    carl constants
    carl train --method sft|grpo --model ID_OR_PATH --dataset FILE_OR_NAME --output DIR --max-steps N
    carl agent --model PATH --task "Click the submit button" [--observation TEXT]
    carl materialize [--select SEL] ...      (the asset graph, headless)
    carl lineage [ASSET] ...

`phi`, `reward`, `gate-check` and `constants` print the same figures as the seed's script. Bad input
(a missing file, wrong shapes, ids outside the vocabulary, NaN or +inf logits — named by position;
-inf is an impossible token and fine —, a NaN or infinite number for a flag, unknown flags or
commands) gives a one-line error on stderr and exit status 2 (1 for a failure while running); set
``CARL_DEBUG=1`` to see the traceback instead. `train` and `agent` refuse a model folder holding only
pickle weights unless `--allow-pickle` is given, and run no remote code unless `--trust-remote-code`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from carl_assets.carl import (
    DEFECT_THRESHOLD,
    KAPPA,
    KAPPA_SIGMA,
    SIGMA,
    carl_reward,
    coherence_gate,
    compute_phi,
    t_star,
)

PIPELINE_COMMANDS = ("materialize", "lineage")


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the usage block and exit
        command = self.prog.removeprefix("carl").strip()
        raise UsageError(f"{command}: {message}" if command else message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="carl", description="Coherence-Aware Reinforcement Learning (CARL).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    phi = sub.add_parser("phi", help="order parameter Phi of a [T, V] logits .npy file")
    phi.add_argument("--logits-file", required=True)

    reward = sub.add_parser("reward", help="CARL composite reward of logits [T, V] and token ids [T]")
    reward.add_argument("--logits-file", required=True)
    reward.add_argument("--token-ids-file", required=True)

    gate = sub.add_parser("gate-check", help="coherence gate: act or abstain at this Phi")
    gate.add_argument("--phi", required=True, type=_finite_float)
    gate.add_argument("--threshold", type=_finite_float, default=SIGMA, help="abstain below this Phi (default sigma)")

    sub.add_parser("constants", help="kappa, sigma and T*(d)")

    train = sub.add_parser("train", help="SFT until crystallization, or GRPO on the CARL reward")
    train.add_argument("--method", choices=("sft", "grpo"), default="grpo")
    train.add_argument("--model", required=True, help="hub id or local folder (e.g. the base_model asset's)")
    train.add_argument("--dataset", required=True,
                       help="a local .jsonl/.json/.parquet file or a Hugging Face dataset name")
    train.add_argument("--output", default="carl-output")
    train.add_argument("--max-steps", type=_positive_int, default=300)
    train.add_argument("--gate-accuracy", type=_finite_float, default=None,
                       help="SFT: stop when 3 of the last 5 logged token accuracies reach this (default 0.99)")
    train.add_argument("--threads", type=_positive_int, default=None,
                       help="torch CPU threads while training (default: torch's; 1 is fastest for tiny models)")
    train.add_argument("--trust-remote-code", action="store_true")
    _placement_flags(train)
    train.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                       help="recompute activations (default: on for a real model, off for the offline one)")
    train.add_argument("--lr", type=_finite_float, default=None, help="peak learning rate (default: the model's: "
                       "SFT 2e-5 / GRPO 1e-6 for a real model, 1.5e-3 / 1e-4 for the offline one)")
    train.add_argument("--lr-scheduler", default=None, help="transformers schedule: constant, linear, cosine, ...")
    train.add_argument("--warmup-ratio", type=_finite_float, default=None, help="share of steps warming up, [0, 1)")
    train.add_argument("--batch-size", type=_positive_int, default=None, help="examples (SFT) or completions "
                       "(GRPO) per device step")
    train.add_argument("--grad-accum", type=_positive_int, default=None, help="batches per optimizer step")
    train.add_argument("--num-generations", type=_positive_int, default=None, help="GRPO: completions per prompt")
    train.add_argument("--max-completion-length", type=_positive_int, default=None, help="GRPO: tokens per completion")
    train.add_argument("--allow-pickle", action="store_true",
                       help="load a model whose weights are pickles (.bin/.pt/.pkl): they can run code")

    agent = sub.add_parser("agent", help="one coherence-gated agent step")
    agent.add_argument("--model", required=True, help="hub id or local folder")
    agent.add_argument("--task", required=True, help="the instruction")
    agent.add_argument("--observation", default="", help="what the agent sees")
    agent.add_argument("--gate-threshold", type=_finite_float, default=SIGMA)
    agent.add_argument("--max-new-tokens", type=_positive_int, default=128)
    agent.add_argument("--trust-remote-code", action="store_true")
    _placement_flags(agent)
    agent.add_argument("--allow-pickle", action="store_true",
                       help="load a model whose weights are pickles (.bin/.pt/.pkl): they can run code")

    readout = sub.add_parser("readout", help="a text's emotion projections on the amygdala readout vectors")
    readout.add_argument("--text", action="append", required=True, help="a text to read (repeat for several)")
    readout.add_argument("--vectors", default=None, help="readout folder (default: the current "
                         "$CARL_HOME/artifacts/steering_vectors)")
    readout.add_argument("--model", default=None, help="model to run (default: the one the vectors were made "
                         "on, from the manifest)")
    readout.add_argument("--layer", type=int, default=None, help="readout layer (default: the deepest)")
    readout.add_argument("--allow-pickle", action="store_true",
                         help="load a model whose weights are pickles (.bin/.pt/.pkl): they can run code")

    for name, text in (("materialize", "materialize the asset graph headless"),
                       ("lineage", "the asset graph with data versions and staleness")):
        sub.add_parser(name, help=f"{text} (see `carl {name} --help`)", add_help=False)
    return parser


def _placement_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on a CUDA device that has it, else fp32; fp32 "
                        "for the offline model), bf16, fp16 or fp32")


def _placement(args: argparse.Namespace, purpose: str = "inference") -> tuple[bool, Any, Any]:
    """(offline model?, device, dtype) for `--model`, `--device` and `--dtype` (models.defaults.resolve_placement)."""
    from carl_assets.models.defaults import is_offline_model, resolve_placement

    offline = Path(args.model).is_dir() and is_offline_model(args.model)
    return (offline, *resolve_placement(args.device, args.dtype, offline, purpose))


def _finite_float(text: str) -> float:
    """A float that is a number: "nan" or "inf" would pass every gate comparison silently."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _load_array(path: str, what: str) -> np.ndarray:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{what} file not found: {path}")
    try:
        array = np.load(file, allow_pickle=False)
    except Exception as exc:  # not an .npy file, truncated, pickled objects...
        raise UsageError(f"cannot read {what} file {path} as a .npy array ({exc})") from None
    if not isinstance(array, np.ndarray):
        raise UsageError(f"{what} file {path} holds several arrays (.npz); save one array with np.save")
    return array


def _load_logits(path: str) -> np.ndarray:
    from carl_assets.carl.coherence import _check_logits

    try:  # one set of rules for logits, the library's; here they are the user's input errors
        return _check_logits(_load_array(path, "logits"))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_phi(args: argparse.Namespace) -> int:
    logits = _load_logits(args.logits_file)
    phi, _, entropy = compute_phi(logits)
    empty = phi.size == 0  # CARL's convention for an empty sequence: statistics 0.0, not NaN
    print(f"Phi: mean={0.0 if empty else np.mean(phi):.4f} std={0.0 if empty else np.std(phi):.4f}")
    print(f"Entropy: mean={0.0 if empty else np.mean(entropy):.4f}")
    print(f"T*: {t_star(logits.shape[1])} (for V={logits.shape[1]})")
    return 0


def cmd_reward(args: argparse.Namespace) -> int:
    logits = _load_logits(args.logits_file)
    ids = _load_array(args.token_ids_file, "token ids")
    try:
        score, components = carl_reward(logits, ids)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"CARL reward: {score:.4f}")
    for key, value in components.items():
        print(f" {key}: {value:.4f}")
    return 0


def cmd_gate_check(args: argparse.Namespace) -> int:
    should_act, confidence = coherence_gate(args.phi, args.threshold)
    print(f"Phi={args.phi:.4f} → {'ACT' if should_act else 'ABSTAIN'} ({confidence})")
    return 0


def cmd_constants(args: argparse.Namespace) -> int:
    print(f"kappa = {KAPPA}")
    print(f"sigma = {SIGMA}")
    print(f"kappa*sigma = {KAPPA_SIGMA}")
    print(f"defect_threshold = {DEFECT_THRESHOLD}")
    for d in (384, 512, 768, 1024, 3072, 4096):
        third = d / 3
        triadic = "triadic" if third == int(third) and math.log2(third) == int(math.log2(third)) else ""
        print(f" T*({d:5d}) = {t_star(d):>7d} {triadic}")
    return 0


def _config(cls: Any, **values: Any) -> Any:
    """Build a run-config dataclass from the values it has fields for (None means: keep its default)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return cls(**{k: v for k, v in values.items() if k in names and v is not None})


def cmd_train(args: argparse.Namespace) -> int:
    import importlib

    from carl_assets.models.loading import load_model_and_tokenizer

    training = importlib.import_module("carl_assets.carl.training")

    print(f"CARL train: {args.model} → {args.output}")
    print(f" method={args.method} steps={args.max_steps}")
    print(f" kappa={KAPPA:.4f} sigma={SIGMA:.4f} kappa*sigma={KAPPA_SIGMA}")
    from carl_assets.models.defaults import training_defaults
    from carl_assets.models.device import dtype_name, training_weights_dtype

    offline, device, dtype = _placement(args, "training")
    defaults = getattr(training_defaults(offline), args.method)
    dataset = training.load_training_dataset(args.dataset)
    model, tokenizer = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code,
                                                allow_pickle=args.allow_pickle, device=device,
                                                dtype=training_weights_dtype(dtype))
    # Each flag left out takes this model's default (a real model's, or the offline model's tuned one).
    shared = {
        "device": str(device), "dtype": dtype_name(dtype),
        "learning_rate": args.lr if args.lr is not None else defaults.learning_rate,
        "lr_scheduler_type": args.lr_scheduler or defaults.lr_scheduler_type,
        "warmup_ratio": args.warmup_ratio if args.warmup_ratio is not None else defaults.warmup_ratio,
        "batch_size": args.batch_size or defaults.batch_size,
        "gradient_accumulation_steps": args.grad_accum or defaults.gradient_accumulation_steps,
        "gradient_checkpointing": defaults.gradient_checkpointing if args.gradient_checkpointing is None
        else args.gradient_checkpointing,
    }
    print(f" device={shared['device']} dtype={shared['dtype']} lr={shared['learning_rate']:.2e} "
          f"({shared['lr_scheduler_type']}) batch={shared['batch_size']}x{shared['gradient_accumulation_steps']}")
    if args.method == "sft":
        config = _config(training.SFTRunConfig, max_steps=args.max_steps, gate_threshold=args.gate_accuracy,
                         threads=args.threads, **shared)
        outcome = training.train_sft(model, tokenizer, dataset, args.output, config)
        if _get(outcome, "triggered"):
            print(f" Crystallized at step {_get(outcome, 'trigger_step')} "
                  f"(window {[round(v, 4) for v in _get(outcome, 'window_values') or []]})")
        else:
            print(f" Did not crystallize within {args.max_steps} steps")
        peak = _get(outcome, "peak_entropy")
        if peak is not None:
            print(f" Peak entropy: {peak:.4f} at step {_get(outcome, 'peak_entropy_step')}")
    else:
        generations = args.num_generations or defaults.num_generations
        if not args.batch_size:  # the default batch holds whole groups
            shared["batch_size"] = -(-max(defaults.batch_size, generations) // generations) * generations
        config = _config(training.GRPORunConfig, max_steps=args.max_steps, threads=args.threads, **shared,
                         num_generations=generations,
                         max_completion_length=args.max_completion_length or defaults.max_completion_length)
        outcome = training.train_grpo(model, tokenizer, dataset, args.output, config)
        rewards = list(_get(outcome, "rewards") or [])
        if rewards:
            print(f" CARL reward: first step {rewards[0]:.4f}, last step {rewards[-1]:.4f} ({len(rewards)} steps)")
    print(f" Done. Model at: {args.output}")
    return 0


def _get(outcome: Any, name: str) -> Any:
    return outcome.get(name) if isinstance(outcome, dict) else getattr(outcome, name, None)


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
    import json

    from carl_assets import storage
    from carl_assets.models.loading import load_model_and_tokenizer
    from carl_assets.steering import MANIFEST_FILE, load_readout
    from carl_assets.steering.readout import readout_projections

    folder = Path(args.vectors) if args.vectors else storage.carl_home() / "artifacts" / "steering_vectors" / "current"
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
    frame = readout_projections(model, tokenizer, args.text, vectors)
    frame = frame[frame["layer"] == layer]
    calibrated = bool(frame["calibrated"].notna().any())
    for index, text in enumerate(args.text):
        rows = frame[frame["text_index"] == index].sort_values("calibrated" if calibrated else "projection",
                                                                ascending=False)
        print(f"{text[:70]!r} (layer {layer}; calibrated: 0 = a typical negative, 1 = a typical positive):")
        for row in rows.itertuples(index=False):
            print(f"  {row.emotion:<16}projection {row.projection:+.4f}   calibrated {row.calibrated:+.3f}")
    return 0


COMMANDS = {
    "phi": cmd_phi,
    "reward": cmd_reward,
    "gate-check": cmd_gate_check,
    "constants": cmd_constants,
    "train": cmd_train,
    "agent": cmd_agent,
    "readout": cmd_readout,
}


def _run_pipeline(command: str, rest: list[str]) -> int:
    from carl_assets.defs import pipeline_cli

    try:
        return int(pipeline_cli.main([command, *rest]) or 0)
    except SystemExit as exc:  # its argparse exits on --help or bad flags
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `carl` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv:
        parser.print_help()
        return 0
    try:
        if argv[0] in PIPELINE_COMMANDS:
            return _run_pipeline(argv[0], argv[1:])
        args = parser.parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        return _fail(f"carl: error: {exc}", 2)
    except KeyboardInterrupt:
        return _fail("carl: interrupted", 130)
    except Exception as exc:  # a failure while running: one line, unless debugging
        if os.environ.get("CARL_DEBUG"):
            raise
        return _fail(f"carl: error: {type(exc).__name__}: {exc}", 1)


def _fail(message: str, status: int) -> int:
    print(" ".join(message.split()), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
