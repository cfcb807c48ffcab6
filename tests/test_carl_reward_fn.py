"""The CARL reward function for TRL's GRPO: alignment, batching, edge cases, and a real GRPOTrainer step."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from carl_assets.carl import _prompt_ids, carl_reward, make_carl_reward_fn
from carl_assets.models.loading import build_tiny_model

TEXTS = [
    "The agent reads the page and clicks the submit button when the form is complete.",
    "Warmth and clarity grow when the memory graph links a reflection to its journal entry.",
    "A crystal forms when the distribution over tokens becomes sharply peaked and stays so.",
    "Chaos is a flat distribution; the order parameter measures how far from flat we are.",
    "Click the blue button. Type the name into the box. Press enter to confirm the choice.",
] * 4


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny_model(
        TEXTS, hidden_size=32, num_layers=2, num_heads=2, vocab_size=400, seed=0
    )
    with torch.no_grad():  # sharpen the random model so Phi spreads over [0, 1] and rewards vary
        model.get_output_embeddings().weight.mul_(6.0)
    return model, tokenizer


def by_hand(model, tokenizer, prompt, completion_ids):
    """The reference: one unpadded forward over prompt + completion, full logits, numpy carl_reward on
    the positions that predict the completion tokens (the reference's agent-step alignment)."""
    prompt_ids = _prompt_ids(tokenizer, prompt, {})
    ids = torch.tensor([prompt_ids + list(completion_ids)])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    model.train(was_training)
    start = len(prompt_ids) - 1
    return carl_reward(logits[start : start + len(completion_ids)].numpy(), np.asarray(completion_ids))


def test_reward_fn_matches_carl_reward_by_hand(tiny):
    model, tokenizer = tiny
    reward_fn = make_carl_reward_fn(model, tokenizer, chunk_size=5)
    assert reward_fn.__name__ == "carl"
    chat = [{"role": "user", "content": "Click the submit button."}]
    plain = "The order parameter"
    rng = np.random.default_rng(0)
    prompts = [chat, chat, plain, plain, chat]
    completion_ids = [rng.integers(0, len(tokenizer), size=n).tolist() for n in (1, 12, 7, 30, 3)]
    completion_ids[1][-1] = tokenizer.eos_token_id
    metrics = {}
    model.train()
    extra = {}
    rewards = reward_fn(
        prompts=prompts,
        completions=["a long text"] * 5,
        completion_ids=completion_ids,
        log_metric=lambda name, value: metrics.setdefault(name, value),
        log_extra=lambda column, values: extra.setdefault(column, values),
        trainer_state=None,
    )
    assert model.training  # train mode restored
    assert len(rewards) == 5 and all(isinstance(r, float) for r in rewards)
    expected = [by_hand(model, tokenizer, p, c) for p, c in zip(prompts, completion_ids, strict=True)]
    for got, (score, comps), got_comps in zip(rewards, expected, reward_fn.last_components, strict=True):
        assert abs(got - score) <= 1e-5
        for key, value in comps.items():
            assert abs(got_comps[key] - value) <= 1e-5, key
    assert np.std(rewards) > 1e-3  # the sharpened model gives different rewards
    for key in ("multiscale", "cloud_quality", "discontinuity", "phi_mean"):
        mean = np.mean([e[1][key] for e in expected])
        assert metrics[f"carl/{key}"] == pytest.approx(mean, abs=1e-5)
    assert metrics["carl/zeroed"] == 0.0
    assert extra["carl_phi_mean"] == pytest.approx([e[1]["phi_mean"] for e in expected], abs=1e-5)


def test_reward_fn_is_one_position_right_of_the_seed(tiny):
    """The position that predicts token t is len(prompt)-1+t; pairing logits[t] with token t (the reference's
    reward function) gives a different number."""
    model, tokenizer = tiny
    prompt = [{"role": "user", "content": "Type the name."}]
    completion = tokenizer("into the box", add_special_tokens=False)["input_ids"]
    reward = make_carl_reward_fn(model, tokenizer)(
        prompts=[prompt], completions=["into the box"], completion_ids=[completion]
    )[0]
    prompt_ids = _prompt_ids(tokenizer, prompt, {})
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + completion])).logits[0].double().numpy()
    start = len(prompt_ids)
    off_by_one = carl_reward(logits[start : start + len(completion)], np.asarray(completion))[0]
    aligned = carl_reward(logits[start - 1 : start - 1 + len(completion)], np.asarray(completion))[0]
    assert abs(reward - aligned) <= 1e-5 and abs(reward - off_by_one) > 1e-4


