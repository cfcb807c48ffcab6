"""Loading the reference implementation the tests and benchmarks compare against.

`steering-vectors` pins transformers<5, so it is installed with `--no-deps`; it imports scikit-learn at
module level only for aggregators not used here. A placeholder stands in for sklearn while it
imports and is removed right after, so nothing else needs installing.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable


def import_train_steering_vector() -> Callable:
    """`steering_vectors.train_steering_vector`, importable without scikit-learn."""
    import transformers  # noqa: F401  (import torch/transformers first: they probe installed modules)

    if "steering_vectors" in sys.modules:
        return sys.modules["steering_vectors"].train_steering_vector
    placeholders: dict[str, types.ModuleType] = {}
    try:
        import sklearn.linear_model  # noqa: F401
    except ImportError:
        sk, lm = types.ModuleType("sklearn"), types.ModuleType("sklearn.linear_model")
        lm.LinearRegression = type("LinearRegression", (), {})
        lm.LogisticRegression = type("LogisticRegression", (), {})
        sk.linear_model = lm
        placeholders = {"sklearn": sk, "sklearn.linear_model": lm}
        sys.modules.update(placeholders)
    try:
        from steering_vectors import train_steering_vector
    finally:
        for name in placeholders:
            sys.modules.pop(name, None)
    return train_steering_vector
