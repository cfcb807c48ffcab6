"""CARL maths: the numpy functions against a literal transcription of the reference, the batched and the
no-[B, T, V] torch paths against the numpy one, and the two gates."""

from __future__ import annotations

import math
import types
import warnings

import numpy as np
import pytest
import torch

from carl_assets import carl
from carl_assets.carl import (
    DEFECT_THRESHOLD,
    KAPPA,
    KAPPA_SIGMA,
    SIGMA,
    PhaseTransitionGate,
    carl_reward,
    carl_reward_batch,
    carl_reward_from_stats,
    coherence_gate,
    compute_phi,
    multiscale_coherence,
    t_star,
    token_stats_from_hidden,
    token_stats_from_logits,
)

# --------------------------------------------------------------------------------------------
# The reference's loop-form formulas, transcribed literally (reference only; float64 inputs)
# --------------------------------------------------------------------------------------------


def reference_compute_phi(logits):
    T, V = logits.shape
    log_vocab = math.log(V)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probs = exp / exp.sum(axis=-1, keepdims=True)
    entropy = -np.sum(probs * np.log(probs + 1e-10), axis=-1)
    phi = 1.0 - (entropy / log_vocab)
    return phi, probs, entropy


def reference_multiscale_coherence(phi):
    T = len(phi)
    if T < 2:
        return 0.5
    total_weight = 0.0
    weighted_sum = 0.0
    for j in range(min(int(math.log2(T)) + 1, 16)):
        block_size = 2**j
        if block_size > T:
            break
        n_blocks = T // block_size
        trimmed = phi[: n_blocks * block_size].reshape(n_blocks, block_size)
        coherence_j = max(0.0, min(1.0, 1.0 - float(np.mean(np.std(trimmed, axis=1)))))
        w_j = 2 ** (j / 2)
        weighted_sum += w_j * coherence_j
        total_weight += w_j
    return weighted_sum / total_weight if total_weight > 0 else 0.5


def reference_cloud_quality(phi, probs, token_ids):
    T = len(phi)
    if T == 0:
        return 0.0
    selected_probs = probs[np.arange(T), token_ids[:T]]
    return float(np.mean(selected_probs * phi))


def reference_discontinuity_score(phi):
    if len(phi) < 2:
        return 0.5
    delta = np.diff(phi)
    scores = []
    for k in range(len(delta)):
        dp = delta[k]
        if abs(dp) <= 0.03:
            continue
        prev = phi[k]
        if dp > 0.03:
            scores.append(0.8 if prev < 0.5 else 0.3)
        else:
            scores.append(0.2 if prev > 0.7 else 0.5)
    return sum(scores) / len(scores) if scores else 0.5


def reference_carl_reward(logits, token_ids):
    phi, probs, entropy = reference_compute_phi(logits)
    ms = reference_multiscale_coherence(phi)
    cq = reference_cloud_quality(phi, probs, token_ids)
    ds = reference_discontinuity_score(phi)
    composite = 0.5 * ms + 0.3 * cq + 0.2 * ds
    with warnings.catch_warnings():  # the reference's mean of an empty phi warns and gives NaN
        warnings.simplefilter("ignore")
        return composite, {
            "multiscale": ms,
            "cloud_quality": cq,
            "discontinuity": ds,
            "phi_mean": float(np.mean(phi)),
            "phi_std": float(np.std(phi)),
            "entropy_mean": float(np.mean(entropy)),
        }


# --------------------------------------------------------------------------------------------
# Random sequences whose Phi wanders over [0, 1], so every discontinuity branch is exercised
# --------------------------------------------------------------------------------------------


def random_logits(rng, length, vocab=40, dtype=np.float64):
    # a per-token temperature spread over ~3 decades: Phi from ~0 (flat) to ~1 (peaked)
    scale = np.exp(rng.uniform(-3.0, 3.5, size=(length, 1)))
    logits = rng.standard_normal((length, vocab)) * scale
    return logits.astype(dtype)


LENGTHS = [0, 1, 2, 3] + [n for k in (2, 3, 4, 5, 6, 7, 8, 9) for n in (2**k - 1, 2**k, 2**k + 1)]


