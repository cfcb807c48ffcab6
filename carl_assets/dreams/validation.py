"""Scorer validation: does a scorer tell sense from noise on this policy?

Coherent answers to dream prompts (the policy's own low-temperature answers, and real memory texts)
are set against corrupted ones, and each scorer is asked to rank them: the AUC is the probability that
a random coherent answer outscores a random corrupted one (Mann-Whitney U / (n_pos * n_neg); ties
count one half), with a percentile bootstrap interval (coherent and corrupted resampled separately,
fixed seed). 1 separates perfectly, 0.5 is chance, 0 ranks noise first.

Corruptions (`CORRUPTIONS`), each made from every coherent text so the two sides have the same words:

- ``shuffled_words``: the words in a random order (local fluency gone, vocabulary kept);
- ``cut_repeated``: one sentence cut after a few words, that fragment repeated to the original length;
- ``hot_sample``: the policy's own samples at a high temperature with no truncation (word salad on a
  large vocabulary), not derived from a coherent text.

Every text is scored as a completion of its prompt, re-tokenised the same way (no special tokens, at most
`max_tokens` tokens), so the policy's answers get no advantage from their exact generated ids.
No Dagster import: the `scorer_validation` asset calls `validate_scorers`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from carl_assets.carl.reward_fn import REWARD_NAMES
from carl_assets.dreams.collisions import heldout_collisions, scenario_messages
from carl_assets.dreams.generation import (
    GeneratedResponse,
    Sampling,
    encode_prompt,
    generate_responses,
)
from carl_assets.dreams.loop import DreamConfig
from carl_assets.dreams.scoring import TokenScorer
from carl_assets.settings import Settings

CORRUPTIONS = ("shuffled_words", "cut_repeated", "hot_sample")
COHERENT_SOURCES = ("policy_answer", "memory_text")
POOLED = "pooled"
TABLE_COLUMNS = [
    "model",
    "policy",
    "scorer",
    "corruption",
    "auc",
    "ci_low",
    "ci_high",
    "n_pos",
    "n_neg",
    "mean_coherent",
    "mean_corrupted",
]


# --------------------------------------------------------------------------------------------
# AUC and its bootstrap interval
# --------------------------------------------------------------------------------------------


def _checked(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty: the AUC needs at least one score on each side")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(array)).sum())} non-finite scores")
    return array


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given the mean of the ranks they span."""
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative) + P(tie) / 2: the Mann-Whitney U of the
    positives divided by n_pos * n_neg (the area under the ROC curve). Raises ``ValueError`` when a side
    is empty or holds a non-finite score."""
    pos, neg = _checked(positive, "positive"), _checked(negative, "negative")
    ranks = _average_ranks(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def bootstrap_auc_interval(
    positive: Sequence[float],
    negative: Sequence[float],
    *,
    n_bootstrap: int,
    seed: int,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `auc`: `n_bootstrap` resamples, positives and negatives each drawn
    with replacement from their own side (so every resample has both), from ``default_rng(seed)``."""
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    pos, neg = _checked(positive, "positive"), _checked(negative, "negative")
    rng = np.random.default_rng(seed)
    draws = np.array(
        [
            auc(pos[rng.integers(0, pos.size, pos.size)], neg[rng.integers(0, neg.size, neg.size)])
            for _ in range(n_bootstrap)
        ]
    )
    tail = (1.0 - level) / 2.0
    return float(np.quantile(draws, tail)), float(np.quantile(draws, 1.0 - tail))


# --------------------------------------------------------------------------------------------
# Corruptions
# --------------------------------------------------------------------------------------------


def shuffle_words(text: str, rng: np.random.Generator) -> str:
    """The words of `text` (split on whitespace) in a random order; a text of one word is returned as is."""
    words = text.split()
    if len(words) < 2:
        return " ".join(words)
    order = rng.permutation(len(words))
    if np.array_equal(order, np.arange(len(words))):  # never hand back the original order
        order = np.roll(order, 1)
    return " ".join(words[i] for i in order)


