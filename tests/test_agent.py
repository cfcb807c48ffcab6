"""The coherence-gated agent step: alignment of logits and tokens, the gate, and the evaluation table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carl_assets.carl import SIGMA, carl_reward, coherence_gate
from carl_assets.carl.agent import EVALUATION_COLUMNS, agent_step, evaluate_agent, summarise_evaluation
from carl_assets.carl.sft_data import SYSTEM_PROMPT, user_message

OBSERVATION = "We walked by the river and talked for hours."
INSTRUCTION = "Which feelings does this memory carry?"


def _by_hand(model, tokenizer, max_new_tokens):
    """The reference's agent step written out: chat template, greedy generate, logits predicting the new
    tokens."""
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user_message(OBSERVATION, INSTRUCTION)},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        logits = model(out).logits[0].double().numpy()
    start = input_ids.shape[1]
    new = out[0, start:].numpy()
    return logits[start - 1 : -1], new, logits


@pytest.mark.parametrize("threshold, acts", [(0.0, True), (1.01, False)])
def test_agent_step_gate_and_phi(tiny_model_and_tokenizer, threshold, acts):
    model, tokenizer = tiny_model_and_tokenizer
    step = agent_step(model, tokenizer, OBSERVATION, INSTRUCTION, gate_threshold=threshold, max_new_tokens=12)
    scored_logits, new_tokens, _ = _by_hand(model, tokenizer, 12)
    assert step.n_tokens == len(new_tokens) > 0
    reward, components = carl_reward(scored_logits, new_tokens)
    assert step.phi_mean == pytest.approx(components["phi_mean"], abs=1e-9)
    assert step.reward == pytest.approx(reward, abs=1e-9)
    assert step.components["multiscale"] == pytest.approx(components["multiscale"], abs=1e-9)
    assert 0.0 < step.phi_mean < 1.0
    assert step.acted is acts
    if acts:
        assert step.response == step.raw_response and step.confidence in {"high", "medium", "low"}
        assert step.confidence == coherence_gate(step.phi_mean, threshold)[1]
    else:
        assert step.response is None and step.confidence == "abstain"
        assert step.raw_response == tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def test_scored_positions_are_the_ones_that_predict_the_tokens(tiny_model_and_tokenizer):
    """Greedy decoding picks the argmax of the distribution that predicts each token: the scored slice must
    be that distribution (the reference's reward function was one position off)."""
    model, tokenizer = tiny_model_and_tokenizer
    scored_logits, new_tokens, all_logits = _by_hand(model, tokenizer, 10)
    assert (scored_logits.argmax(-1) == new_tokens).all()
    start = all_logits.shape[0] - len(new_tokens)
    shifted = all_logits[start : start + len(new_tokens)]  # the off-by-one slice
    assert not np.allclose(shifted, scored_logits)


def test_evaluate_agent_table_and_summary(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    tasks = [
        {
            "task_id": i,
            "node_id": f"n{i}",
            "observation": f"{OBSERVATION} Day {i}.",
            "instruction": INSTRUCTION,
            "expected": "Mostly warmth, then joy.",
        }
        for i in range(3)
    ]
    acting = evaluate_agent(model, tokenizer, tasks, gate_threshold=0.0, max_new_tokens=6)
    abstaining = evaluate_agent(model, tokenizer, tasks, gate_threshold=1.01, max_new_tokens=6)
    assert list(acting.columns) == EVALUATION_COLUMNS and len(acting) == 3
    assert acting["acted"].all() and acting["response"].notna().all()
    assert not abstaining["acted"].any() and abstaining["response"].isna().all()
    assert (abstaining["confidence"] == "abstain").all()
    np.testing.assert_allclose(acting["phi_mean"], abstaining["phi_mean"])  # the gate does not change Phi
    summary = summarise_evaluation(acting)
    assert summary["act_rate"] == 1.0 and summarise_evaluation(abstaining)["act_rate"] == 0.0
    assert summary["mean_reward"] == pytest.approx(float(acting["reward"].mean()))
    assert summary["exact_match_rate"] == 0.0  # a random model does not produce the expected answer
    assert SIGMA == 3 / 16


def test_agent_sampling_keywords_and_checks():
    from carl_assets.carl.agent import GREEDY, AgentSampling

    assert GREEDY.generate_kwargs() == {"do_sample": False}
    assert AgentSampling(temperature=0.7, top_p=0.9).generate_kwargs() == {
        "do_sample": True,
        "temperature": 0.7,
        "top_k": 0,
        "top_p": 0.9,
    }
    assert AgentSampling(temperature=1.0, min_p=0.05).generate_kwargs()["min_p"] == 0.05
    for bad in ({"temperature": -0.1}, {"top_p": 0.0}, {"top_k": -1}, {"min_p": 1.0}):
        with pytest.raises(ValueError):
            AgentSampling(**bad)


def test_sampled_agent_step_top_k_1_is_greedy_and_seeds_repeat(tiny_model_and_tokenizer):
    from carl_assets.carl.agent import AgentSampling

    model, tokenizer = tiny_model_and_tokenizer
    greedy = agent_step(model, tokenizer, OBSERVATION, INSTRUCTION, gate_threshold=0.0, max_new_tokens=10)
    top1 = agent_step(
        model,
        tokenizer,
        OBSERVATION,
        INSTRUCTION,
        gate_threshold=0.0,
        max_new_tokens=10,
        sampling=AgentSampling(temperature=1.5, top_k=1, seed=3),
    )
    assert top1.raw_response == greedy.raw_response  # top-k 1 keeps only the argmax
    assert top1.phi_mean == pytest.approx(greedy.phi_mean, abs=1e-9)  # scored on the untempered logits
    hot = [
        agent_step(
            model,
            tokenizer,
            OBSERVATION,
            INSTRUCTION,
            gate_threshold=0.0,
            max_new_tokens=10,
            sampling=AgentSampling(temperature=2.0, seed=s),
        ).raw_response
        for s in (0, 0, 1, 2)
    ]
    assert hot[0] == hot[1]  # same seed, same answer
    assert len(set(hot)) > 1  # a random model sampled hot does not repeat itself across seeds
    state = torch.get_rng_state()
    agent_step(
        model, tokenizer, OBSERVATION, INSTRUCTION, max_new_tokens=4, sampling=AgentSampling(temperature=1.0)
    )
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