def test_constants_match_the_seed():
    assert KAPPA == 64 / 3 and SIGMA == 0.1875 and KAPPA_SIGMA == 4.0 and DEFECT_THRESHOLD == 0.03
    assert KAPPA * SIGMA == pytest.approx(KAPPA_SIGMA)
    assert [t_star(d) for d in (384, 512, 768, 1024, 3072, 4096)] == [8192, 10922, 16384, 21845, 65536, 87381]


@pytest.mark.parametrize("length", LENGTHS)
def test_carl_reward_equals_the_seed_formulas(length):
    rng = np.random.default_rng(1000 + length)
    logits = random_logits(rng, length)
    ids = rng.integers(0, logits.shape[1], size=length)
    ids[: length // 3] = logits[: length // 3].argmax(-1)  # some selected tokens are the likely ones
    score, comps = carl_reward(logits, ids)
    ref_score, ref = reference_carl_reward(logits, ids)
    assert abs(score - ref_score) <= 1e-9
    for key in ("multiscale", "cloud_quality", "discontinuity"):
        assert abs(comps[key] - ref[key]) <= 1e-9, key
    if length == 0:  # documented: the reference's defaults, and 0.0 (not NaN) for the phi statistics
        assert score == pytest.approx(0.5 * 0.5 + 0.3 * 0.0 + 0.2 * 0.5)
        assert comps["phi_mean"] == comps["phi_std"] == comps["entropy_mean"] == 0.0
    else:
        for key in ("phi_mean", "phi_std", "entropy_mean"):
            assert abs(comps[key] - ref[key]) <= 1e-9, key
    phi, probs, entropy = compute_phi(logits)
    ref_phi, ref_probs, ref_entropy = reference_compute_phi(logits)
    np.testing.assert_allclose(phi, ref_phi, atol=1e-12)
    np.testing.assert_allclose(entropy, ref_entropy, atol=1e-12)


def test_random_sequences_exercise_every_discontinuity_branch():
    phi, _, _ = compute_phi(random_logits(np.random.default_rng(7), 513))
    delta, prev = np.diff(phi), phi[:-1]
    assert ((delta > 0.03) & (prev < 0.5)).sum() > 5 and ((delta > 0.03) & (prev >= 0.5)).sum() > 5
    assert ((delta < -0.03) & (prev > 0.7)).sum() > 5 and ((delta < -0.03) & (prev <= 0.7)).sum() > 5


@pytest.mark.parametrize("length", [2**16 - 1, 2**16, 2**16 + 1, 2**17 + 3])
def test_multiscale_caps_at_sixteen_scales(length):
    phi = np.random.default_rng(length).uniform(0, 1, size=length)
    assert abs(multiscale_coherence(phi) - reference_multiscale_coherence(phi)) <= 1e-9
    rows = torch.from_numpy(phi).unsqueeze(0)
    batch = carl._multiscale_batch(rows, torch.tensor([length]))
    assert abs(float(batch[0]) - reference_multiscale_coherence(phi)) <= 1e-9


def test_hand_computed_example():
    # Phi = [0.2, 0.9, 0.3]: a commitment from low Phi (0.8), a dissolution from high Phi (0.2)
    phi = np.array([0.2, 0.9, 0.3])
    assert carl.discontinuity_score(phi) == pytest.approx(0.5)
    # scales: j=0 -> std 0 -> 1.0 (w=1); j=1 -> one block [0.2, 0.9], std 0.35 -> 0.65 (w=sqrt 2)
    expected = (1.0 + math.sqrt(2) * 0.65) / (1 + math.sqrt(2))
    assert multiscale_coherence(phi) == pytest.approx(expected)
    assert carl.discontinuity_score(np.array([0.5, 0.51, 0.52])) == 0.5  # no events
    assert carl.discontinuity_score(np.array([0.1, 0.5, 0.9])) == pytest.approx(0.55)  # 0.8 then 0.3


def test_uniform_and_peaked_logits():
    score, comps = carl_reward(np.zeros((4, 16)), np.array([1, 2, 3, 4]))
    assert comps["phi_mean"] == pytest.approx(0.0, abs=1e-8)  # uniform: chaos
    assert comps["cloud_quality"] == pytest.approx(0.0, abs=1e-8)
    peaked = np.full((4, 16), -1e4)
    peaked[np.arange(4), [1, 2, 3, 4]] = 0.0
    score, comps = carl_reward(peaked, np.array([1, 2, 3, 4]))
    assert comps["phi_mean"] == pytest.approx(1.0, abs=1e-6)  # delta: crystal
    assert comps["cloud_quality"] == pytest.approx(1.0, abs=1e-6)
    assert score == pytest.approx(0.5 + 0.3 + 0.2 * 0.5, abs=1e-6)


@pytest.mark.parametrize(
    "logits, ids, message",
    [
        (np.zeros((3,)), np.zeros(3, dtype=int), "2-D"),
        (np.zeros((3, 1)), np.zeros(3, dtype=int), "at least 2"),
        (np.full((3, 4), np.nan), np.zeros(3, dtype=int), "NaN"),
        (np.zeros((3, 4)), np.array([0, 1, 4]), r"\[0, 4\)"),
        (np.zeros((3, 4)), np.array([0, -1, 2]), r"\[0, 4\)"),
        (np.zeros((3, 4)), np.array([0, 1]), "2 entries"),
        (np.zeros((3, 4)), np.zeros((3, 1), dtype=int), "1-D"),
        (np.zeros((3, 4)), np.zeros(3), "integers"),
    ],
)
def test_carl_reward_rejects_bad_input(logits, ids, message):
    with pytest.raises(ValueError, match=message):
        carl_reward(logits, ids)


def test_masked_minus_inf_logits_are_allowed():
    logits = np.random.default_rng(0).standard_normal((5, 8))
    logits[:, 6:] = -np.inf  # e.g. tokens banned by a logits processor
    score, comps = carl_reward(logits, np.array([0, 1, 2, 3, 4]))
    assert math.isfinite(score)
    assert abs(score - reference_carl_reward(logits, np.array([0, 1, 2, 3, 4]))[0]) <= 1e-9


# --------------------------------------------------------------------------------------------
# Batched torch paths == carl_reward row by row
# --------------------------------------------------------------------------------------------

BATCH_LENGTHS = [0, 1, 2, 3, 7, 8, 9, 16, 17, 31, 33, 64]


def padded_batch(rng, lengths, vocab=40, dtype=np.float64):
    width = max(lengths)
    logits = np.full((len(lengths), width, vocab), np.nan, dtype=dtype)  # padding is garbage on purpose
    ids = np.full((len(lengths), width), -100, dtype=np.int64)
    mask = np.zeros((len(lengths), width), dtype=np.int64)
    rows = []
    for b, n in enumerate(lengths):
        row_logits = random_logits(rng, n, vocab, dtype)
        row_ids = rng.integers(0, vocab, size=n)
        logits[b, :n], ids[b, :n], mask[b, :n] = row_logits, row_ids, 1
        rows.append((row_logits, row_ids))
    return logits, ids, mask, rows


def assert_rows_match(rewards, components, rows, tol):
    assert rewards.shape == (len(rows),)
    for b, (row_logits, row_ids) in enumerate(rows):
        score, comps = carl_reward(row_logits, row_ids)
        assert abs(float(rewards[b]) - score) <= tol, (b, float(rewards[b]), score)
        for key, value in comps.items():
            assert abs(float(components[key][b]) - value) <= tol, (b, key)


def test_carl_reward_batch_equals_carl_reward_row_by_row():
    rng = np.random.default_rng(3)
    logits, ids, mask, rows = padded_batch(rng, BATCH_LENGTHS)
    rewards, components = carl_reward_batch(
        torch.from_numpy(logits), torch.from_numpy(ids), torch.from_numpy(mask)
    )
    assert_rows_match(rewards, components, rows, 1e-9)
    assert set(components) == set(carl.COMPONENT_KEYS)


def test_carl_reward_batch_float32_matches_numpy_float32():
    rng = np.random.default_rng(11)
    logits, ids, mask, rows = padded_batch(rng, [5, 40, 17, 0, 2], vocab=300, dtype=np.float32)
    rewards, components = carl_reward_batch(
        torch.from_numpy(logits), torch.from_numpy(ids), torch.from_numpy(mask)
    )
    assert_rows_match(rewards, components, rows, 1e-5)


# The stats path uses the exact entropy -sum p log p; the reference's log(p + 1e-10) differs by at most
# V * 1e-10 nats, i.e. Phi by V * 1e-10 / log V (5e-9 here): float64 agreement is 1e-7, not 1e-9.
STATS_TOL = 1e-7


@pytest.mark.parametrize("head_kind", ["linear", "callable"])
def test_stats_path_without_full_logits_matches(head_kind):
    """Hidden states + LM head in tiles/chunks: never a [B, T, V] tensor, same rewards."""
    rng = np.random.default_rng(5)
    torch.manual_seed(0)
    lengths, hidden_size, vocab = [9, 0, 33, 1, 16, 5], 12, 300
    head = torch.nn.Linear(hidden_size, vocab, bias=True).double()
    with torch.no_grad():
        head.weight.mul_(8.0)  # spread the temperatures so Phi covers [0, 1]
    width = max(lengths)
    hidden = torch.from_numpy(rng.standard_normal((len(lengths), width, hidden_size)))
    hidden *= torch.from_numpy(np.exp(rng.uniform(-4, 1, size=(len(lengths), width, 1))))
    ids = torch.from_numpy(rng.integers(0, vocab, size=(len(lengths), width)))
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(-1)).long()
    calls = []

    def counting_head(h):
        calls.append(h.shape[0])
        return head(h)

    if head_kind == "linear":  # tiles of 7 positions x 64 vocabulary rows: 5 vocabulary tiles
        stats = token_stats_from_hidden(hidden, head, ids, chunk_size=7, tile_elements=7 * 64)
    else:
        stats = token_stats_from_hidden(hidden, counting_head, ids, chunk_size=7)
        assert max(calls) <= 7  # the LM head never saw more than a chunk of positions
    assert stats.vocab_size == vocab and stats.entropy.shape == (len(lengths), width)
    rewards, components = carl_reward_from_stats(stats.entropy, stats.selected_logprob, mask, vocab)
    with torch.no_grad():
        rows = [(head(hidden[b, :n]).numpy(), ids[b, :n].numpy()) for b, n in enumerate(lengths)]
    assert_rows_match(rewards, components, rows, STATS_TOL)
    # float32 model, default tiling: within 1e-5 of the float64 numpy reward
    stats32 = token_stats_from_hidden(hidden.float(), head.float(), ids)
    rewards32, comps32 = carl_reward_from_stats(stats32.entropy, stats32.selected_logprob, mask, vocab)
    assert_rows_match(rewards32, comps32, rows, 1e-5)


