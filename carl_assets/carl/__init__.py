"""CARL: the order parameter, the coherence rewards and gates, and the training built on them.

- `coherence`: constants, the numpy maths with the reference's semantics, the gates (no torch import).
- `batch`: the same rewards over a right-padded torch batch, and from per-token statistics.
- `reward_fn`: the TRL GRPO reward function that re-scores completions under the policy.
- `sft_data`, `training`, `agent`: templated SFT data, TRL SFT/GRPO runs, the gated agent step.

The public names of the first three are importable from here (`from carl_assets.carl import
carl_reward_batch`); the torch ones load on first access, so `import carl_assets.carl` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from carl_assets.carl.coherence import (
    COMPONENT_KEYS,
    DEFECT_THRESHOLD,
    KAPPA,
    KAPPA_SIGMA,
    MAX_SCALES,
    SIGMA,
    WEIGHTS,
    carl_reward,
    cloud_quality,
    coherence_gate,
    compute_phi,
    discontinuity_score,
    multiscale_coherence,
    t_star,
)

__all__ = [
    "COMPONENT_KEYS", "DEFECT_THRESHOLD", "KAPPA", "KAPPA_SIGMA", "MAX_SCALES", "SIGMA", "WEIGHTS",
    "carl_reward", "cloud_quality", "coherence_gate", "compute_phi", "discontinuity_score",
    "multiscale_coherence", "t_star", "PhaseTransitionGate", "carl_reward_batch", "carl_reward_from_stats",
    "token_stats_from_hidden", "token_stats_from_logits", "make_carl_reward_fn", "score_completions",
]

# Looked up in this order on first access of a name not imported above.
_LAZY_MODULES = (
    "carl_assets.carl.coherence",
    "carl_assets.carl.crystallization_gate",
    "carl_assets.carl.batch",
    "carl_assets.carl.reward_fn",
)


def __getattr__(name: str) -> Any:  # PEP 562
    if name.startswith("__"):
        raise AttributeError(name)
    for module_name in _LAZY_MODULES:
        module = importlib.import_module(module_name)
        try:
            value = getattr(module, name)
        except AttributeError:
            continue
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
