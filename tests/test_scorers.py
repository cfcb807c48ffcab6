"""The confidence scores (phi_mean, self_certainty, neg_entropy, mean_logprob) as dream scorers and GRPO
rewards, and the truncation of dream sampling (top-k, top-p, min-p)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from carl_assets.carl.confidence import (
    CONFIDENCE_SCORES,
    confidence_scores,
    confidence_scores_batch,
    empty_value,
    mean_vocab_logprob_from_hidden,
)
from carl_assets.carl.reward_fn import REWARD_NAMES, make_carl_reward_fn, make_reward_fn
from carl_assets.dreams.generation import GeneratedResponse, Sampling, generate_responses
from carl_assets.dreams.scoring import CarlScorer, TokenScorer, parse_scorer_spec

LN2 = math.log(2.0)


def test_hand_computed_values_on_two_positions():
    # position 0: uniform over 4 tokens; position 1: p = (1/2, 1/4, 1/8, 1/8); tokens 2 then 0
    logits = np.log(np.array([[1.0, 1.0, 1.0, 1.0], [4.0, 2.0, 1.0, 1.0]]))
    scores = confidence_scores(logits, np.array([2, 0]))
    # H0 = ln 4 = 2 ln2, H1 = (1/2)ln2 + (1/4)2ln2 + (1/4)3ln2 = 1.75 ln2
    assert scores["neg_entropy"] == pytest.approx(-(2.0 + 1.75) / 2 * LN2, abs=1e-12)
    # Phi0 = 0, Phi1 = 1 - 1.75 ln2 / (2 ln2) = 0.125
    assert scores["phi_mean"] == pytest.approx(0.0625, abs=1e-12)
    # KL(U||p0) = 0; KL(U||p1) = -ln4 - mean(ln p1) = -2ln2 + (1+2+3+3)/4 ln2 = 0.25 ln2
    assert scores["self_certainty"] == pytest.approx(0.125 * LN2, abs=1e-12)
    # log p0(2) = -2 ln2, log p1(0) = -ln2
    assert scores["mean_logprob"] == pytest.approx(-1.5 * LN2, abs=1e-12)


def test_empty_completion_scores_like_a_uniform_distribution():
    empty = confidence_scores(np.zeros((0, 8)), np.zeros(0, dtype=int))
    uniform = confidence_scores(np.zeros((3, 8)), np.array([1, 2, 3]))
    for name in CONFIDENCE_SCORES:
        assert empty[name] == pytest.approx(uniform[name], abs=1e-12) == pytest.approx(empty_value(name, 8))
    assert empty_value("mean_logprob", 8) == pytest.approx(-math.log(8))
    with pytest.raises(ValueError, match="unknown confidence score"):
        empty_value("carl", 8)
    with pytest.raises(ValueError, match="token ids"):
        confidence_scores(np.zeros((2, 4)), np.array([0, 4]))


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_torch_equals_numpy_with_garbage_in_the_padding(side):
    rng = np.random.default_rng(0)
    lengths, width, vocab = [5, 1, 3, 0], 6, 11
    logits = np.full((len(lengths), width, vocab), 1e4)  # padding holds absurd values ...
    logits[:, :, 0] = np.nan  # ... and NaN
    ids = np.full((len(lengths), width), -100)
    mask = np.zeros((len(lengths), width), dtype=bool)
    rows = []
    for b, n in enumerate(lengths):
        row_logits, row_ids = rng.normal(scale=3.0, size=(n, vocab)), rng.integers(0, vocab, n)
        span = slice(0, n) if side == "right" else slice(width - n, width)
        logits[b, span], ids[b, span], mask[b, span] = row_logits, row_ids, True
        rows.append(confidence_scores(row_logits, row_ids))
    batch = confidence_scores_batch(torch.tensor(logits), torch.tensor(ids), torch.tensor(mask))
    for name in CONFIDENCE_SCORES:
        np.testing.assert_allclose(batch[name].numpy(), [r[name] for r in rows], rtol=1e-10, atol=1e-12)


def test_mean_vocab_logprob_from_hidden_matches_log_softmax():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 37, bias=True).double()
    hidden = torch.randn(10, 8, dtype=torch.float64) * 4
    for softcap, scale in ((None, 1.0), (5.0, 0.5)):
        logits = head(hidden) * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        expected = torch.log_softmax(logits, dim=-1).mean(dim=-1)
        got = mean_vocab_logprob_from_hidden(
            hidden, head, softcap=softcap, logit_scale=scale, rows_per_chunk=3
        )
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # logits are taken in float32


# --------------------------------------------------------------------------------------------
# On a tiny model: the positions that predict the completion
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lively(tiny_model_and_tokenizer):
    """The tiny model with large random weights, so that its distributions are far from uniform."""
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
]


@pytest.fixture(scope="module")
def sampled(lively):
    model, tok = lively
    out = generate_responses(model, tok, PROMPTS, k=2, temperature=1.0, max_new_tokens=7, seed=3)
    out.append(GeneratedResponse(0, 9, "", out[0].prompt_ids, []))  # an empty completion
    return out


def _reference(model, response: GeneratedResponse) -> dict[str, float]:
    ids = torch.tensor([response.prompt_ids + response.completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double().numpy()
    start = len(response.prompt_ids) - 1  # the position that predicts the first completion token
    return confidence_scores(
        logits[start : start + len(response.completion_ids)], np.array(response.completion_ids)
    )


def test_token_scorer_reads_the_predicting_positions(lively, sampled):
    model, tok = lively
    names = tuple(REWARD_NAMES)
    scores = TokenScorer(names, batch_size=2)(model, tok, sampled)
    assert set(scores) == set(names)
    vocab = model.get_output_embeddings().weight.shape[0]
    for i, response in enumerate(sampled[:-1]):
        expected = _reference(model, response)
        for name in CONFIDENCE_SCORES:
            assert scores[name][i] == pytest.approx(expected[name], abs=1e-5), (name, i)
    for name in CONFIDENCE_SCORES:
        assert scores[name][-1] == pytest.approx(empty_value(name, vocab))
    carl = CarlScorer(batch_size=2)(model, tok, sampled)
    np.testing.assert_allclose(scores["carl"], carl["carl"], rtol=1e-9)
    np.testing.assert_allclose(scores["phi_mean"], carl["phi_mean"][:-1].tolist() + [0.0], atol=1e-9)
    separate = TokenScorer(names, batch_size=2)._score_separately(model, tok, sampled)
    for name in names:
        np.testing.assert_allclose(separate[name], scores[name], rtol=1e-5, atol=1e-6)


def test_scores_do_not_depend_on_the_batch_or_its_padding(lively, sampled):
    model, tok = lively
    scorer = TokenScorer(("self_certainty", "mean_logprob", "neg_entropy"), batch_size=32)
    together = scorer(model, tok, sampled)
    for i in (0, 3, 5):  # alone: no padding at all
        alone = scorer(model, tok, [sampled[i]])
        for name in scorer.names:
            assert alone[name][0] == pytest.approx(together[name][i], abs=1e-5)
    shuffled = [sampled[i] for i in (5, 2, 0, 6, 1, 4, 3)]  # other neighbours, other padding widths
    again = scorer(model, tok, shuffled)
    for j, i in enumerate((5, 2, 0, 6, 1, 4, 3)):
        for name in scorer.names:
            assert again[name][j] == pytest.approx(together[name][i], abs=1e-5)


def test_scorer_spec_names_the_new_scorers(lively, sampled):
    model, tok = lively
    combined = parse_scorer_spec("self_certainty:0.5, carl:0.5")
    out = combined(model, tok, sampled)
    np.testing.assert_allclose(out["score"], 0.5 * out["self_certainty"] + 0.5 * out["carl"], rtol=1e-12)
    assert parse_scorer_spec("mean_logprob").weights == {"mean_logprob": 1.0}
    with pytest.raises(ValueError, match="self_certainty"):
        parse_scorer_spec("certainty")
    with pytest.raises(ValueError, match="takes no arguments"):
        parse_scorer_spec("neg_entropy:x")
    with pytest.raises(ValueError, match="distinct names"):
        TokenScorer(("phi_mean", "phi_mean"))


def test_reward_functions_are_named_and_score_what_the_scorer_scores(lively, sampled):
    model, tok = lively
    prompts = [PROMPTS[r.prompt_index] for r in sampled[:-1]]
    completions = [r.text for r in sampled[:-1]]
    ids = [r.completion_ids for r in sampled[:-1]]
    scorer = TokenScorer(tuple(REWARD_NAMES))(model, tok, sampled[:-1])
    for name in REWARD_NAMES:
        fn = make_reward_fn(name, model, tok, min_chars=0)
        assert fn.__name__ == name
        np.testing.assert_allclose(
            fn(prompts, completions, completion_ids=ids), scorer[name], rtol=1e-5, atol=1e-6
        )
    vocab = model.get_output_embeddings().weight.shape[0]
    empty = make_reward_fn("mean_logprob", model, tok)([PROMPTS[0]], [""], completion_ids=[[]])
    assert empty == [pytest.approx(-math.log(vocab))]  # never above a real answer, unlike 0.0
    assert make_carl_reward_fn(model, tok)([PROMPTS[0]], [""], completion_ids=[[]]) == [
        0.0
    ]  # the reference's rule
    with pytest.raises(ValueError, match="unknown reward"):
        make_reward_fn("rouge", model, tok)


# --------------------------------------------------------------------------------------------
# Truncated sampling
# --------------------------------------------------------------------------------------------


def test_sampling_settings_are_checked():
    assert Sampling().generate_kwargs() == {"top_k": 0, "top_p": 1.0}
    assert Sampling(top_p=0.9, min_p=0.05).generate_kwargs() == {"top_k": 0, "top_p": 0.9, "min_p": 0.05}
    for bad in ({"top_p": 0.0}, {"top_p": 1.5}, {"min_p": 1.0}, {"min_p": -0.1}, {"top_k": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Sampling(**bad)


@pytest.mark.parametrize("sampling", [Sampling(top_k=1), Sampling(top_p=1e-6), Sampling(min_p=0.999)])
def test_truncation_to_one_token_is_greedy(lively, sampling):
    """Each truncation, set to keep only the likeliest token, must reproduce greedy decoding at any
    temperature; untruncated sampling at that temperature must not."""
    model, tok = lively
    greedy = generate_responses(model, tok, PROMPTS, k=1, temperature=0.0, max_new_tokens=8)
    truncated = generate_responses(
        model, tok, PROMPTS, k=2, temperature=2.0, max_new_tokens=8, seed=4, sampling=sampling
    )
    assert [r.completion_ids for r in truncated] == [g.completion_ids for g in greedy for _ in range(2)]
    plain = generate_responses(model, tok, PROMPTS, k=2, temperature=2.0, max_new_tokens=8, seed=4)
    assert [r.completion_ids for r in plain] != [r.completion_ids for r in truncated]


def test_dream_config_takes_the_models_defaults_unless_set():
    from carl_assets.defs.dreams import DreamScenariosConfig
    from carl_assets.models.defaults import dream_sampling_defaults, scorer_defaults

    config = DreamScenariosConfig()
    # the offline model keeps its tuned, untruncated schedule and the reference's CARL
    assert config.sampling(offline=True) == Sampling()
    assert (config.schedule(True).temperature_start, config.schedule(True).temperature_end) == (1.3, 0.7)
    assert config.scorer_spec(offline=True) == "carl"
    real = dream_sampling_defaults(offline=False)
    assert config.sampling(offline=False) == Sampling(top_k=real.top_k, top_p=real.top_p, min_p=real.min_p)
    assert config.schedule(False).temperature_start == real.temperature_start
    assert config.scorer_spec(offline=False) == scorer_defaults(offline=False).dream_scorer
    assert config.dream_config(offline=False).sampling.top_p == real.top_p < 1.0
    chosen = DreamScenariosConfig(scorer="carl", top_p=1.0, min_p=0.0, temperature_start=1.3)
    assert chosen.scorer_spec(offline=False) == "carl" and chosen.sampling(offline=False) == Sampling()
    assert chosen.schedule(False).temperature_start == 1.3