def test_stats_path_soft_cap_and_scale():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 200, bias=False).double()
    hidden = torch.randn(20, 8, dtype=torch.float64) * 30
    ids = torch.randint(0, 200, (20,))
    stats = token_stats_from_hidden(
        hidden, head.weight, ids, softcap=5.0, logit_scale=0.5, tile_elements=20 * 64
    )
    logits = torch.tanh(head(hidden) * 0.5 / 5.0) * 5.0
    logp = logits.log_softmax(-1)
    torch.testing.assert_close(stats.selected_logprob, logp.gather(1, ids[:, None]).squeeze(1))
    torch.testing.assert_close(stats.entropy, -(logp.exp() * logp).sum(-1))
    with pytest.raises(ValueError, match=r"\[0, 200\)"):
        token_stats_from_hidden(hidden, head, torch.full((20,), 200))


def test_token_stats_from_logits_and_bad_masks():
    logits = torch.randn(2, 3, 10, dtype=torch.float64)
    stats = token_stats_from_logits(logits, torch.zeros(2, 3, dtype=torch.long))
    probs = logits.softmax(-1)
    torch.testing.assert_close(stats.selected_logprob, probs[..., 0].log())
    torch.testing.assert_close(stats.entropy, -(probs * probs.log()).sum(-1), atol=1e-8, rtol=0)
    left_padded = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        carl_reward_batch(logits, torch.zeros(2, 3, dtype=torch.long), left_padded)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        carl_reward_batch(logits, torch.full((2, 3), 10), torch.ones(2, 3))


