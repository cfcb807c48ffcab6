"""Shared test fixtures: offline settings and a tiny random Llama with its own tokenizer."""

from __future__ import annotations

import os

# Nothing is fetched from a model hub in the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402

# Hypothesis: the `ci` profile (the default, and always when $CI is set) is derandomized, with no example
# database: every run draws the same examples, so a test cannot fail at random. HYPOTHESIS_PROFILE=dev
# explores new random examples locally.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
hypothesis_settings.register_profile("dev", derandomize=False)
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tiny models gain nothing from intra-op threads, and on a busy 2-core box two OpenMP threads spin
# for several times the CPU time. CARL_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("CARL_TEST_THREADS", "1")))

_SUBJECTS = ["I", "We", "She", "My friend", "The team", "Nobody"]
_VERBS = ["felt", "noticed", "remembered", "wrote about", "argued over", "laughed at"]
_OBJECTS = ["the quiet morning", "a long meeting", "the broken build", "an old letter", "the warm kitchen",
            "a hard conversation", "the garden after rain", "the deadline"]
_ENDINGS = ["and it was good.", "and I was tired.", "which made me angry.", "with real warmth.",
            "and everything felt clear.", "but nothing changed."]

# Deterministic, varied sentences (different lengths) to train tiny tokenizers on.
TINY_TEXTS = [
    f"{_SUBJECTS[i % 6]} {_VERBS[(i * 5) % 6]} {_OBJECTS[(i * 3) % 8]} {_ENDINGS[(i * 7) % 6]}"
    + (" Later " + _OBJECTS[(i + 2) % 8] + " " + _ENDINGS[i % 6] if i % 3 == 0 else "")
    for i in range(96)
]


@pytest.fixture(scope="session")
def tiny_texts() -> list[str]:
    return list(TINY_TEXTS)


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer():
    """A random 2-layer Llama (hidden 32, about 30k parameters) and a byte-level BPE tokenizer with
    pad/bos/eos and a chat template. Session-scoped: do not train it in place (deepcopy first)."""
    from carl_assets.models.loading import build_tiny_model

    return build_tiny_model(TINY_TEXTS, hidden_size=32, num_layers=2, num_heads=2, vocab_size=512, seed=0)
