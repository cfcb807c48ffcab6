"""CARL — Coherence-Aware Reinforcement Learning: the order parameter, the rewards and the gates.

The order parameter of a next-token distribution P over a vocabulary of size V is

    Phi = 1 - H(P) / log V        (0 = uniform, "chaos"; 1 = a delta, "crystal")

and three reward signals are read from the Phi sequence of a completion:

1. multiscale coherence: is Phi consistent within dyadic blocks at every scale?
2. cloud quality: is the selected token both likely and drawn from a peaked distribution?
3. discontinuity: do the jumps in Phi (|dPhi| > 0.03) go from exploration to commitment?

    R = 0.5 * multiscale + 0.3 * cloud_quality + 0.2 * discontinuity

Three implementations compute the same numbers:

- `carl_reward(logits, token_ids)`: numpy, one sequence, the reference's semantics exactly (population
  std, trimmed blocks, ``min(floor(log2 T) + 1, 16)`` scales, the thresholds, the 0.5 defaults).
- `carl_reward_batch(logits, token_ids, attention_mask)`: torch, a right-padded ``[B, T, V]`` batch,
  vectorised over tokens (a loop over at most 16 scales only).
- `carl_reward_from_stats(entropy, selected_logprob, attention_mask, vocab_size)`: from per-token
  entropy and log P(selected token) only, which `token_stats_from_hidden` computes by running the LM
  head over tiles of positions x vocabulary with an online log-sum-exp, so memory grows with B*T and
  no ``[B, T, V]`` tensor is ever held. This is the path `make_carl_reward_fn` uses inside TRL's GRPO.
  It uses the exact entropy ``-sum p log p``; the reference's ``log(p + 1e-10)`` moves Phi by at most
  ``V * 1e-10 / log V`` (3e-7 at V = 32k).

Sequence-level maths in torch runs in float64, so threshold comparisons (|dPhi| > 0.03, Phi < 0.5,
Phi > 0.7) agree with numpy; with float32 logits the per-token Phi carries float32 rounding (~1e-7).

Empty sequences (T = 0): the reference's per-component defaults apply (multiscale 0.5, cloud quality 0.0,
discontinuity 0.5, so R = 0.35), and phi_mean / phi_std / entropy_mean are reported as 0.0 rather
than the NaN of a mean over nothing — the reference's agent step also treats an empty completion as
phi_mean = 0.0, which the coherence gate turns into an abstention.

The gates: `coherence_gate` (act only when Phi >= sigma) here, and `PhaseTransitionGate` (a transformers
callback that stops SFT once token accuracy crystallizes, with this module's GATE_* defaults) in
`carl_assets.carl.crystallization_gate`.

This module holds the constants, the numpy maths and the coherence gate. The batched torch paths live in
`carl_assets.carl.batch` and the GRPO reward function in `carl_assets.carl.reward_fn`; the package
`carl_assets.carl` re-exports all three (the torch ones on first access), so importing it imports
neither torch nor transformers.
"""

from __future__ import annotations

import math

import numpy as np

# ============================================================================================
# Constants — the conservation law T* = kappa * d, with kappa * sigma = 4
# ============================================================================================

KAPPA = 64 / 3  # 21.333... conservation constant
SIGMA = 3 / 16  # 0.1875: the semantic quantum (minimum meaningful signal)
KAPPA_SIGMA = 4.0  # bits per embedding dimension (exact)
DEFECT_THRESHOLD = 0.03  # minimum |delta Phi| for a discontinuity event
# The crystallization gate (the reference's phase-transition detector): fires when GATE_MIN_ABOVE of the last
# GATE_WINDOW logged token accuracies reach GATE_THRESHOLD (SFTRunConfig's defaults are these).
GATE_THRESHOLD = 0.99
GATE_WINDOW = 5
GATE_MIN_ABOVE = 3

WEIGHTS = {"multiscale": 0.5, "cloud_quality": 0.3, "discontinuity": 0.2}
MAX_SCALES = 16
_ENTROPY_EPS = 1e-10  # the reference's log(p + 1e-10); kept everywhere so all paths agree
COMPONENT_KEYS = ("multiscale", "cloud_quality", "discontinuity", "phi_mean", "phi_std", "entropy_mean")