# --------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "phi, expected",
    [
        (1.0, (True, "high")),
        (0.8, (True, "high")),
        (0.7999, (True, "medium")),
        (0.5, (True, "medium")),
        (0.4999, (True, "low")),
        (SIGMA, (True, "low")),
        (0.1874, (False, "abstain")),
        (0.0, (False, "abstain")),
        (float("nan"), (False, "abstain")),
    ],
)
def test_coherence_gate(phi, expected):
    assert coherence_gate(phi) == expected


def test_coherence_gate_custom_threshold():
    assert coherence_gate(0.3, threshold=0.35) == (False, "abstain")
    assert coherence_gate(0.35, threshold=0.35) == (True, "low")
    assert coherence_gate(0.1, threshold=0.05) == (True, "low")


def run_logs(gate, logs):
    """Feed logs to the callback as the Trainer does; return the steps at which it asked to stop."""
    stops = []
    for step, log in enumerate(logs, start=1):
        control = types.SimpleNamespace(should_training_stop=False)
        gate.on_log(None, types.SimpleNamespace(global_step=step), control, logs=log)
        if control.should_training_stop:
            stops.append(step)
    return stops


def test_phase_transition_gate_fires_on_three_of_the_last_five():
    gate = PhaseTransitionGate()
    accs = [0.5, 0.995, 0.7, 0.99, 0.8, 0.6, 0.991, 1.0, 0.5, 0.99]
    ents = [1.0, 2.5, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1]
    stops = run_logs(
        gate, [{"mean_token_accuracy": a, "entropy": e} for a, e in zip(accs, ents, strict=True)]
    )
    # window at step 5: [0.5, .995, .7, .99, .8] -> 2 above; step 6: [.995, .7, .99, .8, .6] -> 2;
    # step 7: [.7, .99, .8, .6, .991] -> 2; step 8: [.99, .8, .6, .991, 1.0] -> 3: fires
    assert stops == [8]
    assert gate.triggered and gate.trigger_step == 8
    assert gate.window_values == [0.99, 0.8, 0.6, 0.991, 1.0]
    assert gate.peak_entropy == 3.0 and gate.peak_entropy_step == 3
    assert len(gate.history) == 10 and gate.history[7] == {
        "step": 8,
        "mean_token_accuracy": 1.0,
        "entropy": 0.3,
    }
    assert gate.summary()["trigger_step"] == 8


