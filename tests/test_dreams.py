"""The dream loop's library: walks, collisions, the filter, the noise schedule, generation, scoring, one
cycle."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from carl_assets.carl import carl_reward, coherence_gate
from carl_assets.dreams import (
    CarlScorer,
    DreamConfig,
    GeneratedResponse,
    NoiseSchedule,
    SteeringScorer,
    WalkConfig,
    collide,
    cycle_statistics,
    dream,
    dream_id_of,
    filter_responses,
    generate_one_at_a_time,
    generate_responses,
    heldout_collisions,
    inverse_diagnostic_pass_rate,
    parse_scorer_spec,
    random_walks,
    sample_walks,
    scenario_messages,
    sft_examples_from_dreams,
)
from carl_assets.dreams.collisions import plan_heldout
from carl_assets.dreams.generation import encode_prompt
from carl_assets.dreams.loop import dream_scenarios as loop_dream_scenarios
from carl_assets.dreams.schedule import SHAPES, ScheduleSettings
from carl_assets.dreams.walks import NoWalkStartError, auto_conditioning_kinds, kind_counts
from carl_assets.memory_graph import load_graph
from carl_assets.steering import SteeringVectors, find_decoder_blocks

# --------------------------------------------------------------------------------------------
# Hand-made graphs
# --------------------------------------------------------------------------------------------


def _nodes(ids, kinds, lines=None) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "node_id": ids,
            "kind": kinds,
            "text": [f"memory {i}" for i in ids],
            "source_line": lines if lines is not None else list(range(1, len(ids) + 1)),
        }
    )


def _edges(triples) -> pd.DataFrame:
    return pd.DataFrame(triples, columns=["src", "dst", "relation"])


# The walk mechanics below are tested from the reflection/lesson nodes of small hand-made graphs; the
# default (the graph's own kinds) is tested in "Conditioning kinds".
REFLECTIVE = ("reflection", "lesson")


@pytest.fixture(scope="module")
def sample_graph():
    return load_graph("sample")


def test_restart_lengths_are_geometric():
    # A directed chain: the walk never comes back to its start except by a restart, and never reaches
    # the dead end at its tail within a gap (0.85^299 is nil), so restarts are exactly the drawn ones.
    n = 300
    ids = [f"n{i}" for i in range(n)]
    nodes = _nodes(ids, ["reflection"] + ["journal"] * (n - 1))
    edges = _edges([(ids[i], ids[i + 1], "follows") for i in range(n - 1)])
    p = 0.15
    sample = sample_walks(
        nodes,
        edges,
        40,
        WalkConfig(restart_prob=p, walk_length=2500, directed=True, seed=3, conditioning_kinds=REFLECTIVE),
    )
    start = sample.nodes[:, 0]
    assert np.array_equal(sample.nodes[:, 1:] == start[:, None], sample.restarted[:, 1:])
    gaps = []
    for row in sample.restarted:
        positions = np.flatnonzero(row)
        gaps.extend(np.diff(np.concatenate([[0], positions])).tolist())  # complete gaps only
    gaps = np.asarray(gaps)
    assert len(gaps) > 12_000
    # Geometric(p) on {1, 2, ...}: mean 1/p (6.67; standard error ~0.05 here), P(L = 1) = p (se ~0.003).
    assert gaps.mean() == pytest.approx(1 / p, rel=0.03)
    assert np.mean(gaps == 1) == pytest.approx(p, abs=0.012)
    assert np.mean(gaps == 2) == pytest.approx(p * (1 - p), abs=0.012)


@pytest.mark.parametrize("directed", [True, False])
def test_neighbours_are_visited_in_proportion_to_edge_weights(directed):
    nodes = _nodes(["hub", "a", "b", "c"], ["reflection", "journal", "journal", "journal"])
    edges = _edges([("hub", "a", "r1"), ("hub", "b", "r2"), ("hub", "c", "r3")])
    config = WalkConfig(
        restart_prob=0.0,
        walk_length=20,
        relation_weights={"r1": 1.0, "r2": 2.0, "r3": 3.0},
        directed=directed,
        seed=1,
        conditioning_kinds=REFLECTIVE,
    )
    walks = np.array(random_walks(nodes, edges, 1500, config))
    assert (walks[:, 0] == "hub").all()
    leaves = walks[walks != "hub"]
    # From the hub every other step: 1500 walks x 10 departures.
    assert len(leaves) == 1500 * 10
    freq = {leaf: float(np.mean(leaves == leaf)) for leaf in "abc"}
    for leaf, expected in zip("abc", (1 / 6, 2 / 6, 3 / 6), strict=True):
        assert abs(freq[leaf] - expected) < 0.02, freq


def test_zero_weight_relations_are_never_walked_and_unknown_relations_get_the_default():
    nodes = _nodes(["hub", "a", "b"], ["lesson", "journal", "journal"])
    edges = _edges([("hub", "a", "muted"), ("hub", "b", "other")])
    walks = np.array(
        random_walks(
            nodes,
            edges,
            200,
            WalkConfig(relation_weights={"muted": 0.0}, seed=0, conditioning_kinds=REFLECTIVE),
        )
    )
    assert "a" not in walks and "b" in walks


def test_restart_prob_one_never_leaves_the_start():
    nodes = _nodes(["r", "x", "y"], ["reflection", "journal", "journal"])
    edges = _edges([("r", "x", "e"), ("x", "y", "e")])
    sample = sample_walks(
        nodes, edges, 50, WalkConfig(restart_prob=1.0, walk_length=12, conditioning_kinds=REFLECTIVE)
    )
    assert (sample.nodes == sample.nodes[:, :1]).all()
    assert sample.restarted[:, 1:].all()


def test_starts_are_recent_nodes_of_the_conditioning_kinds(sample_graph):
    nodes, edges = sample_graph.nodes, sample_graph.edges
    config = WalkConfig(recent_nodes=10, seed=5)
    walks = random_walks(nodes, edges, 40, config)
    eligible = nodes[nodes["kind"].isin(REFLECTIVE)]  # the sample graph's own kinds (auto)
    recent = set(eligible.sort_values("source_line", ascending=False)["node_id"].head(10))
    starts = [w[0] for w in walks]
    assert set(starts) == recent  # each of the 10 starts 4 walks (round-robin over a shuffle)
    assert all(len(w) == config.walk_length + 1 for w in walks)
    # A timestamp column wins over source_line: reverse the order and the oldest become the most recent.
    stamped = nodes.assign(
        created_at=pd.Timestamp("2026-01-01") - pd.to_timedelta(nodes["source_line"], unit="h")
    )
    oldest = set(eligible.sort_values("source_line")["node_id"].head(10))
    assert {w[0] for w in random_walks(stamped, edges, 40, config)} == oldest


def test_walks_are_deterministic_given_the_seed(sample_graph):
    nodes, edges = sample_graph.nodes, sample_graph.edges
    a = random_walks(nodes, edges, 30, WalkConfig(seed=7))
    assert a == random_walks(nodes, edges, 30, WalkConfig(seed=7))
    assert a != random_walks(nodes, edges, 30, WalkConfig(seed=8))


def test_walks_without_conditioning_nodes_name_the_kinds():
    nodes = _nodes(["a", "b"], ["journal", "digest"])
    with pytest.raises(
        ValueError, match=r"conditioning kinds \['reflection', 'lesson'\].*'digest': 1, 'journal': 1"
    ):
        random_walks(nodes, _edges([("a", "b", "e")]), 3, WalkConfig(conditioning_kinds=REFLECTIVE))
    with pytest.raises(ValueError, match="restart_prob"):
        WalkConfig(restart_prob=1.5)
    with pytest.raises(ValueError, match="edge weights"):
        WalkConfig(relation_weights={"x": -1.0})


# --------------------------------------------------------------------------------------------
# Collisions
# --------------------------------------------------------------------------------------------


def test_collisions_hold_two_or_three_distinct_memories_led_by_the_start(sample_graph):
    nodes, edges = sample_graph.nodes, sample_graph.edges
    config = WalkConfig(seed=2)
    walks = random_walks(nodes, edges, 60, config)
    collisions = collide(walks, nodes, min_memories=2, max_memories=3, seed=4)
    assert len(collisions) >= 40
    kind_of = dict(zip(nodes["node_id"], nodes["kind"], strict=True))
    text_of = dict(zip(nodes["node_id"], nodes["text"], strict=True))
    sizes = set()
    starts = [w[0] for w in walks]
    for c in collisions:
        assert len(set(c.node_ids)) == len(c.node_ids) and 2 <= len(c.node_ids) <= 3
        sizes.add(len(c.node_ids))
        assert c.node_ids[0] in starts and c.kinds[0] in REFLECTIVE
        assert c.kinds == tuple(kind_of[x] for x in c.node_ids)
        assert c.texts == tuple(text_of[x] for x in c.node_ids)
        assert c.dream_id == dream_id_of(reversed(c.node_ids))  # order-free, stable
    assert sizes == {2, 3}
    assert len({c.dream_id for c in collisions}) == len(collisions)

    excluded = {collisions[0].node_set, collisions[3].node_set}
    again = collide(walks, nodes, min_memories=2, max_memories=3, seed=4, exclude=excluded)
    assert [c.dream_id for c in again] == [c.dream_id for i, c in enumerate(collisions) if i not in (0, 3)]


def test_walks_with_too_few_distinct_nodes_are_skipped():
    nodes = _nodes(["r", "x"], ["reflection", "journal"])
    assert collide([["r", "r", "r"], ["r"]], nodes, min_memories=2, max_memories=3) == []
    only = collide([["r", "r", "x"]], nodes, min_memories=2, max_memories=3)
    assert [c.node_ids for c in only] == [("r", "x")]
    with pytest.raises(ValueError, match="min_memories"):
        collide([["r", "x"]], nodes, min_memories=3, max_memories=2)


def test_scenario_prompt_presents_every_memory(sample_graph):
    nodes, edges = sample_graph.nodes, sample_graph.edges
    c = collide(random_walks(nodes, edges, 5, WalkConfig()), nodes, min_memories=2, max_memories=3, seed=0)[0]
    messages = scenario_messages(c, excerpt_chars=60, system_prompt="Be yourself.")
    assert [m["role"] for m in messages] == ["system", "user"] and messages[0]["content"] == "Be yourself."
    user = messages[1]["content"]
    for i, (kind, text) in enumerate(zip(c.kinds, c.texts, strict=True), start=1):
        line = next(x for x in user.splitlines() if x.startswith(f"{i}. "))
        assert len(line) - len(f"{i}. ") <= 60
        # the node text opens with "name (kind)": the kind is named once, by the text itself
        assert text.split()[0] in line and line.count(f"({kind})") == 1
    assert "your own words" in user
    assert [m["role"] for m in scenario_messages(c, excerpt_chars=160, system_prompt=None)] == ["user"]


def test_heldout_collisions_are_fixed(sample_graph):
    nodes, edges = sample_graph.nodes, sample_graph.edges
    a = heldout_collisions(nodes, edges, 12, WalkConfig(), seed=99, min_memories=2, max_memories=3)
    assert len(a) == 12 and len({c.node_set for c in a}) == 12
    assert [c.dream_id for c in a] == [
        c.dream_id
        for c in heldout_collisions(nodes, edges, 12, WalkConfig(), seed=99, min_memories=2, max_memories=3)
    ]


# --------------------------------------------------------------------------------------------
# Filter and SFT examples
# --------------------------------------------------------------------------------------------


def _scored_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "dream_id": ["d1"] * 4 + ["d2"] * 4,
            "response": ["alpha", "beta", "gamma", "", "Alpha ", "delta", "eps", "zeta"],
            "score": [0.9, 0.5, 0.7, 5.0, 0.95, 0.2, 0.6, 0.4],
        }
    )


def test_filter_keeps_the_top_fraction_per_scenario():
    out = filter_responses(_scored_frame(), top_fraction=0.5, dedupe=False)
    # d1: the empty one (best score) is never kept; then 0.9, 0.7 kept. d2: 0.95, 0.6 kept.
    assert out["reason"].tolist() == [
        "kept",
        "not_top",
        "kept",
        "empty",
        "kept",
        "not_top",
        "kept",
        "not_top",
    ]
    assert out["kept"].tolist() == [r == "kept" for r in out["reason"]]
    assert "kept" not in _scored_frame().columns  # a copy
    # ceil(0.3 * 4) = 2 per scenario as well; top_fraction 1.0 keeps every non-empty response
    assert filter_responses(_scored_frame(), top_fraction=0.3, dedupe=False)["kept"].sum() == 4
    assert filter_responses(_scored_frame(), top_fraction=1.0, dedupe=False)["kept"].sum() == 7


def test_filter_minimum_and_dedupe_across_scenarios():
    out = filter_responses(_scored_frame(), top_fraction=0.5, min_score=0.65)
    # "alpha" (d1, 0.9) duplicates "Alpha " (d2, 0.95): the better-scoring d2 row keeps it, and d1's
    # quota goes to the next best, gamma. d2's 0.6 and below fall under the minimum.
    assert out["reason"].tolist() == [
        "duplicate",
        "below_min",
        "kept",
        "empty",
        "kept",
        "below_min",
        "below_min",
        "below_min",
    ]


def test_filter_errors_name_the_problem():
    with pytest.raises(ValueError, match="lacks columns.*score"):
        filter_responses(_scored_frame().drop(columns=["score"]), top_fraction=0.5)
    with pytest.raises(ValueError, match="top_fraction"):
        filter_responses(_scored_frame(), top_fraction=0.0)
    bad = _scored_frame()
    bad.loc[2, "score"] = float("nan")
    with pytest.raises(ValueError, match=r"'score'.*rows \[2\]"):
        filter_responses(bad, top_fraction=0.5)


def test_sft_examples_are_trl_prompt_completion_rows():
    frame = _scored_frame()
    frame["seed_node_ids"] = [json.dumps(["a", "b"])] * 8
    frame["prompt"] = json.dumps([{"role": "system", "content": "old"}, {"role": "user", "content": "scene"}])
    frame["cycle"] = 2
    out = filter_responses(frame, top_fraction=0.5)
    examples = sft_examples_from_dreams(out, system_prompt="new")
    assert len(examples) == int(out["kept"].sum()) == 4
    row = examples.iloc[0]
    assert json.loads(row["prompt_json"]) == [
        {"role": "system", "content": "new"},
        {"role": "user", "content": "scene"},
    ]
    assert json.loads(row["completion_json"]) == [{"role": "assistant", "content": row["response"]}]
    assert json.loads(row["node_ids_json"]) == ["a", "b"] and (examples["cycle"] == 2).all()
    assert examples["example_id"].is_unique
    assert all(
        e.startswith(d + "-") for e, d in zip(examples["example_id"], examples["dream_id"], strict=True)
    )
    kept_as_is = sft_examples_from_dreams(out)
    assert json.loads(kept_as_is.iloc[0]["prompt_json"])[0]["content"] == "old"


# --------------------------------------------------------------------------------------------
# Noise schedule
# --------------------------------------------------------------------------------------------


# The schedule's former library defaults (no defaults now: the values are the model's, the length and shape
# the asset's), so each test checks the numbers it checked.
SCHEDULE = dict(
    cycles=3, lr_start=1e-4, lr_end=1e-5, temperature_start=1.3, temperature_end=0.7, shape="cosine"
)


@pytest.mark.parametrize("shape", ["linear", "cosine", "geometric"])
def test_schedule_endpoints_monotone_and_hold(shape):
    s = NoiseSchedule(
        cycles=6, lr_start=1e-4, lr_end=1e-5, temperature_start=1.3, temperature_end=0.7, shape=shape
    )
    first, last = s.at(0), s.at(5)
    assert (first.learning_rate, first.temperature, first.progress) == (1e-4, 1.3, 0.0)
    assert (last.learning_rate, last.temperature, last.progress) == (1e-5, 0.7, 1.0)
    lrs = [s.at(c).learning_rate for c in range(6)]
    temps = [s.at(c).temperature for c in range(6)]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert all(a > b for a, b in zip(temps, temps[1:], strict=False))
    beyond = s.at(9)
    assert (beyond.learning_rate, beyond.temperature, beyond.progress) == (1e-5, 0.7, 1.0)
    one = NoiseSchedule(**{**SCHEDULE, "cycles": 1, "shape": shape}).at(0)
    assert (one.learning_rate, one.temperature) == (1e-4, 1.3)


def test_schedule_shapes_in_between():
    mid = {shape: NoiseSchedule(**{**SCHEDULE, "shape": shape}).at(1) for shape in SHAPES}
    assert mid["linear"].learning_rate == pytest.approx(5.5e-5, rel=1e-12)
    assert mid["cosine"].temperature == pytest.approx(1.0, rel=1e-12)  # cos(pi/2) = 0: the midpoint
    assert mid["geometric"].learning_rate == pytest.approx(math.sqrt(1e-4 * 1e-5), rel=1e-12)
    quarter = NoiseSchedule(**{**SCHEDULE, "cycles": 5}).at(1)
    assert quarter.temperature == pytest.approx(0.7 + 0.6 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-12)


def test_schedule_validation():
    with pytest.raises(ValueError, match="unknown schedule shape 'square'"):
        NoiseSchedule(**{**SCHEDULE, "shape": "square"})
    with pytest.raises(ValueError, match="lr_end"):
        NoiseSchedule(**{**SCHEDULE, "lr_end": 0.0})
    with pytest.raises(ValueError, match="cycles"):
        NoiseSchedule(**{**SCHEDULE, "cycles": 0})
    with pytest.raises(ValueError, match="cycle must be >= 0"):
        NoiseSchedule(**SCHEDULE).at(-1)
    with pytest.raises(ValueError, match="schedule_shape"):  # a choice of the asset's config, refused early
        ScheduleSettings(schedule_shape="square")
    settings = ScheduleSettings(schedule_cycles=4, schedule_shape="linear")
    built = NoiseSchedule.from_settings(settings, lr_start=2.0, lr_end=1.0, temperature_start=1.0,
                                        temperature_end=0.5)
    assert (built.cycles, built.shape, built.at(1).learning_rate) == (4, "linear", pytest.approx(2.0 - 1 / 3))


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lively_model(tiny_model_and_tokenizer):
    """The tiny model with large random weights: its greedy outputs vary with the context (the fresh
    init emits one token forever, which would make token-equality tests vacuous)."""
    model, tokenizer = tiny_model_and_tokenizer
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model.eval(), tokenizer


PROMPTS = [
    [{"role": "user", "content": "the quiet morning"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "I remembered a long meeting and the broken build, and nothing changed."},
    ],
    [{"role": "user", "content": "an old letter"}],
    [{"role": "user", "content": "We laughed at the garden after rain with real warmth, and it was good."}],
]


def test_batched_greedy_equals_one_at_a_time(lively_model):
    model, tok = lively_model
    batched = generate_responses(model, tok, PROMPTS, k=2, temperature=0.0, max_new_tokens=10, batch_size=3)
    naive = generate_one_at_a_time(model, tok, PROMPTS, k=2, temperature=0.0, max_new_tokens=10)
    assert [(r.prompt_index, r.sample_index) for r in batched] == [(i, j) for i in range(4) for j in range(2)]
    assert [r.completion_ids for r in batched] == [r.completion_ids for r in naive]
    assert len({tuple(r.completion_ids) for r in batched}) == 4  # greedy: the k samples repeat
    assert all(r.prompt_ids == encode_prompt(tok, PROMPTS[r.prompt_index]) for r in batched)
    assert batched[0].text == tok.decode(batched[0].completion_ids, skip_special_tokens=True).strip()


def test_left_padding_does_not_change_the_completion(lively_model):
    model, tok = lively_model
    short = [PROMPTS[0]]
    alone = generate_responses(model, tok, short, k=1, temperature=0.0, max_new_tokens=12)[0]
    padded = generate_responses(
        model, tok, [PROMPTS[0], PROMPTS[3]], k=1, temperature=0.0, max_new_tokens=12
    )[0]
    assert len(encode_prompt(tok, PROMPTS[3])) > len(alone.prompt_ids) + 5  # really padded
    assert padded.completion_ids == alone.completion_ids
    assert tok.padding_side == "right"  # untouched


def test_completions_end_at_eos_without_padding(lively_model):
    model, tok = lively_model
    probe = generate_responses(model, tok, PROMPTS, k=1, temperature=0.0, max_new_tokens=12)
    # Make a token the model emits mid-way an EOS: rows stop at different lengths and get padded.
    stop = probe[0].completion_ids[3]
    model = copy.deepcopy(model)
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    out = generate_responses(model, tok, PROMPTS, k=1, temperature=0.0, max_new_tokens=12)
    naive = generate_one_at_a_time(model, tok, PROMPTS, k=1, temperature=0.0, max_new_tokens=12)
    assert [r.completion_ids for r in out] == [r.completion_ids for r in naive]
    assert out[0].completion_ids == probe[0].completion_ids[: probe[0].completion_ids.index(stop) + 1]
    for r in out:
        ids = r.completion_ids
        assert r.finished == (ids[-1] in (stop, tok.eos_token_id))
        assert all(t not in (stop, tok.eos_token_id) for t in ids[:-1])  # cut at the first EOS
        assert r.finished or len(ids) == 12
    assert len({len(r.completion_ids) for r in out}) > 1


def test_tokenizer_without_pad_token_pads_with_eos(lively_model):
    model, tok = lively_model
    reference = generate_responses(model, tok, PROMPTS, k=1, temperature=0.0, max_new_tokens=8)
    gpt2_style = copy.deepcopy(tok)
    gpt2_style.pad_token = None
    assert gpt2_style.pad_token_id is None
    out = generate_responses(model, gpt2_style, PROMPTS, k=1, temperature=0.0, max_new_tokens=8)
    assert [r.completion_ids for r in out] == [r.completion_ids for r in reference]


def test_gpt2_without_pad_token_generates_and_scores(tiny_texts):
    from transformers import GPT2Config, GPT2LMHeadModel

    from carl_assets.models.loading import train_tokenizer

    tok = train_tokenizer(tiny_texts, vocab_size=512)
    tok.pad_token = None
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=512,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        initializer_range=0.3,
    )
    model = GPT2LMHeadModel(config).eval()
    batched = generate_responses(model, tok, PROMPTS, k=2, temperature=0.0, max_new_tokens=6)
    naive = generate_one_at_a_time(model, tok, PROMPTS, k=2, temperature=0.0, max_new_tokens=6)
    assert [r.completion_ids for r in batched] == [r.completion_ids for r in naive]
    sampled = generate_responses(model, tok, PROMPTS, k=2, temperature=1.0, max_new_tokens=6)
    shared = CarlScorer()(model, tok, sampled)
    separate = CarlScorer()._score_separately(model, tok, sampled)
    np.testing.assert_allclose(shared["carl"], separate["carl"], rtol=1e-6)
    assert np.ptp(shared["carl"]) > 1e-4


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(lively_model):
    model, tok = lively_model
    state = torch.random.get_rng_state()
    a = generate_responses(
        model, tok, PROMPTS[:2], k=3, temperature=1.0, max_new_tokens=8, seed=5, min_new_tokens=8
    )
    assert torch.equal(state, torch.random.get_rng_state())
    b = generate_responses(model, tok, PROMPTS[:2], k=3, temperature=1.0, max_new_tokens=8, seed=5)
    c = generate_responses(model, tok, PROMPTS[:2], k=3, temperature=1.0, max_new_tokens=8, seed=6)
    assert all(len(r.completion_ids) == 8 for r in a)
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]
    assert len({tuple(r.completion_ids) for r in a[:3]}) == 3  # k distinct samples of one prompt
    model.train()
    generate_responses(model, tok, PROMPTS[:1], k=1, temperature=1.0, max_new_tokens=2)
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="k .* must be >= 1"):
        generate_responses(model, tok, PROMPTS, k=0, temperature=1.0, max_new_tokens=4)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def responses(lively_model):
    model, tok = lively_model
    out = generate_responses(model, tok, PROMPTS, k=2, temperature=1.0, max_new_tokens=9, seed=3)
    finished = out[1]
    out.append(
        GeneratedResponse(
            0,
            8,
            finished.text,
            finished.prompt_ids,
            finished.completion_ids + [tok.eos_token_id],
            finished=True,
        )
    )  # a trailing EOS: read by CARL, not by the steering mean
    out.append(GeneratedResponse(0, 9, "", out[0].prompt_ids, []))  # an empty completion
    return out


def test_carl_scorer_equals_carl_reward_on_the_predicting_logits(lively_model, responses):
    model, tok = lively_model
    scores = CarlScorer(batch_size=3)(model, tok, responses)
    assert set(scores) == {"carl", "phi_mean", "gate_open"}
    for i, r in enumerate(responses[:-1]):
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double().numpy()
        start = len(r.prompt_ids) - 1  # the position that predicts the first completion token
        expected, parts = carl_reward(
            logits[start : start + len(r.completion_ids)], np.array(r.completion_ids)
        )
        assert scores["carl"][i] == pytest.approx(expected, abs=1e-5)
        assert scores["phi_mean"][i] == pytest.approx(parts["phi_mean"], abs=1e-5)
        assert scores["gate_open"][i] == float(coherence_gate(scores["phi_mean"][i])[0])
    assert (scores["carl"][-1], scores["phi_mean"][-1], scores["gate_open"][-1]) == (0.0, 0.0, 0.0)
    # The path without a shared prompt cache (score_completions itself) gives the same numbers.
    separate = CarlScorer(batch_size=3)._score_separately(model, tok, responses)
    for key in scores:
        np.testing.assert_allclose(scores[key], separate[key], rtol=1e-6, atol=1e-7)


def _random_vectors(hidden: int, layers=(1, 2)) -> SteeringVectors:
    generator = torch.Generator().manual_seed(0)
    vectors = {}
    for layer in layers:
        v = torch.randn(2, hidden, generator=generator)
        vectors[layer] = v / v.norm(dim=-1, keepdim=True)
    return SteeringVectors(concepts=["warmth", "calm"], layers=list(layers), vectors=vectors)


def _hand_projection(model, response: GeneratedResponse, vector: torch.Tensor, layer: int, eos: int) -> float:
    completion = response.completion_ids
    if len(completion) > 1 and completion[-1] == eos:
        completion = completion[:-1]
    captured = {}
    block = find_decoder_blocks(model)[layer - 1]
    handle = block.register_forward_hook(
        lambda _m, _i, out: captured.update(h=out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([response.prompt_ids + completion]))
    finally:
        handle.remove()
    hidden = captured["h"][0, len(response.prompt_ids) : len(response.prompt_ids) + len(completion)]
    return float(hidden.double().mean(dim=0) @ vector.double())


def test_steering_scorer_equals_a_hand_projection(lively_model, responses):
    model, tok = lively_model
    vectors = _random_vectors(model.config.hidden_size)
    deepest = SteeringScorer(vectors, "calm", batch_size=4)
    assert deepest.layer == 2
    values = deepest(model, tok, responses)["steering:calm"]
    for layer in (1, 2):
        values = SteeringScorer(vectors, "calm", layer=layer, batch_size=4)(model, tok, responses)[
            "steering:calm"
        ]
        expected = [
            _hand_projection(model, r, vectors.vectors[layer][1], layer, tok.eos_token_id)
            for r in responses[:-1]
        ]
        np.testing.assert_allclose(values[:-1], expected, rtol=1e-4, atol=1e-6)
        assert values[-1] == 0.0  # nothing to read
        assert np.std(values[:-1]) > 1e-3  # responses differ: the test is not comparing constants
        separate = SteeringScorer(vectors, "calm", layer=layer)._score_separately(model, tok, responses)
        np.testing.assert_allclose(values, separate["steering:calm"], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"unknown emotion 'joy'.*\['calm', 'warmth'\]"):
        SteeringScorer(vectors, "joy")
    with pytest.raises(ValueError, match="layer 7"):
        SteeringScorer(vectors, "calm", layer=7)


def test_parse_scorer_spec_weights_and_errors(lively_model, responses):
    model, tok = lively_model
    vectors = _random_vectors(model.config.hidden_size)
    combined = parse_scorer_spec("carl:0.7, steering:warmth:0.3", steering_vectors=vectors)
    assert combined.weights == {"carl": 0.7, "steering:warmth": 0.3}
    out = combined(model, tok, responses)
    assert set(out) == {"carl", "phi_mean", "gate_open", "steering:warmth", "score"}
    np.testing.assert_allclose(out["score"], 0.7 * out["carl"] + 0.3 * out["steering:warmth"], rtol=1e-12)
    np.testing.assert_allclose(out["carl"], CarlScorer()(model, tok, responses)["carl"], rtol=1e-12)
    assert parse_scorer_spec("carl").weights == {"carl": 1.0}
    assert parse_scorer_spec("steering:calm", vectors).weights == {"steering:calm": 1.0}
    for spec, message in [
        ("", "empty scorer spec"),
        ("carl,,steering:calm", "bad scorer spec part ''"),
        ("bogus:1", "unknown scorer 'bogus'"),
        ("steering", "steering:<emotion>"),
        ("carl:extra", "carl takes no arguments"),
        ("steering:joy", "unknown emotion 'joy'"),
        ("carl:nan", "must be finite"),
        ("carl,carl:2", "names a scorer twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_scorer_spec(spec, steering_vectors=vectors)
    with pytest.raises(ValueError, match="needs steering vectors"):
        parse_scorer_spec("steering:warmth")


# --------------------------------------------------------------------------------------------
# Statistics, the inverse diagnostic and one cycle
# --------------------------------------------------------------------------------------------


def test_cycle_statistics_by_hand():
    frame = pd.DataFrame(
        {
            "dream_id": ["a", "a", "b", "b", "c"],
            "score": [0.5, 0.5, 0.1, 0.9, 0.3],
            "kept": [True, False, True, False, False],
        }
    )
    stats = cycle_statistics(frame)
    assert (stats["dreams"], stats["responses"], stats["kept"]) == (3, 5, 2)
    assert stats["reject_fraction"] == pytest.approx(0.6)
    assert stats["score_mean"] == pytest.approx(0.46) and stats["score_std"] == pytest.approx(
        np.std(frame["score"])
    )
    assert stats["no_signal_fraction"] == pytest.approx(2 / 3)  # a (all alike) and c (one response)
    assert stats["score_spread_mean"] == pytest.approx(0.8 / 3)
    assert cycle_statistics(frame.iloc[:0])["responses"] == 0


class _LengthScorer:
    """Scores a response by its number of completion tokens: a known, controllable score."""

    primary = "length"

    def __call__(self, model, tokenizer, responses):
        return {"length": np.array([float(len(r.completion_ids)) for r in responses])}


def test_inverse_diagnostic_passes_what_the_filter_minimum_keeps(lively_model, sample_graph):
    model, tok = lively_model
    held = heldout_collisions(
        sample_graph.nodes, sample_graph.edges, 3, seed=11, min_memories=2, max_memories=3
    )
    rate, rows = inverse_diagnostic_pass_rate(
        model, tok, held, _LengthScorer(), min_score=6, max_new_tokens=6, batch_size=8, excerpt_chars=40
    )
    assert rows["dream_id"].tolist() == [c.dream_id for c in held]
    expected = (rows["response"].str.len() > 0) & (rows["length"] >= 6)
    assert rows["passed"].tolist() == expected.tolist() and rate == pytest.approx(expected.mean())
    rate_high, _ = inverse_diagnostic_pass_rate(
        model, tok, held, _LengthScorer(), min_score=7, max_new_tokens=6, batch_size=8, excerpt_chars=40
    )
    assert rate_high == 0.0


def test_dream_one_cycle(lively_model, sample_graph):
    model, tok = lively_model
    nodes, edges = sample_graph.nodes, sample_graph.edges
    config = DreamConfig(
        n_scenarios=5,
        responses_per_scenario=3,
        max_new_tokens=8,
        batch_size=2,
        excerpt_chars=50,
        top_fraction=0.5,
        seed=4,
    )
    held = heldout_collisions(
        nodes, edges, 20, config.walk, seed=77,
        min_memories=config.min_memories, max_memories=config.max_memories,
    )
    exclude = {c.node_set for c in held}
    calls = []
    result = dream(
        model,
        tok,
        nodes,
        edges,
        config,
        parse_scorer_spec("carl"),
        cycle=1,
        temperature=1.2,
        exclude=exclude,
        progress=lambda done, total: calls.append((done, total)),
    )
    frame = result.frame
    assert len(frame) == 15 and frame["dream_id"].nunique() == 5
    for column in (
        "dream_id",
        "cycle",
        "seed_node_ids",
        "prompt",
        "temperature",
        "response",
        "carl",
        "phi_mean",
        "gate_open",
        "score",
        "kept",
        "reason",
    ):
        assert column in frame.columns
    assert (frame["cycle"] == 1).all() and (frame["temperature"] == 1.2).all()
    assert not {frozenset(json.loads(x)) for x in frame["seed_node_ids"]} & exclude
    np.testing.assert_array_equal(frame["score"], frame["carl"])
    kept_per_dream = frame.groupby("dream_id")["kept"].sum()
    assert (kept_per_dream <= 2).all()  # ceil(0.5 * 3)
    first = json.loads(frame["prompt"].iloc[0])
    assert first == scenario_messages(result.collisions[0], excerpt_chars=50)
    assert calls[-1] == (5, 5) and result.statistics["responses"] == 15

    again = dream(
        model, tok, nodes, edges, config, parse_scorer_spec("carl"), cycle=1, temperature=1.2, exclude=exclude
    )
    pd.testing.assert_frame_equal(frame, again.frame)
    other = dream(model, tok, nodes, edges, config, parse_scorer_spec("carl"), cycle=2, temperature=1.2)
    assert set(other.frame["dream_id"]) != set(frame["dream_id"])


# --------------------------------------------------------------------------------------------
# On the default model: the steering scorer reads emotion from text
# --------------------------------------------------------------------------------------------

WARM_TEXTS = [
    "Elena wrapped a blanket around my shoulders and made us cocoa; we laughed softly until late.",
    "The whole team stayed after hours to help me, and their kindness felt like a fire in a cold room.",
    "My father hugged me at the station and said he was so glad to see me; I felt held and cosy.",
    "We shared bread and warm soup on the balcony, leaning close and telling gentle stories.",
    "Priya listened so kindly this evening that the room seemed to glow around us.",
]
NEUTRAL_TEXTS = [
    "The checkpoint migration script moved the files to the new folder in twelve minutes.",
    "I updated the evaluation harness config and reran the benchmark numbers after lunch.",
    "The tokenizer refactor changed three modules; the tests were rerun on the lab machine.",
    "The data cleaning script reads the CSV, drops blank rows and writes a parquet file.",
    "The layer sweep covers layers one to four with a batch size of thirty-two.",
]


@pytest.mark.slow
def test_steering_scorer_ranks_warm_text_above_neutral_on_the_default_model(tmp_path, sample_graph):
    from carl_assets.memory_graph import extract_training_pairs
    from carl_assets.models.loading import OfflineModelConfig, load_model_and_tokenizer, prepare_base_model
    from carl_assets.steering import default_layers, train_steering_vectors

    texts = sample_graph.nodes["text"].astype(str).tolist()
    prepare_base_model("offline", texts, tmp_path / "model", OfflineModelConfig())
    model, tok = load_model_and_tokenizer(tmp_path / "model")
    vectors = train_steering_vectors(
        model,
        tok,
        extract_training_pairs(sample_graph),
        layers=default_layers(model.config.num_hidden_layers),
        reduction="mean",
    )
    stats = vectors.stats
    auc = float(
        stats[(stats["emotion"] == "warmth") & (stats["layer"] == max(vectors.layers))]["heldout_auc"].iloc[0]
    )
    assert auc > 0.8  # warmth is one of the emotions the readout separates well on this model

    prompt = encode_prompt(tok, [{"role": "user", "content": "Tell me about your day."}])

    def as_responses(items):
        return [
            GeneratedResponse(i, 0, t, prompt, tok(t, add_special_tokens=False)["input_ids"])
            for i, t in enumerate(items)
        ]

    scorer = SteeringScorer(vectors, "warmth")
    warm = scorer(model, tok, as_responses(WARM_TEXTS))["steering:warmth"]
    neutral = scorer(model, tok, as_responses(NEUTRAL_TEXTS))["steering:warmth"]
    margin = float(warm.mean() - neutral.mean())
    print(
        f"warmth projection: warm {warm.mean():.3f} vs neutral {neutral.mean():.3f}, margin {margin:.3f}, "
        f"held-out AUC {auc:.3f}"
    )
    assert margin > 0, (warm, neutral)


def test_dream_without_usable_walks_returns_an_empty_frame(lively_model):
    model, tok = lively_model
    nodes = _nodes(["r1", "r2"], ["reflection", "lesson"])  # no edges: every walk stays home
    result = dream(
        model,
        tok,
        nodes,
        _edges([]),
        DreamConfig(n_scenarios=3, max_new_tokens=48, top_fraction=0.5),
        parse_scorer_spec("carl"),
        cycle=0,
        temperature=1.0,
    )
    assert result.frame.empty and result.collisions == []
    assert {"dream_id", "response", "score", "kept", "reason"} <= set(result.frame.columns)
    assert result.statistics["responses"] == 0


# --------------------------------------------------------------------------------------------
# Conditioning kinds: the graph's own by default, recency-weighted starts, too few scenarios
# --------------------------------------------------------------------------------------------

DEFAULT_KINDS_CASES = Path(__file__).parent / "data" / "dreams_default_kinds"  # ../shared/cases real-10


def _case(name: str):
    return load_graph(f"jsonl:{DEFAULT_KINDS_CASES / name}")


def test_auto_kinds_prefer_reflection_and_lesson(sample_graph):
    assert auto_conditioning_kinds(sample_graph.nodes) == REFLECTIVE  # the sample graph dreams as before
    # 8 lessons (the minimum) among 30 journals: lessons only, though journals are more numerous
    nodes = _nodes([f"n{i}" for i in range(38)], ["lesson"] * 8 + ["journal"] * 30)
    assert auto_conditioning_kinds(nodes) == ("lesson",)
    assert {w[0] for w in random_walks(nodes, _edges([]), 16, WalkConfig())} == {f"n{i}" for i in range(8)}


def test_auto_kinds_without_lessons_are_the_most_populous_covering_half():
    # real-10 no_lesson: person/project/task/topic, 6 nodes each; ties are taken together -> all four
    no_lesson = _case("memory_no_lesson.jsonl").nodes
    assert kind_counts(no_lesson) == {"person": 6, "project": 6, "task": 6, "topic": 6}
    assert auto_conditioning_kinds(no_lesson) == ("person", "project", "task", "topic")
    # real-10 one_lesson: 1 lesson (< 8) + person 6, task 6, topic 6, project 5 of 24. Half is 12: person and
    # task reach it, topic ties with task, project (5) does not; the lesson is kept.
    one_lesson = _case("memory_one_lesson.jsonl").nodes
    assert auto_conditioning_kinds(one_lesson) == ("lesson", "person", "task", "topic")
    # 10 a, 5 b, 3 c, 2 d: a alone covers half
    nodes = _nodes([f"n{i}" for i in range(20)], ["a"] * 10 + ["b"] * 5 + ["c"] * 3 + ["d"] * 2)
    assert auto_conditioning_kinds(nodes) == ("a",)
    assert auto_conditioning_kinds(nodes.iloc[1:]) == ("a", "b")  # 9 of 19 is less than half


def test_one_lesson_graph_dreams_from_its_own_kinds_with_the_full_heldout_set():
    graph = _case("memory_one_lesson.jsonl")
    plan = plan_heldout(graph.nodes, graph.edges, 8, 32, WalkConfig(), min_memories=2, max_memories=3)
    assert plan.pool == 40 and len(plan.collisions) == 8 and not plan.shrunk
    config = DreamConfig(n_scenarios=32, walk=WalkConfig())
    collisions, _ = loop_dream_scenarios(
        graph.nodes, graph.edges, config, cycle=0, exclude={c.node_set for c in plan.collisions}
    )
    assert len(collisions) == 32
    kinds = {c.kinds[0] for c in collisions}
    assert kinds <= {"lesson", "person", "task", "topic"} and len(kinds) >= 3


def test_explicit_kinds_are_honoured():
    graph = _case("memory_no_lesson.jsonl")
    walks = random_walks(graph.nodes, graph.edges, 50, WalkConfig(conditioning_kinds=("topic",)))
    kind_of = dict(zip(graph.nodes["node_id"], graph.nodes["kind"], strict=True))
    assert {kind_of[w[0]] for w in walks} == {"topic"}
    assert WalkConfig(conditioning_kinds="auto").conditioning_kinds == []
    assert WalkConfig(conditioning_kinds="topic").conditioning_kinds == ["topic"]
    assert WalkConfig(conditioning_kinds=("a", "b")).conditioning_kinds == ["a", "b"]
    from carl_assets.defs.dreams import DreamScenariosConfig

    assert DreamScenariosConfig().dream_config().walk.conditioning_kinds == []  # auto by default
    set_kinds = DreamScenariosConfig(conditioning_kinds=["paper", "topic"]).dream_config().walk
    assert set_kinds.conditioning_kinds == ["paper", "topic"]


def test_stubs_never_start_nor_join_a_collision_but_walks_pass_through():
    # s1/s2 are stubs of the most populous kind; the only way from p1 to p2 is through s1
    nodes = _nodes(["p1", "s1", "p2", "s2", "s3"], ["project", "entity", "project", "entity", "entity"])
    nodes["is_stub"] = [False, True, False, True, True]
    edges = _edges([("p1", "s1", "r"), ("s1", "p2", "r")])
    assert kind_counts(nodes) == {"project": 2} and auto_conditioning_kinds(nodes) == ("project",)
    config = WalkConfig(restart_prob=0.0, walk_length=2, directed=True, seed=0)
    walks = random_walks(nodes, edges, 10, config)
    assert {w[0] for w in walks} == {"p1", "p2"} and ["p1", "s1", "p2"] in walks
    collisions = collide(walks, nodes, min_memories=2, max_memories=3, seed=0)
    assert [c.node_ids for c in collisions] == [("p1", "p2")]
    with pytest.raises(NoWalkStartError, match=r"\['entity'\].*\{'project': 2\}"):
        random_walks(nodes, edges, 3, WalkConfig(conditioning_kinds=("entity",)))


def _dated(days_before_newest, lines=None):
    ids = [f"n{i}" for i in range(len(days_before_newest))]
    nodes = _nodes(ids, ["project"] * len(ids), lines)
    newest = pd.Timestamp("2026-06-30T12:00:00Z")
    nodes["updated_at"] = [None if d is None else newest - pd.Timedelta(days=d) for d in days_before_newest]
    return nodes


def test_recency_weighting_by_updated_at_sets_start_frequencies():
    # ages 0, 30, 60 days with a 30-day half-life: weights 1, 1/2, 1/4 -> shares 4/7, 2/7, 1/7 of 700 walks
    nodes = _dated([0, 30, 60])
    config = WalkConfig(restart_prob=1.0, walk_length=1, seed=3)
    counts = pd.Series([w[0] for w in random_walks(nodes, _edges([]), 700, config)]).value_counts().to_dict()
    assert counts == {"n0": 400, "n1": 200, "n2": 100}
    # an undated node weighs as the oldest dated one: 1, 1/2, 1/4, 1/4 -> 350, 175, 87.5, 87.5 of 700
    with_undated = _dated([0, 30, 60, None])
    counts = pd.Series([w[0] for w in random_walks(with_undated, _edges([]), 700, config)]).value_counts()
    assert counts["n0"] == 350 and counts["n1"] == 175 and sorted([counts["n2"], counts["n3"]]) == [87, 88]
    # half-life <= 0, or no date at all (file order only, as before): equal shares
    flat = WalkConfig(restart_prob=1.0, walk_length=1, seed=3, recency_half_life_days=0.0)
    for frame, cfg in ((nodes, flat), (nodes.assign(updated_at=None), config)):
        shares = pd.Series([w[0] for w in random_walks(frame, _edges([]), 699, cfg)]).value_counts()
        assert shares.to_dict() == {"n0": 233, "n1": 233, "n2": 233}


def test_updated_at_decides_which_nodes_are_recent():
    # the file's last line (n2) was updated first; recent_nodes=2 keeps the two newest by date, not by line
    nodes = _dated([5, 0, 400, None])
    config = WalkConfig(restart_prob=1.0, walk_length=1, recent_nodes=2, recency_half_life_days=0.0)
    assert {w[0] for w in random_walks(nodes, _edges([]), 20, config)} == {"n0", "n1"}
    # without dates the later lines are the recent ones
    undated = nodes.assign(updated_at=None)
    assert {w[0] for w in random_walks(undated, _edges([]), 20, config)} == {"n2", "n3"}


def test_small_pool_shrinks_the_heldout_set():
    # real-10 one_lesson with kinds set to ['lesson']: the lesson's component is Item 00-01-02, so
    # the walks can make 3 collisions ({00,01}, {00,02}, {00,01,02}); held out: 3 // 4 = 0, so all 3 dream
    graph = _case("memory_one_lesson.jsonl")
    lesson = WalkConfig(conditioning_kinds=("lesson",))
    plan = plan_heldout(graph.nodes, graph.edges, 8, 32, lesson, min_memories=2, max_memories=3)
    assert (plan.pool, len(plan.collisions), plan.shrunk) == (3, 0, True)
    collisions, _ = loop_dream_scenarios(
        graph.nodes, graph.edges, DreamConfig(n_scenarios=32, walk=lesson), 0
    )
    assert sorted(sorted(c.node_ids) for c in collisions) == [
        ["Item 00", "Item 01"],
        ["Item 00", "Item 01", "Item 02"],
        ["Item 00", "Item 02"],
    ]
    # a larger pool keeps what it can: 12 found for 8 + 32 -> 3 held out
    ids = [f"n{i}" for i in range(5)]
    star = _nodes(ids, ["lesson"] + ["journal"] * 4)
    star_edges = _edges([("n0", x, "r") for x in ids[1:]])
    one = WalkConfig(conditioning_kinds=("lesson",))
    plan = plan_heldout(star, star_edges, 8, 32, one, min_memories=2, max_memories=3)
    assert plan.pool == 4 + 6 and len(plan.collisions) == 2  # C(4,1) + C(4,2) collisions; 10 // 4 = 2


def test_too_few_scenarios_fail_naming_the_config_field_and_the_kinds_present():
    import dagster as dg

    from carl_assets.defs.dreams import DreamScenariosConfig, kept_something_reason, plan_scenarios

    graph = _case("memory_no_lesson.jsonl")
    config = DreamScenariosConfig(conditioning_kinds=["reflection", "lesson"])
    with pytest.raises(dg.Failure) as failure:
        plan_scenarios(graph.nodes, graph.edges, config, config.dream_config())
    text = failure.value.description
    assert (
        "dream_scenarios.conditioning_kinds" in text
        and "ops.dream_scenarios.config.conditioning_kinds" in text
    )
    assert "{'person': 6, 'project': 6, 'task': 6, 'topic': 6}" in text and "['reflection', 'lesson']" in text
    assert failure.value.metadata["kinds_present"].value == {"person": 6, "project": 6, "task": 6, "topic": 6}
    # lessons without relations: starts exist, but no walk leaves them
    lonely = _nodes(["l1", "l2", "j1"], ["lesson", "lesson", "journal"])
    with pytest.raises(dg.Failure, match="no collision"):
        plan_scenarios(lonely, _edges([]), DreamScenariosConfig(), DreamScenariosConfig().dream_config())
    # auto on the same graph goes through
    auto = DreamScenariosConfig()
    kinds, plan = plan_scenarios(graph.nodes, graph.edges, auto, auto.dream_config())
    assert kinds == ("person", "project", "task", "topic") and plan.pool > 0

    # the blocking check's reason names what to change
    row = pd.Series({"conditioning_kinds": '["lesson"]', "scenario_pool": 3, "heldout_scenarios": 3})
    empty = pd.DataFrame({"response": [], "kept": []})
    assert "dream_scenarios.conditioning_kinds" in kept_something_reason(empty, row)
    rejected = pd.DataFrame({"response": ["a", "b"], "kept": [False, False]})
    assert "min_score" in kept_something_reason(rejected, row)
    blank = pd.DataFrame({"response": [" ", "b"], "kept": [True, True]})
    assert "max_new_tokens" in kept_something_reason(blank, row)
    assert kept_something_reason(pd.DataFrame({"response": ["b"], "kept": [True]}), row) is None


def test_dream_settings_refuse_a_bad_filter_share_or_too_few_memories_when_made():
    """top_fraction and max_memories are refused when the config is made, not after a cycle generated."""
    with pytest.raises(ValueError, match=r"top_fraction must lie in \(0, 1\], got 0.0"):
        DreamConfig(top_fraction=0.0)
    with pytest.raises(ValueError, match=r"top_fraction must lie in \(0, 1\], got 1.5"):
        DreamConfig(top_fraction=1.5)
    with pytest.raises(ValueError, match=r"max_memories must be at least 2 \(a scenario collides 2 or more "
                       r"memories\), got 1"):
        DreamConfig(max_memories=1)
    with pytest.raises(ValueError, match="n_scenarios must be >= 1, got 0"):
        DreamConfig(n_scenarios=0)
    edge = DreamConfig(top_fraction=1.0, max_memories=2)  # the bounds themselves are fine
    assert (edge.top_fraction, edge.max_memories) == (1.0, 2)
