"""Behavioural measures across dream cycles (carl_assets.dreams.behaviour): NLL against a direct
computation, the bootstrap on cases with a known answer, the held-out split, and the readout projection
of a policy's answers against a hand computation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from carl_assets.dreams import behaviour as B
from carl_assets.dreams.collisions import Collision
from carl_assets.steering.vectors import SteeringVectors


def _direct_nll(model, tokenizer, text: str) -> tuple[float, int]:
    """One text alone, no padding: sum of -log softmax(logits)[next token] and the tokens predicted."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[prefix, *ids]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    picked = logp.gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
    return float(-picked.sum()), int(ids.shape[1] - 1)


def test_text_nll_matches_a_direct_computation_for_any_batch(tiny_model_and_tokenizer, tiny_texts):
    model, tokenizer = tiny_model_and_tokenizer
    texts = [
        tiny_texts[0],
        "a",
        tiny_texts[3],
        tiny_texts[10] + " " + tiny_texts[11],
    ]  # lengths differ: padding
    for batch_size in (1, 3, 8):
        frame = B.text_nll(model, tokenizer, texts, batch_size=batch_size)
        for i, text in enumerate(texts):
            total, count = _direct_nll(model, tokenizer, text)
            assert frame.loc[i, "tokens"] == count
            assert frame.loc[i, "nll_sum"] == pytest.approx(total, rel=1e-4)
            assert frame.loc[i, "nll_mean"] == pytest.approx(total / count, rel=1e-4)
    # a random model over a 512-token vocabulary: about log(512) nats per token
    assert 4.0 < frame["nll_mean"].mean() < 8.0


def test_text_nll_cuts_long_texts_and_refuses_empty_ones(tiny_model_and_tokenizer, tiny_texts):
    model, tokenizer = tiny_model_and_tokenizer
    frame = B.text_nll(model, tokenizer, [" ".join(tiny_texts[:20])], max_length=10)
    assert frame.loc[0, "tokens"] == 9  # 10 ids with the prefix, 9 predicted
    with pytest.raises(ValueError, match="text 1 is empty"):
        B.text_nll(model, tokenizer, ["fine", "  "])


def test_bootstrap_constant_values_give_a_point_interval():
    interval = B.bootstrap_interval([0.25] * 7, n_boot=200)
    assert (interval.mean, interval.low, interval.high, interval.n) == (0.25, 0.25, 0.25, 7)
    assert interval.excludes_zero


def test_bootstrap_weighted_mean_is_the_pooled_ratio():
    # per-text means 1.0 (3 tokens) and 4.0 (1 token): pooled per-token value (3 + 4) / 4 = 1.75
    interval = B.bootstrap_interval([1.0, 4.0], [3, 1], n_boot=500)
    assert interval.mean == pytest.approx(1.75)
    assert 1.0 <= interval.low <= interval.high <= 4.0


def test_bootstrap_interval_agrees_with_normal_theory():
    values = np.random.default_rng(3).normal(loc=2.0, scale=1.0, size=400)
    ours = B.bootstrap_interval(values, n_boot=4000, seed=1)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))  # normal theory: about 0.098
    assert ours.mean == pytest.approx(values.mean())
    assert ours.low == pytest.approx(values.mean() - half, abs=0.015)
    assert ours.high == pytest.approx(values.mean() + half, abs=0.015)
    assert ours.excludes_zero


def test_bootstrap_of_two_units_matches_the_enumerated_distribution():
    # resampling [0, 1] twice: mean 0 (p 1/4), 0.5 (p 1/2), 1 (p 1/4); the 2.5 % and 97.5 % points are
    # 0 and 1, the 30 % and 70 % points 0.5
    wide = B.bootstrap_interval([0.0, 1.0], n_boot=4000, seed=0)
    assert (wide.low, wide.high) == (0.0, 1.0) and not wide.excludes_zero
    narrow = B.bootstrap_interval([0.0, 1.0], n_boot=4000, seed=0, level=0.4)
    assert (narrow.low, narrow.high) == (0.5, 0.5)


def test_bootstrap_edge_cases():
    empty = B.bootstrap_interval([])
    assert np.isnan(empty.mean) and empty.n == 0
    single = B.bootstrap_interval([-0.5])
    assert (single.low, single.high) == (-0.5, -0.5)
    with pytest.raises(ValueError, match="one length"):
        B.bootstrap_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        B.bootstrap_interval([1.0, 2.0], [1.0, -1.0])


def test_absorption_delta_pairs_texts_and_pools_tokens():
    before = pd.DataFrame(
        {
            "text_index": [0, 1, 2],
            "tokens": [2, 2, 0],
            "nll_sum": [8.0, 4.0, 0.0],
            "nll_mean": [4.0, 2.0, np.nan],
        }
    )
    after = before.assign(nll_sum=[6.0, 4.0, 0.0], nll_mean=[3.0, 2.0, np.nan])
    out = B.absorption_delta(before, after, n_boot=500)
    assert out["nll_before"] == pytest.approx(12.0 / 4) and out["nll_after"] == pytest.approx(10.0 / 4)
    assert out["ppl_after"] == pytest.approx(np.exp(2.5))
    assert out["delta"].mean == pytest.approx(-0.5)  # (-2 + 0) nats over 4 tokens
    assert out["texts"] == 2 and out["tokens"] == 4
    assert out["delta"].low == pytest.approx(-1.0) and out["delta"].high == pytest.approx(0.0)
    same = B.absorption_delta(before, before)
    assert (same["delta"].low, same["delta"].high) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same texts"):
        B.absorption_delta(before, after.assign(tokens=[2, 3, 0]))


