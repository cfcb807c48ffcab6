"""The lexicon tagger: emotion scores from word counts in the Empath lexicon.

Empath (Fast, Chen and Bernstein, "Empath: Understanding Topic Signals in Large-Scale Text", CHI 2016;
the `empath` package, MIT licence) ships 194 word categories built from word embeddings and checked
by crowd workers; its lexicon is a file inside the package, so scoring needs no download. It was
chosen over NRCLex because the NRC Emotion Lexicon is licensed for research only, covers 8 emotions
(not warmth, pride, love, confusion, tiredness, ...), and NRCLex tokenizes raw text with TextBlob,
which downloads NLTK corpora at run time.

Scoring rule (one emotion, one text):

- the text is lower-cased and split into words (runs of ASCII letters, `WORD`);
- a *hit* is a word found in any Empath category mapped to the emotion (`lexicon_categories`);
- rate = 100 * hits / words (hits per 100 words);
- score = min(10, floor(rate * 10 / SATURATION_RATE + 0.5)): linear in the rate, 10 at
  `SATURATION_RATE` hits per 100 words or more (one hit in a 50-word text scores 4, two score 8).

Emotions that no Empath category covers are not scored (`uncovered`): the tagger says nothing about
them rather than something made up.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

import numpy as np

from carl_assets.memory.graph import MAX_SCORE

WORD = re.compile(r"[a-z]+")
SATURATION_RATE = 5.0  # hits per 100 words that score MAX_SCORE

# Emotion name -> Empath categories, chosen by meaning before any measurement (not tuned on the sample
# graph). An emotion that is itself an Empath category maps to it unless listed here.
EMPATH_CATEGORIES: dict[str, tuple[str, ...]] = {
    "warmth": ("affection",),  # Empath's own `warmth` is physical heat (fireplace, humid, sauna)
    "anxiety": ("nervousness", "fear"),
    "worry": ("nervousness",),
    "hope": ("optimism",),
    "calm": ("contentment",),
    "frustration": ("exasperation", "irritability"),
    "tiredness": ("sleep",),
    "fatigue": ("sleep",),
    "loneliness": ("neglect",),
    "gratitude": ("politeness", "giving"),
    "awe": ("surprise", "beauty"),
    "excitement": ("zest", "anticipation"),
    "happiness": ("joy", "cheerfulness"),
    "guilt": ("shame",),
    "grief": ("sadness", "suffering"),
}


@lru_cache(maxsize=1)
def _empath_lexicon() -> dict[str, frozenset[str]]:
    """Empath's categories: name -> words (single words only; its few bigrams use `_`)."""
    try:
        from empath import Empath
    except ImportError as exc:  # a declared dependency; say what to install if it is missing
        raise ImportError("the lexicon tagger needs the `empath` package: pip install empath") from exc
    return {name: frozenset(w for w in words if "_" not in w) for name, words in Empath().cats.items()}


def empath_categories() -> list[str]:
    """The names of Empath's 194 categories, sorted."""
    return sorted(_empath_lexicon())


def lexicon_categories(emotions: Iterable[str],
                       extra: Mapping[str, Sequence[str]] | None = None) -> dict[str, tuple[str, ...]]:
    """The Empath categories scored for each emotion: `extra` (the caller's map) first, then
    `EMPATH_CATEGORIES`, then the category of the same name. Emotions without any are left out.

    Raises ValueError naming any category in `extra` that Empath does not have."""
    known = _empath_lexicon()
    extra = dict(extra or {})
    unknown = sorted({c for cats in extra.values() for c in cats if c not in known})
    if unknown:
        raise ValueError(f"lexicon categories {unknown} are not Empath categories; choose from "
                         f"{empath_categories()}")
    mapping: dict[str, tuple[str, ...]] = {}
    for emotion in emotions:
        cats = tuple(extra.get(emotion) or EMPATH_CATEGORIES.get(emotion) or
                     ((emotion,) if emotion in known else ()))
        if cats:
            mapping[emotion] = cats
    return mapping


def uncovered(emotions: Iterable[str], extra: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """The emotions the lexicon tagger cannot score (no Empath category)."""
    covered = lexicon_categories(emotions, extra)
    return [e for e in emotions if e not in covered]


def words(text: str) -> list[str]:
    """The words of a text as the lexicon sees them: lower-case runs of ASCII letters."""
    return WORD.findall(text.lower())


def rate_to_score(rate: float) -> int:
    """Hits per 100 words -> an integer score 0..10 (see the module docstring)."""
    return int(min(MAX_SCORE, math.floor(rate * MAX_SCORE / SATURATION_RATE + 0.5)))


def lexicon_rates(texts: Sequence[str], emotions: Sequence[str],
                  extra: Mapping[str, Sequence[str]] | None = None) -> tuple[np.ndarray, list[str]]:
    """Hits per 100 words, `[len(texts), len(scored)]` float64, and the `scored` emotions (those of
    `emotions` that some Empath category covers, in order). A text without words rates 0."""
    mapping = lexicon_categories(emotions, extra)
    scored = [e for e in emotions if e in mapping]
    lexicon = _empath_lexicon()
    vocab = [frozenset().union(*(lexicon[c] for c in mapping[e])) for e in scored]
    rates = np.zeros((len(texts), len(scored)), dtype=np.float64)
    for i, text in enumerate(texts):
        tokens = words(text)
        if not tokens:
            continue
        for j, terms in enumerate(vocab):
            rates[i, j] = 100.0 * sum(1 for t in tokens if t in terms) / len(tokens)
    return rates, scored