def test_phase_transition_gate_skips_logs_without_accuracy():
    gate = PhaseTransitionGate()
    logs = [
        {"mean_token_accuracy": 0.995, "entropy": 0.4},
        {"eval_loss": 1.2},  # the reference would count this as accuracy 0
        {"mean_token_accuracy": 0.999},
        {"loss": 0.1, "entropy": 0.9},  # no accuracy: entropy still tracked, window untouched
        {"train_runtime": 3.0},
        {"mean_token_accuracy": 0.992, "entropy": 0.2},
    ]
    assert run_logs(gate, logs) == [6]
    assert gate.window_values == [0.995, 0.999, 0.992]
    assert gate.peak_entropy == 0.9 and gate.peak_entropy_step == 4
    assert [h["step"] for h in gate.history] == [1, 3, 6]


def test_phase_transition_gate_needs_min_above_and_fires_once():
    gate = PhaseTransitionGate(threshold=0.9, window=4, min_above=2)
    logs = [{"mean_token_accuracy": a} for a in [0.95, 0.1, 0.2, 0.3, 0.91, 0.2, 0.95, 0.97, 0.99]]
    # step 2 has one above; steps 3-5 window [.95,.1,.2,.3]->1, [.1,.2,.3,.91]->1, step 6 [.2,.3,.91,.2]->1,
    # step 7 [.3,.91,.2,.95] -> 2: fires, and never again
    assert run_logs(gate, logs) == [7]
    assert gate.window_values == [0.3, 0.91, 0.2, 0.95]
    assert gate.peak_entropy == 0.0 and gate.peak_entropy_step == -1  # no entropy logged


def test_phase_transition_gate_below_threshold_never_fires():
    gate = PhaseTransitionGate()
    assert run_logs(gate, [{"mean_token_accuracy": 0.989}] * 20) == []
    assert not gate.triggered and gate.trigger_step == -1 and gate.window_values == []
    with pytest.raises(ValueError):
        PhaseTransitionGate(window=3, min_above=4)


def test_phase_transition_gate_is_a_trainer_callback():
    from transformers import TrainerCallback

    assert isinstance(PhaseTransitionGate(), TrainerCallback)
