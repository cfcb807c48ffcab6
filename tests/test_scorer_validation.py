"""Scorer validation: the AUC and its bootstrap interval on cases with known answers, the corruptions,
and the validation set built and scored on a tiny model."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

from carl_assets.dreams.validation import (
    CORRUPTIONS,
    POOLED,
    ValidationConfig,
    auc,
    auc_table,
    bootstrap_auc_interval,
    cut_and_repeat,
    shuffle_words,
    validate_scorers,
)
from tests.tiny_run import TINY_BASE_MODEL


def _pairwise_auc(pos, neg) -> float:
    """The definition, pair by pair: wins + ties / 2 over all n_pos * n_neg pairs."""
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


def test_auc_equals_the_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos = rng.integers(0, 5, rng.integers(1, 12)).astype(float)  # small integers: many ties
        neg = rng.integers(0, 5, rng.integers(1, 12)).astype(float)
        assert auc(pos, neg) == pytest.approx(_pairwise_auc(pos, neg), abs=1e-12)
    # by hand: pos (3, 1), neg (2, 1): pairs 3>2, 3>1, 1<2, 1=1 -> (1 + 1 + 0 + 0.5) / 4
    assert auc([3, 1], [2, 1]) == pytest.approx(0.625)


def test_auc_matches_scipy_mann_whitney_when_available():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(0.5, 1, 30).round(1), rng.normal(0, 1, 40).round(1)
    u = stats.mannwhitneyu(pos, neg, alternative="two-sided").statistic
    assert auc(pos, neg) == pytest.approx(u / (30 * 40), abs=1e-12)


def test_known_answers_label_random_and_inverted():
    rng = np.random.default_rng(2)
    labels = np.array([1] * 60 + [0] * 60)
    label_scorer = labels.astype(float)  # the label itself
    assert auc(label_scorer[labels == 1], label_scorer[labels == 0]) == 1.0
    assert auc(-label_scorer[labels == 1], -label_scorer[labels == 0]) == 0.0  # inverted
    assert bootstrap_auc_interval(label_scorer[:60], label_scorer[60:], n_bootstrap=200, seed=0) == (1.0, 1.0)
    noise = rng.normal(size=120)  # unrelated to the label
    value = auc(noise[:60], noise[60:])
    low, high = bootstrap_auc_interval(noise[:60], noise[60:], n_bootstrap=500, seed=0)
    assert abs(value - 0.5) < 0.12 and low < 0.5 < high and low < value < high
    assert high - low < 0.3
    assert bootstrap_auc_interval(noise[:60], noise[60:], n_bootstrap=500, seed=0) == (low, high)  # seeded


def test_auc_rejects_empty_and_non_finite_sides():
    with pytest.raises(ValueError, match="negative is empty"):
        auc([1.0], [])
    with pytest.raises(ValueError, match="non-finite"):
        auc([1.0, float("nan")], [0.0])
    with pytest.raises(ValueError, match="n_bootstrap"):
        bootstrap_auc_interval([1.0], [0.0], n_bootstrap=0, seed=0)


def test_corruptions_keep_the_words_or_repeat_a_fragment():
    rng = np.random.default_rng(3)
    text = "I walked to the lake at dawn. The water was still and grey. Nobody else was there."
    shuffled = shuffle_words(text, rng)
    assert sorted(shuffled.split()) == sorted(text.split()) and shuffled != text
    looped = cut_and_repeat(text, rng).split()
    assert len(looped) == len(text.split())
    period = next(n for n in range(3, len(looped)) if looped[n : n + 3] == looped[:3])
    assert looped == (looped[:period] * len(looped))[: len(looped)]  # one fragment, repeated
    assert " ".join(looped[:period]) in text  # cut from a sentence of the text
    assert shuffle_words("one", rng) == "one" and cut_and_repeat("", rng) == ""


def test_auc_table_per_corruption_and_pooled():
    import pandas as pd

    scored = pd.DataFrame(
        {
            "label": [1, 1, 0, 0, 0, 0],
            "source": [
                "policy_answer",
                "memory_text",
                "shuffled_words",
                "shuffled_words",
                "hot_sample",
                "hot_sample",
            ],
            "good": [0.9, 0.8, 0.1, 0.2, 0.3, 0.4],  # coherent above everything
            "bad": [0.1, 0.2, 0.5, 0.6, 0.0, 0.05],  # below the shuffled texts, above the hot samples
        }
    )
    table = auc_table(scored, ["good", "bad"], n_bootstrap=50, seed=0).set_index(["scorer", "corruption"])
    assert set(table.index.get_level_values("corruption")) == {"shuffled_words", "hot_sample", POOLED}
    assert table.loc[("good", POOLED), "auc"] == 1.0
    assert table.loc[("bad", "shuffled_words"), "auc"] == 0.0
    assert table.loc[("bad", "hot_sample"), "auc"] == 1.0
    assert table.loc[("bad", POOLED), "auc"] == 0.5
    assert table.loc[("bad", POOLED), ["n_pos", "n_neg"]].tolist() == [2, 4]


def test_validate_scorers_on_a_tiny_model(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    prompts = [
        [{"role": "user", "content": f"memory {i}: the quiet morning and an old letter"}] for i in range(3)
    ]
    memories = [
        "We laughed at the garden after rain with real warmth, and it was good.",
        "I remembered a long meeting and the broken build. Nothing changed.",
        "She wrote about the deadline and I was tired.",
    ]
    config = ValidationConfig(
        max_tokens=10, n_bootstrap=20, scorers=("carl", "mean_logprob", "self_certainty")
    )
    table, scored = validate_scorers(model.eval(), tok, prompts, memories, config)
    assert set(table["corruption"]) == {*CORRUPTIONS, POOLED}
    assert set(table["scorer"]) == {"carl", "mean_logprob", "self_certainty"}
    assert table["auc"].between(0, 1).all() and (table["ci_low"] <= table["ci_high"]).all()
    assert (scored["tokens"] <= 10).all() and (scored["tokens"] > 0).all()
    memory_rows = scored[scored["source"] == "memory_text"]
    assert memory_rows["text"].tolist() == memories
    pooled = table[(table["scorer"] == "carl") & (table["corruption"] == POOLED)].iloc[0]
    assert pooled["n_pos"] == (scored["label"] == 1).sum() and pooled["n_neg"] == (scored["label"] == 0).sum()
    again, _ = validate_scorers(model, tok, prompts, memories, config)
    assert again.equals(table)  # seeded end to end


@pytest.mark.slow
def test_scorer_validation_asset_writes_its_table(tmp_path):
    import dagster as dg

    from carl_assets import storage
    from carl_assets.defs import memory, models
    from carl_assets.defs.resources import build_resources
    from carl_assets.defs.scorer_validation import scorer_validation
    from tests.upstreams import with_upstreams

    tiny_model = TINY_BASE_MODEL
    run_config = {
        "ops": {
            "base_model": {"config": tiny_model},
            "scorer_validation": {"config": {"n_prompts": 3, "max_tokens": 8, "n_bootstrap": 20}},
        }
    }
    result = dg.materialize(
        with_upstreams(memory.memory_graph, models.base_model, scorer_validation),
        resources=build_resources(tmp_path),
        run_config=run_config,
    )
    assert result.success
    table = storage.read_table(tmp_path / storage.DATABASE_NAME, "scorer_validation")
    assert list(table.columns) == [
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
    assert set(table["model"]) == {"offline"} and table["policy"].str.startswith("base_model@").all()
    assert set(table["corruption"]) == {*CORRUPTIONS, POOLED}
    assert table["auc"].between(0, 1).all()
    metadata = result.asset_materializations_for_node("scorer_validation")[0].metadata
    assert metadata["best_scorer"].value in set(table["scorer"])