def test_reward_fn_without_completion_ids_tokenises_the_text(tiny):
    model, tokenizer = tiny
    fn = make_carl_reward_fn(model, tokenizer)
    text = "Press enter to confirm."
    prompt = [{"role": "user", "content": "Confirm."}]
    from_text = fn(prompts=[prompt], completions=[[{"role": "assistant", "content": text}]])[0]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert from_text == pytest.approx(by_hand(model, tokenizer, prompt, ids)[0], abs=1e-5)


def test_reward_fn_zero_with_reason_for_empty_out_of_vocab_and_non_finite(tiny, caplog):
    model, tokenizer = tiny
    fn = make_carl_reward_fn(model, tokenizer, min_chars=0)  # placeholder texts: judge by the ids alone
    metrics = {}
    prompts = ["Click", "Click", "Click"]
    with caplog.at_level(logging.WARNING, logger="carl_assets.carl"):
        rewards = fn(
            prompts=prompts,
            completions=["", "x", "ok"],
            completion_ids=[[], [len(tokenizer) + 5], [5, 6]],
            log_metric=lambda n, v: metrics.setdefault(n, v),
        )
    assert rewards[0] == 0.0 and rewards[1] == 0.0 and rewards[2] != 0.0
    assert "empty completion" in caplog.text and "outside the vocabulary" in caplog.text
    assert metrics["carl/zeroed"] == pytest.approx(2 / 3)
    assert metrics["carl/phi_mean"] == pytest.approx(fn.last_components[2]["phi_mean"])
    # an empty prompt is scored after the bos token (something must predict the first completion token)
    empty_prompt = fn(prompts=[""], completions=["ok"], completion_ids=[[5, 6]])[0]
    bos_context = by_hand(model, tokenizer, tokenizer.bos_token, [5, 6])[0]
    assert empty_prompt == pytest.approx(bos_context, abs=1e-5)

    broken, tok = build_tiny_model(TEXTS, hidden_size=16, num_layers=1, num_heads=2, vocab_size=300, seed=1)
    with torch.no_grad():
        broken.model.norm.weight.fill_(float("nan"))
    broken.train()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="carl_assets.carl"):
        rewards = make_carl_reward_fn(broken, tok, min_chars=0)(
            prompts=["a", "b"], completions=["", ""], completion_ids=[[4, 5, 6], [7]]
        )
    assert rewards == [0.0, 0.0] and "non-finite" in caplog.text
    assert broken.training