def t_star(d: int) -> int:
    """Natural decompression boundary for embedding dimension d: ``int(KAPPA * d)``.

    Triadic dimensions (d = 3 * 2^k) give a power of two: T*(384) = 8192, T*(768) = 16384,
    T*(3072) = 65536.
    """
    return int(KAPPA * d)


# ============================================================================================
# numpy, one sequence — the reference's semantics
# ============================================================================================


def _check_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D [T, V], got shape {logits.shape}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    if logits.shape[1] < 2:
        raise ValueError(f"the vocabulary needs at least 2 entries (log V > 0), got V={logits.shape[1]}")
    # -inf is a legitimate logit (a masked, impossible token); NaN and +inf are not
    bad = np.isnan(logits) | np.isposinf(logits)
    if bad.any():
        t, v = divmod(int(np.flatnonzero(bad)[0]), logits.shape[1])
        raise ValueError(
            f"logits[{t}, {v}] is {logits[t, v]}: logits must be finite or -inf "
            f"({int(bad.sum())} NaN/+inf values in all)"
        )
    if logits.shape[0]:
        dead = ~np.isfinite(logits.max(axis=-1))
        if dead.any():
            raise ValueError(
                f"row {int(np.flatnonzero(dead)[0])} of the logits is entirely -inf: no token is possible"
            )
    return logits


def _check_phi(phi: np.ndarray) -> np.ndarray:
    """Phi must be finite: NaN compares false everywhere, so it would pass every threshold silently
    (``min(1.0, nan)`` is 1.0)."""
    phi = np.asarray(phi)
    if not np.issubdtype(phi.dtype, np.floating):
        phi = phi.astype(np.float64)
    if phi.ndim != 1:
        raise ValueError(f"phi must be 1-D [T], got shape {phi.shape}")
    bad = ~np.isfinite(phi)
    if bad.any():
        t = int(np.flatnonzero(bad)[0])
        raise ValueError(f"phi[{t}] is {phi[t]}: Phi must be finite")
    return phi