def test_memory_candidates_skip_stubs_and_empty_texts_in_a_fixed_order():
    nodes = pd.DataFrame(
        {
            "node_id": [f"n{i}" for i in range(10)],
            "kind": ["note"] * 10,
            "text": ["t"] * 7 + ["", None, "stub name"],
            "is_stub": [False] * 9 + [True],
        }
    )
    picked = B.memory_candidates(nodes, max_texts=5)
    assert len(picked) == 5 and set(picked["node_id"]) <= {f"n{i}" for i in range(7)}
    shuffled = B.memory_candidates(nodes.sample(frac=1.0, random_state=0), max_texts=5)
    assert picked["node_id"].tolist() == shuffled["node_id"].tolist()


def test_node_ids_in_reads_json_lists():
    heldout = pd.DataFrame({"node_ids_json": [json.dumps(["x", "y"]), json.dumps(["y", "z"])]})
    dreams = pd.DataFrame({"seed_node_ids": [json.dumps(["w"]), None]})  # dream_scenarios' column
    assert B.node_ids_in([heldout, None, pd.DataFrame({"other": [1]}), dreams]) == {"w", "x", "y", "z"}


def _readout(model, layer: int) -> SteeringVectors:
    hidden = model.config.hidden_size
    direction = torch.linspace(-1.0, 1.0, hidden)
    direction = direction / direction.norm()
    return SteeringVectors(
        concepts=["warmth"],
        layers=[layer],
        vectors={layer: direction.unsqueeze(0)},
        reduction="mean",
        bos_excluded=True,
    )


def test_answer_projections_equal_a_hand_computed_mean_residual(tiny_model_and_tokenizer, tiny_texts):
    model, tokenizer = tiny_model_and_tokenizer
    nodes = pd.DataFrame({"node_id": ["a", "b", "c"], "kind": ["note"] * 3, "text": tiny_texts[:3]})
    rows = pd.DataFrame(
        {"node_ids_json": [json.dumps(["a", "b"]), json.dumps(["b", "a"]), json.dumps(["c", "a"])]}
    )
    collisions = B.collisions_from_rows(rows, nodes)
    assert [c.node_ids for c in collisions] == [("a", "b"), ("c", "a")]  # the same scenario kept once
    vectors = _readout(model, layer=1)

    def project():  # the same seed each time
        return B.answer_projections(
            model,
            tokenizer,
            model,
            tokenizer,
            vectors,
            "warmth",
            collisions,
            excerpt_chars=160,
            k=2,
            temperature=1.0,
            max_new_tokens=6,
            seed=0,
        )

    frame = project()
    assert (
        len(frame) == 4
        and list(frame["dream_id"]) == [collisions[0].dream_id] * 2 + [collisions[1].dream_id] * 2
    )
    for text, projection in zip(frame["response"], frame["projection"], strict=True):
        ids = tokenizer(text if text.strip() else " ", add_special_tokens=True)["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]
        if ids[0] == tokenizer.bos_token_id and len(ids) > 1:
            hidden = hidden[1:]
        expected = float(hidden.double().mean(dim=0) @ vectors.vectors[1][0].double())
        assert projection == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # same seed, same answers
    again = project()
    assert again["response"].tolist() == frame["response"].tolist()
    with pytest.raises(ValueError, match="unknown emotion"):
        B.answer_projections(
            model, tokenizer, model, tokenizer, vectors, "awe", collisions, excerpt_chars=160
        )


def test_collisions_from_rows_names_missing_nodes():
    nodes = pd.DataFrame({"node_id": ["a"], "kind": ["note"], "text": ["x"]})
    with pytest.raises(KeyError, match="zz"):
        B.collisions_from_rows(pd.DataFrame({"node_ids_json": [json.dumps(["a", "zz"])]}), nodes)


def test_projection_summaries_average_per_scenario_then_pair():
    treated = pd.DataFrame(
        {"dream_id": ["s1", "s1", "s2", "s2", "s3"], "projection": [1.0, 3.0, 2.0, 2.0, 5.0]}
    )
    control = pd.DataFrame({"dream_id": ["s1", "s2", "s4"], "projection": [1.0, 1.0, 9.0]})
    summary = B.projection_summary(treated, n_boot=300)
    assert summary.mean == pytest.approx((2.0 + 2.0 + 5.0) / 3) and summary.n == 3
    delta = B.paired_projection_delta(treated, control, n_boot=300)
    assert delta.mean == pytest.approx(1.0) and (delta.low, delta.high) == (1.0, 1.0)  # s1: +1, s2: +1
    with pytest.raises(ValueError, match="no common scenario"):
        B.paired_projection_delta(treated, control.assign(dream_id=["x", "y", "z"]))


def test_collision_type_is_the_dreams_own():
    assert B.Collision is Collision