@pytest.mark.slow
def test_reward_fn_inside_a_real_grpo_trainer_step(tiny, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = tiny
    real = make_carl_reward_fn(model, tokenizer)
    calls = []

    def carl(prompts, completions, completion_ids, **kwargs):
        rewards = real(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        # the reference, computed at the same moment (before the optimizer step changes the weights)
        expected = [by_hand(model, tokenizer, p, c)[0] for p, c in zip(prompts, completion_ids, strict=True)]
        calls.append(
            {
                "rewards": rewards,
                "expected": expected,
                "prompts": prompts,
                "completion_ids": completion_ids,
                "kwargs": sorted(kwargs),
            }
        )
        return rewards

    dataset = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": "Click the submit button."}]},
            {"prompt": [{"role": "user", "content": "Type the name into the box."}]},
        ]
    )
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        beta=0.0,
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=10,
        max_steps=1,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        temperature=1.0,
    )
    torch.manual_seed(0)
    trainer = GRPOTrainer(
        model=model, processing_class=tokenizer, reward_funcs=[carl], args=args, train_dataset=dataset
    )
    trainer.train()

    assert len(calls) == 1
    call = calls[0]
    assert {"trainer_state", "log_metric"} <= set(call["kwargs"])
    assert len(call["rewards"]) == 4 and all(len(c) > 0 for c in call["completion_ids"])
    np.testing.assert_allclose(call["rewards"], call["expected"], atol=1e-5)
    # the prompt we re-tokenise is the one TRL generated from
    trl_prompt_ids, _, _ = trainer._tokenize_prompts(call["prompts"])
    for prompt, ids in zip(call["prompts"], trl_prompt_ids, strict=True):
        assert _prompt_ids(tokenizer, prompt, {}) == list(ids)
    logged = next(entry for entry in trainer.state.log_history if "rewards/carl/mean" in entry)
    assert logged["rewards/carl/mean"] == pytest.approx(np.mean(call["rewards"]), abs=1e-5)
    for key in ("carl/multiscale", "carl/cloud_quality", "carl/discontinuity", "carl/phi_mean"):
        assert key in logged and math.isfinite(logged[key]), key
        assert 0.0 <= logged[key] <= 1.0


def test_full_logits_fallback_and_bf16_model_give_the_same_rewards(tiny, monkeypatch):
    import copy

    from carl_assets.carl import completion_scores

    model, tokenizer = tiny
    prompts = ["Click", [{"role": "user", "content": "Type the name."}]]
    completion_ids = [[5, 9, 33, 2], [7, 7, 8, 100, 101, 3, 4]]
    tiled = make_carl_reward_fn(model, tokenizer, min_chars=0)(
        prompts=prompts, completions=["", ""], completion_ids=completion_ids
    )
    monkeypatch.setattr(completion_scores, "lm_head_parts", lambda m: (None, None, None, 1.0))
    full = make_carl_reward_fn(model, tokenizer, min_chars=0)(
        prompts=prompts, completions=["", ""], completion_ids=completion_ids
    )
    monkeypatch.undo()
    np.testing.assert_allclose(tiled, full, atol=1e-6)
    half = copy.deepcopy(model).to(torch.bfloat16)
    low = make_carl_reward_fn(half, tokenizer, min_chars=0)(
        prompts=prompts, completions=["", ""], completion_ids=completion_ids
    )
    expected = [by_hand(half, tokenizer, p, c)[0] for p, c in zip(prompts, completion_ids, strict=True)]
    np.testing.assert_allclose(low, expected, atol=2e-3)  # bf16 activations: batched vs unbatched rounding


def test_the_seeds_short_completion_and_token_cap_rules(tiny):
    model, tokenizer = tiny
    fn = make_carl_reward_fn(model, tokenizer)
    metrics = {}
    ids = [[5, 6, 7], [5, 6, 7], [5, 6, 7]]
    rewards = fn(
        prompts=["Click"] * 3,
        completions=["   ", "abcd", "abcde"],
        completion_ids=ids,
        log_metric=lambda n, v: metrics.setdefault(n, v),
    )
    assert rewards[0] == rewards[1] == 0.0 and rewards[2] != 0.0  # blank and < 5 characters score 0
    assert metrics["carl/short"] == pytest.approx(2 / 3)
    # only the first max_completion_tokens tokens are scored
    long_ids = list(range(5, 25))
    capped = make_carl_reward_fn(model, tokenizer, max_completion_tokens=8)(
        prompts=["Click"], completions=["long enough"], completion_ids=[long_ids]
    )[0]
    assert capped == pytest.approx(by_hand(model, tokenizer, "Click", long_ids[:8])[0], abs=1e-5)