def _check_token_ids(token_ids: np.ndarray, length: int, vocab_size: int) -> np.ndarray:
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 1:
        raise ValueError(f"token_ids must be 1-D [T], got shape {token_ids.shape}")
    if token_ids.size and not np.issubdtype(token_ids.dtype, np.integer):
        raise ValueError(f"token_ids must be integers, got dtype {token_ids.dtype}")
    if len(token_ids) < length:
        raise ValueError(f"token_ids has {len(token_ids)} entries but logits have {length} positions")
    used = token_ids[:length]
    if used.size and (used.min() < 0 or used.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got range [{used.min()}, {used.max()}]")
    return used.astype(np.int64, copy=False)


def compute_phi(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order parameter from logits ``[T, V]``: returns ``(phi, probs, entropy)``, shapes [T], [T, V], [T].

    ``Phi_t = 1 - H(P_t) / log V`` with ``H = -sum p log(p + 1e-10)`` (the reference's epsilon), computed in
    the logits' dtype. A -inf logit is an impossible token (probability 0, as in masked decoding); NaN
    or +inf anywhere, or a row entirely -inf, raises ``ValueError`` naming the first such position.
    """
    logits = _check_logits(logits)
    log_vocab = math.log(logits.shape[1])
    shifted = logits - logits.max(axis=-1, keepdims=True)  # stable softmax
    exp = np.exp(shifted)
    probs = exp / exp.sum(axis=-1, keepdims=True)
    entropy = -np.sum(probs * np.log(probs + _ENTROPY_EPS), axis=-1)
    phi = 1.0 - entropy / log_vocab
    return phi, probs, entropy


def _num_scales(length: int) -> int:
    """The reference's ``min(int(log2 T) + 1, 16)``; with exact integer log2 (bit length)."""
    return min(int(length).bit_length(), MAX_SCALES) if length >= 1 else 0


def multiscale_coherence(phi: np.ndarray) -> float:
    """Is Phi consistent across dyadic block scales?

    Scale j cuts Phi into ``T // 2^j`` whole blocks of 2^j (the tail is trimmed) and scores
    ``clip(1 - mean(population std within blocks), 0, 1)``; scales j = 0 .. min(floor(log2 T), 15) are
    averaged with weights ``2^(j/2)``. Fewer than 2 tokens: 0.5. Non-finite Phi raises ``ValueError``.
    """
    phi = _check_phi(phi)
    length = len(phi)
    if length < 2:
        return 0.5
    total_weight = 0.0
    weighted_sum = 0.0
    for j in range(_num_scales(length)):
        block = 2**j
        n_blocks = length // block
        blocks = phi[: n_blocks * block].reshape(n_blocks, block)
        coherence = max(0.0, min(1.0, 1.0 - float(np.mean(np.std(blocks, axis=1)))))
        weight = 2 ** (j / 2)
        weighted_sum += weight * coherence
        total_weight += weight
    return weighted_sum / total_weight


def cloud_quality(phi: np.ndarray, probs: np.ndarray, token_ids: np.ndarray) -> float:
    """``mean(P(selected token) * Phi)``: confident correctness, not lucky correctness. Empty: 0.0.
    Non-finite Phi or probabilities raise ``ValueError``."""
    phi = _check_phi(phi)
    length = len(phi)
    if length == 0:
        return 0.0
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[0] < length:
        raise ValueError(f"probs must be [T, V] with T >= {length}, got shape {probs.shape}")
    ids = _check_token_ids(token_ids, length, probs.shape[1])
    selected = probs[np.arange(length), ids]
    if not np.isfinite(selected).all():
        t = int(np.flatnonzero(~np.isfinite(selected))[0])
        raise ValueError(f"probs[{t}, {ids[t]}] is {selected[t]}: probabilities must be finite")
    return float(np.mean(selected * phi))


def discontinuity_score(phi: np.ndarray) -> float:
    """Do jumps in Phi happen at the right places?

    Each ``|dPhi| > 0.03`` is an event. A rise (commitment) scores 0.8 from Phi < 0.5, else 0.3; a fall
    (dissolution) scores 0.2 from Phi > 0.7, else 0.5. The mean over events; 0.5 with no events or
    fewer than 2 tokens. Non-finite Phi raises ``ValueError``.
    """
    phi = _check_phi(phi)
    if len(phi) < 2:
        return 0.5
    delta = np.diff(phi)
    prev = phi[:-1]
    event = np.abs(delta) > DEFECT_THRESHOLD
    if not event.any():
        return 0.5
    commit = delta > DEFECT_THRESHOLD
    scores = np.where(commit, np.where(prev < 0.5, 0.8, 0.3), np.where(prev > 0.7, 0.2, 0.5))
    return float(scores[event].mean())


def carl_reward(logits: np.ndarray, token_ids: np.ndarray) -> tuple[float, dict[str, float]]:
    """CARL composite reward of one sequence: ``logits[t]`` is the distribution that produced
    ``token_ids[t]``.

    ``R = 0.5 * multiscale + 0.3 * cloud_quality + 0.2 * discontinuity``; returns ``(R, components)``
    with components multiscale, cloud_quality, discontinuity, phi_mean, phi_std (population),
    entropy_mean. Raises ``ValueError`` on bad shapes, ids outside the vocabulary, and NaN / +inf logits
    or a row entirely -inf (naming the first such position); a -inf logit is an impossible token.
    """
    logits = _check_logits(logits)
    _check_token_ids(token_ids, logits.shape[0], logits.shape[1])
    phi, probs, entropy = compute_phi(logits)
    ms = multiscale_coherence(phi)
    cq = cloud_quality(phi, probs, token_ids)
    ds = discontinuity_score(phi)
    composite = WEIGHTS["multiscale"] * ms + WEIGHTS["cloud_quality"] * cq + WEIGHTS["discontinuity"] * ds
    empty = len(phi) == 0
    return float(composite), {
        "multiscale": float(ms),
        "cloud_quality": float(cq),
        "discontinuity": float(ds),
        "phi_mean": 0.0 if empty else float(np.mean(phi)),
        "phi_std": 0.0 if empty else float(np.std(phi)),
        "entropy_mean": 0.0 if empty else float(np.mean(entropy)),
    }


# ============================================================================================
# Gates
# ============================================================================================


def coherence_gate(phi_mean: float, threshold: float = SIGMA) -> tuple[bool, str]:
    """Should the agent act? Returns ``(should_act, level)``: high >= 0.8, medium >= 0.5, low >= threshold,
    otherwise abstain (Phi below sigma is sub-semantic noise). NaN abstains."""
    if phi_mean >= 0.8:
        return True, "high"
    if phi_mean >= 0.5:
        return True, "medium"
    if phi_mean >= threshold:
        return True, "low"
    return False, "abstain"
