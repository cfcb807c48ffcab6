"""Behavioural measures across dream cycles, each against a control, with a bootstrap spread.

1. *Memory absorption*: the per-token negative log-likelihood (nats/token; its exp is the perplexity) of
   memory texts under a checkpoint, before and after each cycle. Held-out memories (nodes that never
   reached a dream) are the measure; memories the dreams used, and a fixed set of generic sentences
   (`GENERIC_TEXTS`), are the controls that separate "learned my memories" from "drifted in general".
2. *Steering readout*: the readout projection (`carl_assets.steering.projection.project_texts`, read by
   one fixed reader model so that every checkpoint's answers are measured with the same instrument) of a
   policy's answers to held-out dream scenarios; the control is a run with the plain scorer.

Spread: a percentile bootstrap over the units (texts, scenarios) with a fixed seed (Efron & Tibshirani
1993, ch. 13); differences between checkpoints are paired by unit. No Dagster here:
`scripts/real_cycles.py` runs the cycles and calls these functions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from carl_assets.dreams.collisions import Collision, collision_of, node_lookup, scenario_messages
from carl_assets.dreams.generation import Sampling, generate_responses
from carl_assets.steering.projection import project_texts
from carl_assets.steering.training import ReadoutConfig
from carl_assets.steering.vectors import SteeringVectors

# Plain sentences with nothing of anyone's memories in them: drift on these is general drift.
GENERIC_TEXTS: tuple[str, ...] = (
    "The train to the city leaves every hour from the second platform.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She bought bread, cheese and two apples at the market on Saturday.",
    "The library closes at six in the evening during the winter months.",
    "A triangle has three sides and its angles add up to one hundred and eighty degrees.",
    "He left his umbrella at the office and walked home in the rain.",
    "The committee will meet again next Tuesday to discuss the budget.",
    "Most plants need sunlight, water and good soil to grow well.",
    "The museum on the hill has a small collection of old maps.",
    "Please remember to switch off the lights when you leave the room.",
    "The river runs through the valley and into the lake to the north.",
    "Our neighbours painted their fence blue last summer.",
)

# --------------------------------------------------------------------------------------------
# Spread
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A statistic and its percentile-bootstrap interval (`low`, `high` at `level`) over `n` units."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        """The interval lies wholly above or wholly below 0 (a gap larger than the spread)."""
        return bool(self.low > 0 or self.high < 0)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "level": self.level}

    def __str__(self) -> str:
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    weights: Sequence[float] | np.ndarray | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """The weighted mean sum(w v) / sum(w) of `values` (weights all 1 when None) and its percentile-bootstrap
    interval: `n_boot` resamples of the units with replacement (numpy `default_rng(seed)`), the statistic
    recomputed on each. With per-text mean NLLs as values and token counts as weights the statistic is the
    pooled per-token NLL. One unit: the interval is the point. No units: NaN everywhere.

    Raises ValueError when values and weights differ in length, a weight is negative, or `level` is not
    in (0, 1).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    v = np.asarray(values, dtype=float)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=float)
    if v.shape != w.shape or v.ndim != 1:
        raise ValueError(f"values and weights must be 1-D of one length, got {v.shape} and {w.shape}")
    if (w < 0).any():
        raise ValueError("weights must be >= 0 (token counts)")
    if len(v) == 0 or w.sum() == 0:
        return Interval(float("nan"), float("nan"), float("nan"), int(len(v)), level)
    point = float((w * v).sum() / w.sum())
    if len(v) == 1:
        return Interval(point, point, point, 1, level)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n_boot, len(v)))
    ws = w[idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = (ws * v[idx]).sum(axis=1) / ws.sum(axis=1)
    stats = stats[np.isfinite(stats)]
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return Interval(point, float(low), float(high), int(len(v)), level)


# --------------------------------------------------------------------------------------------
# Memory absorption: per-token log-likelihood
# --------------------------------------------------------------------------------------------


def _prefix_id(tokenizer: Any) -> int | None:
    """The token every text is read after, so that its first token is predicted too: BOS, else EOS (the
    usual document separator), else none (then the first token is context only)."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None


def encode_for_nll(tokenizer: Any, texts: Sequence[str], max_length: int = 256) -> list[list[int]]:
    """Token ids per text (no special tokens added by the tokenizer), the prefix token (`_prefix_id`)
    first, cut to `max_length` ids in all. Raises ValueError on an empty text, naming its index."""
    prefix = _prefix_id(tokenizer)
    out = []
    for i, text in enumerate(texts):
        if not str(text).strip():
            raise ValueError(f"text {i} is empty: nothing to score")
        ids = tokenizer(str(text), add_special_tokens=False)["input_ids"]
        ids = ([prefix] if prefix is not None else []) + list(ids)
        out.append(ids[:max_length])
    return out


def text_nll(
    model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 8, max_length: int = 256
) -> pd.DataFrame:
    """Negative log-likelihood of each text under `model`, in nats: one row per text with `tokens` (the
    predicted tokens: every token after the prefix, see `encode_for_nll`), `nll_sum` and `nll_mean`
    (= nll_sum / tokens; exp of it is the text's perplexity). Batched, right-padded with an attention
    mask (padding neither attends nor is scored); eval mode and no_grad, the model's mode restored.

    A text of one token after cutting has 0 predicted tokens and NaN `nll_mean`. Raises ValueError on an
    empty text.
    """
    encoded = encode_for_nll(tokenizer, texts, max_length)
    device = next(model.parameters()).device
    sums = np.zeros(len(encoded))
    counts = np.zeros(len(encoded), dtype=int)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                rows = encoded[start : start + batch_size]
                s, c = _batch_nll(model, rows, device)
                sums[start : start + len(rows)] = s
                counts[start : start + len(rows)] = c
    finally:
        model.train(was_training)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return pd.DataFrame(
        {"text_index": range(len(encoded)), "tokens": counts, "nll_sum": sums, "nll_mean": means}
    )


def _batch_nll(model: Any, rows: Sequence[Sequence[int]], device: Any) -> tuple[np.ndarray, np.ndarray]:
    """(sum of token NLLs, number of predicted tokens) per row of one right-padded batch."""
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    logits = logits[:, :-1].float().cpu()
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view(targets.shape)
    return nll.sum(dim=1).double().numpy(), (targets != -100).sum(dim=1).numpy()


def memory_candidates(nodes: pd.DataFrame, max_texts: int = 96) -> pd.DataFrame:
    """A fixed, deterministic subset of the memory nodes to score: non-stub nodes with non-empty text,
    ordered by sha256 of the node id (independent of file order and of which nodes the dreams pick),
    the first `max_texts`. Columns node_id, kind, text. Raises ValueError when `nodes` lacks node_id/text."""
    missing = {"node_id", "text"} - set(nodes.columns)
    if missing:
        raise ValueError(f"nodes table lacks columns {sorted(missing)}")
    frame = nodes.copy()
    frame["text"] = frame["text"].fillna("").astype(str)
    keep = frame["text"].str.strip().str.len() > 0
    if "is_stub" in frame.columns:
        keep &= ~frame["is_stub"].fillna(False).astype(bool)
    frame = frame[keep].copy()
    frame["node_id"] = frame["node_id"].astype(str)
    frame["_order"] = frame["node_id"].map(lambda x: hashlib.sha256(x.encode()).hexdigest())
    frame = frame.sort_values("_order").head(max_texts)
    kind = frame["kind"].astype(str) if "kind" in frame.columns else ""
    return pd.DataFrame(
        {"node_id": frame["node_id"].to_numpy(), "kind": np.asarray(kind), "text": frame["text"].to_numpy()}
    ).reset_index(drop=True)


def node_ids_in(
    frames: Iterable[pd.DataFrame | None], columns: Sequence[str] = ("seed_node_ids", "node_ids_json")
) -> set[str]:
    """Every node id named in any of `columns` (JSON lists) of the given tables (None and tables without
    them skipped): `dream_scenarios` (seed_node_ids) and `dream_heldout` (node_ids_json) give the nodes
    that reached a dream prompt."""
    found: set[str] = set()
    for frame in frames:
        if frame is None:
            continue
        for column in (c for c in columns if c in frame.columns):
            for value in frame[column].dropna():
                found.update(str(x) for x in json.loads(value))
    return found


def absorption_delta(
    before: pd.DataFrame, after: pd.DataFrame, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Paired change of the pooled per-token NLL between two checkpoints on the same texts (frames of
    `text_nll`, rows aligned by position; the tokens must match, the tokenizer being the same).

    Returns before/after pooled NLL (nats/token), their perplexities, and `delta` (after - before) as an
    `Interval` (bootstrap over texts, token-weighted). Negative delta: the texts became more likely.
    Raises ValueError when the frames differ in length or in token counts.
    """
    if len(before) != len(after) or not np.array_equal(
        before["tokens"].to_numpy(), after["tokens"].to_numpy()
    ):
        raise ValueError("before and after must score the same texts (same length and token counts)")
    tokens = before["tokens"].to_numpy(dtype=float)
    ok = tokens > 0
    diff = (after["nll_sum"].to_numpy() - before["nll_sum"].to_numpy())[ok] / tokens[ok]
    pooled_before = float(before["nll_sum"][ok].sum() / tokens[ok].sum()) if ok.any() else float("nan")
    pooled_after = float(after["nll_sum"][ok].sum() / tokens[ok].sum()) if ok.any() else float("nan")
    delta = bootstrap_interval(diff, tokens[ok], n_boot=n_boot, seed=seed, level=level)
    return {
        "nll_before": pooled_before,
        "nll_after": pooled_after,
        "ppl_before": float(np.exp(pooled_before)),
        "ppl_after": float(np.exp(pooled_after)),
        "delta": delta,
        "texts": int(ok.sum()),
        "tokens": int(tokens[ok].sum()),
    }


# --------------------------------------------------------------------------------------------
# Steering readout of the policy's answers
# --------------------------------------------------------------------------------------------


def collisions_from_rows(rows: pd.DataFrame, nodes: pd.DataFrame) -> list[Collision]:
    """Rebuild dream scenarios from stored rows (a `node_ids_json` column, e.g. table `dream_heldout`)
    and the memory nodes (node_id, kind, text). Duplicate scenarios are kept once, in first-seen order.
    Raises KeyError naming node ids missing from `nodes`."""
    lookup = node_lookup(nodes)
    out, seen = [], set()
    for value in rows["node_ids_json"]:
        ids = tuple(str(x) for x in json.loads(value))
        missing = [x for x in ids if x not in lookup]
        if missing:
            raise KeyError(f"scenario nodes missing from the memory nodes: {missing[:5]}")
        if frozenset(ids) in seen:
            continue
        seen.add(frozenset(ids))
        out.append(collision_of(ids, lookup))
    return out


def answer_projections(
    policy: Any,
    policy_tokenizer: Any,
    reader: Any,
    reader_tokenizer: Any,
    vectors: SteeringVectors,
    emotion: str,
    collisions: Sequence[Collision],
    *,
    excerpt_chars: int,
    k: int = 2,
    temperature: float = 0.7,
    sampling: Sampling | None = None,
    max_new_tokens: int = 40,
    layer: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
) -> pd.DataFrame:
    """The policy's `k` answers to each scenario (seeded sampling, `generate_responses`), each read by the
    fixed `reader` model and projected on `emotion`'s unit vector at `layer` (default the readout's deepest,
    as the `steering:<emotion>` scorer reads). One row per answer: dream_id, sample_index, response,
    projection, calibrated (0 = a typical training negative, 1 = a typical positive; NaN without stats).
    `excerpt_chars`: each memory's excerpt length in the scenario prompt (the dream config's).

    Raises ValueError for an emotion or layer the readout lacks.
    """
    if emotion not in vectors.concepts:
        raise ValueError(f"unknown emotion {emotion!r}: the readout knows {sorted(vectors.concepts)}")
    layer = int(max(vectors.layers) if layer is None else layer)
    if layer not in vectors.layers:
        raise ValueError(f"layer {layer} is not a readout layer ({sorted(vectors.layers)})")
    prompts = [scenario_messages(c, excerpt_chars=excerpt_chars) for c in collisions]
    responses = generate_responses(
        policy,
        policy_tokenizer,
        prompts,
        k=k,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        sampling=sampling or Sampling(),
    )
    texts = [r.text if r.text.strip() else " " for r in responses]
    # The readout's token limit and BOS rule (its config's defaults), `batch_size` texts a pass.
    projected = project_texts(reader, reader_tokenizer, vectors, texts, ReadoutConfig(batch_size=batch_size))
    projected = projected[(projected["emotion"] == emotion) & (projected["layer"] == layer)]
    projected = projected.sort_values("text_index")
    return pd.DataFrame(
        {
            "dream_id": [collisions[r.prompt_index].dream_id for r in responses],
            "sample_index": [r.sample_index for r in responses],
            "response": [r.text for r in responses],
            "projection": projected["projection"].to_numpy(),
            "calibrated": projected["calibrated"].to_numpy(),
        }
    )


def per_scenario(frame: pd.DataFrame, value: str = "projection") -> pd.Series:
    """Mean of `value` over each scenario's answers (the bootstrap's unit), indexed by dream_id."""
    return frame.groupby("dream_id", sort=True)[value].mean()


def projection_summary(frame: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> Interval:
    """Mean readout projection over scenarios (each scenario the mean of its answers), bootstrap over
    scenarios."""
    return bootstrap_interval(per_scenario(frame).to_numpy(), n_boot=n_boot, seed=seed)


def paired_projection_delta(
    treated: pd.DataFrame, control: pd.DataFrame, n_boot: int = 2000, seed: int = 0
) -> Interval:
    """Mean over the scenarios both frames answered of (treated - control) per-scenario projection,
    bootstrap over those scenarios. Raises ValueError when they share no scenario."""
    a, b = per_scenario(treated), per_scenario(control)
    shared = a.index.intersection(b.index)
    if len(shared) == 0:
        raise ValueError("the two runs answered no common scenario: nothing to pair")
    return bootstrap_interval((a[shared] - b[shared]).to_numpy(), n_boot=n_boot, seed=seed)