def cut_and_repeat(text: str, rng: np.random.Generator) -> str:
    """One sentence of `text`, cut after 3 to half its words (at least 3), repeated until the result has
    as many words as `text`: a degenerate loop of the kind a collapsing policy writes."""
    words = text.split()
    sentences = [s.split() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.split()]
    if not sentences:
        return ""
    sentence = sentences[int(rng.integers(0, len(sentences)))]
    longest = max(3, len(sentence) // 2)
    fragment = sentence[: int(rng.integers(min(3, len(sentence)), min(longest, len(sentence)) + 1))]
    repeats = -(-max(len(words), 2 * len(fragment)) // len(fragment))  # at least twice
    return " ".join((fragment * repeats)[: max(len(words), 2 * len(fragment))])


# --------------------------------------------------------------------------------------------
# Items: coherent and corrupted answers to dream prompts
# --------------------------------------------------------------------------------------------


class ValidationSettings(Settings):
    """How the validation set is built and judged, as `scorer_validation` exposes it. `coherent_*`: the
    policy's own answers (a low temperature, truncated); `hot_*`: the untruncated high-temperature samples;
    `max_tokens`: tokens scored per text; `n_bootstrap` resamples for the interval (seeded by `seed`, as
    the corruptions). Raises ``ValueError`` (a pydantic ``ValidationError``) on too few tokens or samples,
    or a temperature out of range."""

    max_tokens: int = Field(default=48, description="tokens generated and scored per text")
    coherent_temperature: float = Field(
        default=0.5, description="temperature of the policy's own (coherent) answers, sampled with top-p 0.9"
    )
    hot_temperature: float = Field(
        default=1.5, description="temperature of the untruncated (corrupted) samples"
    )
    hot_samples: int = Field(default=2, description="untruncated hot samples per prompt")
    n_bootstrap: int = Field(default=1000, description="bootstrap resamples of each AUC's 95% interval")
    seed: int = Field(default=0, description="seed of prompts, sampling, corruptions and the bootstrap")
    batch_size: int = Field(
        default=8,
        description="prompts per generate call (each batch is its own seeded "
        "sampling stream, so this changes the answers drawn)",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {self.max_tokens}")
        if self.hot_samples < 1:
            raise ValueError(f"hot_samples must be >= 1, got {self.hot_samples}")
        if self.hot_temperature <= 0 or self.coherent_temperature < 0:
            raise ValueError("temperatures must be positive (coherent_temperature 0 decodes greedily)")
        return self


class ValidationConfig(ValidationSettings):
    """The validation settings plus what the asset never exposes: the truncation of the coherent answers
    and the scorers judged."""

    coherent_sampling: Sampling = Field(
        default_factory=lambda: Sampling(top_p=0.9), description="truncation of the coherent answers"
    )
    scorers: tuple[str, ...] = Field(default=REWARD_NAMES, description="the scorers judged")


@dataclass(frozen=True)
class Item:
    """One text scored as the completion of prompt `prompt_index`: `label` 1 coherent, 0 corrupted."""

    prompt_index: int
    source: str  # a COHERENT_SOURCES or CORRUPTIONS name
    label: int
    text: str


def validation_prompts(
    nodes: pd.DataFrame, edges: pd.DataFrame, n: int, seed: int = 0, dream: DreamConfig | None = None
) -> tuple[list[list[dict[str, str]]], list[str]]:
    """`n` dream prompts (collisions of the memory graph drawn as the dream loop draws them, with their own
    seed; collision sizes and excerpt length from `dream`, None: the dream loop's defaults) and for each a
    memory text from a node outside its collision (at least 8 words), drawn without replacement while the
    graph has enough. Raises ``ValueError`` when the graph gives no
    collision or has no memory text of 8 words."""
    dream = dream or DreamConfig()
    sizes = {"min_memories": dream.min_memories, "max_memories": dream.max_memories}
    collisions = heldout_collisions(nodes, edges, n, seed=7_000_003 + int(seed), **sizes)
    if not collisions:
        raise ValueError(
            f"the memory graph gives no dream collision (no walk meets 2 distinct memories): {len(nodes)} "
            f"nodes, {len(edges)} relations; dreams walk the relations between memories: add relations"
        )
    texts = nodes.assign(text=nodes["text"].fillna("").astype(str))
    texts = texts[texts["text"].str.split().str.len() >= 8]
    if texts.empty:
        raise ValueError("no memory node has a text of at least 8 words to serve as a coherent answer")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    ids, bodies = texts["node_id"].astype(str).to_numpy(), texts["text"].to_numpy()
    memory_texts, cursor = [], 0
    for collision in collisions:
        for _ in range(len(order)):  # the next text whose node is not in this collision
            k = order[cursor % len(order)]
            cursor += 1
            if ids[k] not in collision.node_set or len(order) == 1:
                break
        memory_texts.append(" ".join(str(bodies[k]).split()))
    return [scenario_messages(c, excerpt_chars=dream.excerpt_chars) for c in collisions], memory_texts


def build_items(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    memory_texts: Sequence[str],
    config: ValidationConfig,
) -> list[Item]:
    """For each prompt: the policy's answer and `memory_texts[i]` (coherent), each shuffled and each cut
    and repeated, and `hot_samples` untruncated samples at `hot_temperature` (corrupted). Raises
    ``ValueError`` unless there is one memory text per prompt."""
    if len(memory_texts) != len(prompts):
        raise ValueError(f"{len(memory_texts)} memory texts for {len(prompts)} prompts: give one per prompt")
    answers = generate_responses(
        model,
        tokenizer,
        prompts,
        k=1,
        temperature=config.coherent_temperature,
        max_new_tokens=config.max_tokens,
        batch_size=config.batch_size,
        seed=config.seed,
        sampling=config.coherent_sampling,
    )
    hot = generate_responses(
        model,
        tokenizer,
        prompts,
        k=config.hot_samples,
        temperature=config.hot_temperature,
        max_new_tokens=config.max_tokens,
        batch_size=config.batch_size,
        seed=config.seed + 1,
    )
    rng = np.random.default_rng(config.seed)
    items: list[Item] = []
    for i, answer in enumerate(answers):
        for source, text in (("policy_answer", answer.text), ("memory_text", memory_texts[i])):
            text = " ".join(str(text).split())
            if len(text.split()) < 4:  # too short to corrupt into anything different
                continue
            items.append(Item(i, source, 1, text))
            items.append(Item(i, "shuffled_words", 0, shuffle_words(text, rng)))
            items.append(Item(i, "cut_repeated", 0, cut_and_repeat(text, rng)))
    items.extend(Item(r.prompt_index, "hot_sample", 0, r.text) for r in hot if r.text.split())
    return items


def score_items(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    items: Sequence[Item],
    config: ValidationConfig,
) -> pd.DataFrame:
    """One row per item (prompt_index, source, label, text, tokens) with one column per scorer: each text
    re-tokenised (no special tokens, first `max_tokens`) and scored as the completion of its prompt."""
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    responses = []
    for n, item in enumerate(items):
        ids = tokenizer(item.text, add_special_tokens=False)["input_ids"][: config.max_tokens]
        responses.append(
            GeneratedResponse(
                item.prompt_index, n, item.text, prompt_ids[item.prompt_index], [int(t) for t in ids]
            )
        )
    scores = TokenScorer(tuple(config.scorers), batch_size=4 * config.batch_size)(model, tokenizer, responses)
    frame = pd.DataFrame(
        {
            "prompt_index": [it.prompt_index for it in items],
            "source": [it.source for it in items],
            "label": [it.label for it in items],
            "text": [it.text for it in items],
            "tokens": [len(r.completion_ids) for r in responses],
        }
    )
    for name in config.scorers:
        frame[name] = scores[name]
    return frame


def auc_table(
    scored: pd.DataFrame, scorers: Sequence[str], *, n_bootstrap: int, seed: int
) -> pd.DataFrame:
    """AUC of each scorer, coherent (label 1) against each corruption kind present and against all of
    them pooled, with its bootstrap interval; columns scorer, corruption, auc, ci_low, ci_high, n_pos,
    n_neg, mean_coherent, mean_corrupted."""
    coherent = scored[scored["label"] == 1]
    rows = []
    kinds = [k for k in CORRUPTIONS if (scored["source"] == k).any()]
    for name in scorers:
        for kind in [*kinds, POOLED]:
            wanted = scored["label"] == 0
            if kind != POOLED:
                wanted &= scored["source"] == kind
            corrupted = scored[wanted]
            pos, neg = coherent[name].to_numpy(float), corrupted[name].to_numpy(float)
            low, high = bootstrap_auc_interval(pos, neg, n_bootstrap=n_bootstrap, seed=seed)
            rows.append(
                {
                    "scorer": name,
                    "corruption": kind,
                    "auc": auc(pos, neg),
                    "ci_low": low,
                    "ci_high": high,
                    "n_pos": len(pos),
                    "n_neg": len(neg),
                    "mean_coherent": float(pos.mean()),
                    "mean_corrupted": float(neg.mean()),
                }
            )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS[2:])


def validate_scorers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    memory_texts: Sequence[str],
    config: ValidationConfig,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(AUC table, scored items) of every scorer in `config.scorers` on this policy: see the module."""
    items = build_items(model, tokenizer, prompts, memory_texts, config)
    scored = score_items(model, tokenizer, prompts, items, config)
    if not (scored["label"] == 1).any() or not (scored["label"] == 0).any():
        raise ValueError(
            "the validation set needs coherent and corrupted texts: the prompts gave "
            f"{int((scored['label'] == 1).sum())} and {int((scored['label'] == 0).sum())}"
        )
    return auc_table(scored, config.scorers, n_bootstrap=config.n_bootstrap, seed=config.seed), scored
