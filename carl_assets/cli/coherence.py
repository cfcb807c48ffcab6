"""`carl phi`, `carl reward`, `carl gate-check`, `carl constants`: the coherence figures of carl_assets.carl
on arrays saved with `np.save`, printed as the reference script prints them."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

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
from carl_assets.carl.coherence import _check_logits as check_logits  # the library's one set of rules
from carl_assets.cli.arguments import UsageError, finite_float


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the four coherence commands on `carl`'s subparsers."""
    phi = sub.add_parser("phi", help="order parameter Phi of a [T, V] logits .npy file")
    phi.add_argument("--logits-file", required=True)
    phi.set_defaults(run=cmd_phi)

    reward = sub.add_parser("reward", help="CARL composite reward of logits [T, V] and token ids [T]")
    reward.add_argument("--logits-file", required=True)
    reward.add_argument("--token-ids-file", required=True)
    reward.set_defaults(run=cmd_reward)

    gate = sub.add_parser("gate-check", help="coherence gate: act or abstain at this Phi")
    gate.add_argument("--phi", required=True, type=finite_float)
    gate.add_argument("--threshold", type=finite_float, default=SIGMA,
                      help="abstain below this Phi (default sigma)")
    gate.set_defaults(run=cmd_gate_check)

    sub.add_parser("constants", help="kappa, sigma and T*(d)").set_defaults(run=cmd_constants)


def load_array(path: str, what: str) -> np.ndarray:
    """One array from a .npy file; `UsageError` naming the file if it is missing, unreadable or an .npz."""
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


def load_logits(path: str) -> np.ndarray:
    """Logits [T, V] checked by the library's own rules; here a broken file is the user's input error."""
    try:
        return check_logits(load_array(path, "logits"))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_phi(args: argparse.Namespace) -> int:
    logits = load_logits(args.logits_file)
    phi, _, entropy = compute_phi(logits)
    empty = phi.size == 0  # CARL's convention for an empty sequence: statistics 0.0, not NaN
    print(f"Phi: mean={0.0 if empty else np.mean(phi):.4f} std={0.0 if empty else np.std(phi):.4f}")
    print(f"Entropy: mean={0.0 if empty else np.mean(entropy):.4f}")
    print(f"T*: {t_star(logits.shape[1])} (for V={logits.shape[1]})")
    return 0


def cmd_reward(args: argparse.Namespace) -> int:
    logits = load_logits(args.logits_file)
    ids = load_array(args.token_ids_file, "token ids")
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
