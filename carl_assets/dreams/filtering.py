"""Filtered behavioural cloning: which dreamed responses become SFT data.

Per scenario the best `ceil(top_fraction * k)` responses are kept, provided they reach `min_score`;
the same normalised text is kept once across the whole frame (its best-scoring occurrence), and an
empty response is never kept. Every row gets the reason it was or was not kept.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pandas as pd


def normalise_text(text: str) -> str:
    """Case- and whitespace-insensitive form used to spot duplicate responses."""
    return " ".join(str(text).split()).casefold()


def filter_responses(
    frame: pd.DataFrame,
    top_fraction: float,
    min_score: float | None = None,
    dedupe: bool = True,
    score_column: str = "score",
    group_column: str = "dream_id",
    text_column: str = "response",
) -> pd.DataFrame:
    """A copy of `frame` with `kept` (bool) and `reason` (one of "kept", "empty", "below_min",
    "duplicate", "not_top").

    Reasons are assigned in that order: empty text; score below `min_score`; with `dedupe`, a
    normalised text that a better-scoring eligible row (ties: the earlier row) anywhere in the frame
    already has; then per scenario (`group_column`) only the best `ceil(top_fraction * k)` of the
    remaining rows are kept, where k is the scenario's number of responses.
    """
    missing = {score_column, group_column, text_column} - set(frame.columns)
    if missing:
        raise ValueError(f"filter_responses: frame lacks columns {sorted(missing)}")
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must lie in (0, 1], got {top_fraction}")
    out = frame.copy()
    scores = pd.to_numeric(out[score_column], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isnan(scores).any():
        bad = out.index[np.isnan(scores)].tolist()[:5]
        raise ValueError(f"column {score_column!r} has missing or non-numeric scores (rows {bad})")
    texts = out[text_column].fillna("").astype(str).map(normalise_text).to_numpy()
    reason = np.full(len(out), "", dtype=object)
    reason[texts == ""] = "empty"
    if min_score is not None:
        reason[(reason == "") & (scores < min_score)] = "below_min"
    # best first; the stable sort keeps row order among ties
    order = np.argsort(-scores, kind="stable")
    if dedupe:
        seen: set[str] = set()
        for i in order:
            if reason[i]:
                continue
            if texts[i] in seen:
                reason[i] = "duplicate"
            seen.add(texts[i])
    groups = out[group_column].astype(str).to_numpy()
    sizes = pd.Series(groups).value_counts().to_dict()
    taken: dict[str, int] = {}
    for i in order:
        if reason[i]:
            continue
        quota = math.ceil(top_fraction * sizes[groups[i]])
        if taken.get(groups[i], 0) < quota:
            taken[groups[i]] = taken.get(groups[i], 0) + 1
            reason[i] = "kept"
        else:
            reason[i] = "not_top"
    out["kept"] = reason == "kept"
    out["reason"] = reason.astype(str)
    return out


def sft_examples_from_dreams(frame: pd.DataFrame, system_prompt: str | None = None) -> pd.DataFrame:
    """The kept responses as TRL conversational prompt-completion examples.

    Columns: example_id (stable: dream id + hash of the response), dream_id, node_ids_json,
    prompt_json (the scenario's chat messages; `system_prompt` replaces the system message, or adds one),
    completion_json (``[{"role": "assistant", "content": response}]``), response, and cycle,
    temperature and score when the frame has them.
    """
    needed = {"dream_id", "seed_node_ids", "prompt", "response", "kept"}
    missing = needed - set(frame.columns)
    if missing:
        raise ValueError(f"sft_examples_from_dreams: frame lacks columns {sorted(missing)}")
    kept = frame[frame["kept"].astype(bool)]
    records = []
    for row in kept.itertuples(index=False):
        prompt = _messages(row.prompt)
        if system_prompt is not None:
            prompt = [m for m in prompt if m.get("role") != "system"]
            if system_prompt:
                prompt.insert(0, {"role": "system", "content": system_prompt})
        response = str(row.response)
        node_ids = (
            row.seed_node_ids if isinstance(row.seed_node_ids, str) else json.dumps(list(row.seed_node_ids))
        )
        digest = hashlib.sha256(f"{row.dream_id}\x1f{response}".encode()).hexdigest()[:10]
        record = {
            "example_id": f"{row.dream_id}-{digest}",
            "dream_id": str(row.dream_id),
            "node_ids_json": node_ids,
            "prompt_json": json.dumps(prompt, ensure_ascii=False),
            "completion_json": json.dumps([{"role": "assistant", "content": response}], ensure_ascii=False),
            "response": response,
        }
        for extra in ("cycle", "temperature", "score"):
            if extra in kept.columns:
                record[extra] = getattr(row, extra)
        records.append(record)
    columns = ["example_id", "dream_id", "node_ids_json", "prompt_json", "completion_json", "response"]
    columns += [c for c in ("cycle", "temperature", "score") if c in kept.columns]
    return pd.DataFrame.from_records(records, columns=columns)


def _messages(prompt: object) -> list[dict[str, str]]:
    messages = json.loads(prompt) if isinstance(prompt, str) else list(prompt)  # type: ignore[arg-type]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError(f"prompt must be a JSON list of chat messages, got {str(prompt)[:80]!r}")
    return [dict(m) for m in messages]
