"""Emotion selection: which emotions get a readout vector, data-driven, curated, or both (the reference's
"probably both")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from carl_assets.memory.graph import normalise_emotion


def select_emotions(
    counts: Mapping[str, int], top_n: int = 0, curated: Sequence[str] = ()
) -> tuple[list[str], dict[str, str], list[str]]:
    """(selected, why, missing). `counts`: positive examples per emotion. `top_n` > 0 keeps the `top_n`
    most frequent (ties by name); `curated` names are kept whenever the data has them. With neither, all
    emotions are kept. `why` says for each selected emotion whether it is "top_n", "curated" or both;
    `missing` lists curated names the data does not have (they cannot get a vector)."""
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0 (0 = no data-driven cap), got {top_n}")
    wanted: list[str] = []
    for name in curated:
        norm = normalise_emotion(str(name))
        if norm is None:
            raise ValueError(f"curated emotion {name!r} is not a plain-word emotion name")
        wanted.append(norm)
    if not top_n and not wanted:
        return sorted(counts), {e: "all" for e in sorted(counts)}, []
    ranked = sorted(counts, key=lambda e: (-int(counts[e]), e))
    top = set(ranked[:top_n]) if top_n else set()
    cur = {e for e in wanted if e in counts}
    why = {e: "+".join(r for r, s in (("top_n", top), ("curated", cur)) if e in s) for e in sorted(top | cur)}
    missing = sorted({e for e in wanted if e not in counts})
    return sorted(top | cur), why, missing
