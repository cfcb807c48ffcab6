"""Cross-talk: how close the emotion vectors are to each other, beside how often the tags co-occur.

The reference expects co-occurring emotions (warmth + love) to get close vectors, and asks only that we do
not pretend they are independent axes. This measures it: per layer the cosine matrix of the unit
vectors (symmetric, unit diagonal), the tags' co-occurrence over the nodes (the phi coefficient of
"the node is a positive for a" and "... for b", i.e. the correlation of the two indicators), and how
the two relate (Spearman rank correlation over the emotion pairs a < b).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from carl_assets.steering.manifest import SteeringVectors


def cosine_matrix(vectors: SteeringVectors, layer: int) -> np.ndarray:
    """`[E, E]` cosines between the concepts' vectors at `layer` (rows renormalised, so the diagonal is 1)."""
    if layer not in vectors.vectors:
        raise ValueError(f"layer {layer} has no vectors (layers: {vectors.layers})")
    rows = vectors.vectors[layer].double().numpy()
    unit = rows / np.clip(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30, None)
    cos = np.clip(unit @ unit.T, -1.0, 1.0)
    cos = (cos + cos.T) / 2.0  # exactly symmetric
    np.fill_diagonal(cos, 1.0)
    return cos


def tag_cooccurrence(
    tags: Sequence[Mapping[str, int]], emotions: Sequence[str], min_score: int
) -> np.ndarray:
    """`[E, E]` phi coefficients between "scored >= min_score" indicators over the tagged nodes (untagged
    nodes say nothing about emotions and are left out). 1 on the diagonal; 0 where an emotion never or
    always occurs (no variance)."""
    tagged = [t for t in tags if t]
    present = np.array([[t.get(e, -1) >= min_score for e in emotions] for t in tagged], dtype=np.float64)
    present = present.reshape(len(tagged), len(emotions))
    if len(tagged) < 2:
        out = np.zeros((len(emotions), len(emotions)))
    else:
        centred = present - present.mean(axis=0)
        std = centred.std(axis=0)
        cov = centred.T @ centred / len(tagged)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(np.outer(std, std) > 0, cov / np.outer(std, std), 0.0)
    np.fill_diagonal(out, 1.0)
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    rank_a, rank_b = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    return float(np.corrcoef(rank_a, rank_b)[0, 1])


def cross_talk(
    vectors: SteeringVectors, tags: Sequence[Mapping[str, int]], min_score: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pairs, relation). `pairs`: one row per layer and emotion pair a < b with `cosine` and
    `cooccurrence`. `relation`: per layer, the Spearman correlation of the two over the pairs, the mean
    and max |cosine|, and the most similar pair."""
    concepts = list(vectors.concepts)
    co = tag_cooccurrence(tags, concepts, min_score)
    upper = np.triu_indices(len(concepts), k=1)
    rows, summary = [], []
    for layer in vectors.layers:
        cos = cosine_matrix(vectors, layer)
        for i, j in zip(*upper, strict=True):
            rows.append(
                {
                    "layer": int(layer),
                    "emotion_a": concepts[i],
                    "emotion_b": concepts[j],
                    "cosine": float(cos[i, j]),
                    "cooccurrence": float(co[i, j]),
                }
            )
        off = cos[upper]
        top = int(np.argmax(off)) if len(off) else -1
        summary.append(
            {
                "layer": int(layer),
                "spearman_cosine_vs_cooccurrence": _spearman(off, co[upper]),
                "mean_abs_cosine": float(np.abs(off).mean()) if len(off) else float("nan"),
                "max_cosine": float(off[top]) if len(off) else float("nan"),
                "most_similar": f"{concepts[upper[0][top]]}+{concepts[upper[1][top]]}" if len(off) else "",
            }
        )
    columns = ["layer", "emotion_a", "emotion_b", "cosine", "cooccurrence"]
    return pd.DataFrame(rows, columns=columns), pd.DataFrame(summary)
