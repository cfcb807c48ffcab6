"""LeWorld's memory shown fairly: the trained no-memory baseline, the multi-seed verdict, the cued dataset
mode and phase 3's information-utility gradient (REINFORCE on the info-request decision)."""

import math

import pandas as pd
import pytest
import torch

from carl_assets.leworld.architecture import (
    BLMConfig,
    LeWorldSystem,
    MemoryConfig,
    SLMConfig,
    load_system,
    save_system,
)
from carl_assets.leworld.comparison import (
    evaluate_replicates,
    memory_verdict,
    train_replicates,
    verdict_sentence,
)
from carl_assets.leworld.data import address_bits, cue_addresses, cue_bits, decode_cue, generate_sequences
from carl_assets.leworld.populators import random_bits, structured_bits
from carl_assets.leworld.training import Phase1Trainer, Phase3Trainer, TrainingConfig

D, C, T, WORDS = 8, 8, 6, 2048


def tiny_system(seed: int = 0, memory_reads: bool = True) -> LeWorldSystem:
    torch.manual_seed(seed)
    system = LeWorldSystem(
        MemoryConfig(num_words=WORDS, word_size=8, max_read_range=64, encoding_dim=8),
        SLMConfig(state_dim=D, char_dim=C, d_model=16),
        BLMConfig(state_dim=D, d_model=16, n_slms=2, info_dim=4),
        memory_reads=memory_reads,
    )
    random_bits(system.memory, seed=0)
    return system


@pytest.fixture(scope="module")
def cued():
    bits = tiny_system().memory.memory
    return (
        generate_sequences(bits, 48, T, D, C, "medium", generator=0, cue="characteristics"),
        generate_sequences(bits, 24, T, D, C, "medium", generator=1, cue="characteristics"),
    )


# ---------------------------------------------------------------------------------------------
# Cued dataset mode
# ---------------------------------------------------------------------------------------------


def test_cue_spells_the_addresses_in_the_characteristics_signs():
    bits = structured_bits(65536, 32)
    plain = generate_sequences(bits, 400, 5, 64, 32, "medium", generator=3)
    cued = generate_sequences(bits, 400, 5, 64, 32, "medium", generator=3, cue="characteristics")
    # Same draws: the regions and the magnitudes of the characteristics are those of the reference's mode.
    assert torch.equal(cued.relevant_starts, plain.relevant_starts)
    assert torch.equal(cued.characteristics.abs(), plain.characteristics.abs())
    # Two regions of a 16-bit address space in 32 dims: every address bit is spelled out.
    assert cue_bits(65536, 32, 2) == 16 and address_bits(65536) == 16
    assert torch.equal(decode_cue(cued.characteristics, 2, 65536), cued.relevant_starts[:, :2])
    # The reference's mode carries no such information (about half the bits agree by chance).
    agree = (decode_cue(plain.characteristics, 2, 65536) == plain.relevant_starts[:, :2]).float().mean()
    assert agree < 0.01
    # Each characteristic stays standard normal.
    assert cued.characteristics.mean().abs() < 0.05 and cued.characteristics.std().item() == pytest.approx(
        1.0, rel=0.05
    )
    # The characteristics' term of the dynamics follows the cued characteristics.
    assert not torch.equal(cued.states[:, 1:], plain.states[:, 1:]) and torch.equal(
        cued.states[:, 0], plain.states[:, 0]
    )


def test_cue_with_too_few_dims_keeps_the_top_bits_or_says_why():
    starts = torch.tensor([[65280, 5, 40000]])
    chars = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    assert cue_bits(65536, 32, 3) == 10  # 3 regions share 32 dims: the top 10 bits each
    decoded = decode_cue(cue_addresses(chars, starts, 65536), 3, 65536)
    assert torch.equal(decoded, (starts >> 6) << 6)  # the start to within 64 words
    with pytest.raises(ValueError, match="char_dim"):
        cue_bits(65536, 2, 3)
    with pytest.raises(ValueError, match="cue must be one of"):
        generate_sequences(structured_bits(1024, 8), 4, 3, 4, 4, "easy", cue="address")


# ---------------------------------------------------------------------------------------------
# The trained no-memory baseline
# ---------------------------------------------------------------------------------------------


def test_no_memory_system_never_sees_memory_contents(cued, tmp_path):
    data = cued[0]
    batch = data.batch(torch.arange(8))
    plain, blind = tiny_system(memory_reads=True), tiny_system(memory_reads=False)
    flipped_plain, flipped_blind = tiny_system(memory_reads=True), tiny_system(memory_reads=False)
    for s in (flipped_plain, flipped_blind):
        with torch.no_grad():
            s.memory.memory.copy_(1 - s.memory.memory)
    def predict(s):
        return s.multi_step_forward(batch["states"], batch["characteristics"])["predictions"]
    assert torch.equal(predict(blind), predict(flipped_blind))  # nothing of memory reaches the prediction
    assert not torch.allclose(predict(plain), predict(flipped_plain))  # while the memory system reads it
    # Oracle reads are withheld too, and phase 1's BLM step trains on zero reads: no encoder gradient.
    oracle = (batch["relevant_starts"], batch["relevant_ends"])
    assert torch.equal(
        blind.multi_step_forward(batch["states"], batch["characteristics"], oracle=oracle)["predictions"],
        predict(blind),
    )
    Phase1Trainer(blind, TrainingConfig()).train_blm_step(batch)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in blind.memory.encoder.parameters())
    # The flag survives a checkpoint.
    save_system(blind, tmp_path / "blind")
    assert load_system(tmp_path / "blind").memory_reads is False


def test_trained_no_memory_baseline_over_seeds_and_verdict(cued):
    train, validation = cued
    config = TrainingConfig(
        phase1_epochs=1,
        phase2_epochs=1,
        phase3_epochs=1,
        phase1_batch_size=24,
        phase2_batch_size=24,
        phase3_batch_size=24,
        seed=99,
    )
    built = []

    def make(seed: int, memory_reads: bool) -> LeWorldSystem:
        built.append((seed, memory_reads))
        return tiny_system(seed, memory_reads)

    replicates = train_replicates(make, train, validation, config, seeds=[0, 1, 2])
    assert built == [(0, True), (1, True), (2, True), (0, False), (1, False), (2, False)]
    assert [(r.variant, r.seed, r.system.memory_reads) for r in replicates] == [
        ("memory", 0, True),
        ("memory", 1, True),
        ("memory", 2, True),
        ("no_memory", 0, False),
        ("no_memory", 1, False),
        ("no_memory", 2, False),
    ]
    # Every replicate went through all three phases; only the first logs validation per epoch.
    assert all(set(r.metrics["phase"]) == {1, 2, 3} for r in replicates)
    assert "val_one_step_mse" in set(replicates[0].metrics["metric"]) and "val_one_step_mse" not in set(
        replicates[1].metrics["metric"]
    )
    # Different seeds train different models (initialisation, batch order).
    w = [r.system.blm.head.weight for r in replicates[:2]]
    assert not torch.allclose(w[0], w[1])

    per_seed = evaluate_replicates(replicates, validation, n_steps=3)
    assert len(per_seed) == 6 and (per_seed["mse"] > 0).all() and (per_seed["one_step_mse"] > 0).all()
    # The table's numbers are each system's own rollout errors.
    r0 = replicates[3]
    with torch.no_grad():
        pred = r0.system.multi_step_forward(validation.states, validation.characteristics, 3, rollout=True)[
            "predictions"
        ]
    assert per_seed.loc[3, "mse"] == pytest.approx(
        (pred - validation.states[:, 1:4]).pow(2).mean().item(), rel=1e-5
    )

    verdicts = memory_verdict(per_seed).set_index("metric")
    row = verdicts.loc["mse"]
    mem = per_seed.loc[per_seed.variant == "memory", "mse"]
    blind = per_seed.loc[per_seed.variant == "no_memory", "mse"]
    assert row["memory_mean"] == pytest.approx(mem.mean()) and row["memory_std"] == pytest.approx(
        mem.std(ddof=1)
    )
    assert row["gap"] == pytest.approx(blind.mean() - mem.mean())
    assert row["twice_spread"] == pytest.approx(2 * max(mem.std(ddof=1), blind.std(ddof=1)))
    assert row["verdict"] in {"memory helps", "memory hurts", "no difference shown"}
    assert (row["verdict"] == "memory helps") == (row["gap"] > row["twice_spread"])


def test_verdict_needs_the_gap_to_exceed_twice_the_spread():
    def table(memory: list[float], no_memory: list[float]) -> pd.DataFrame:
        rows = [("memory", i, v) for i, v in enumerate(memory)] + [
            ("no_memory", i, v) for i, v in enumerate(no_memory)
        ]
        frame = pd.DataFrame(rows, columns=["variant", "seed", "mse"])
        return frame.assign(one_step_mse=frame["mse"])

    helps = memory_verdict(table([0.10, 0.11, 0.12], [0.20, 0.21, 0.22])).iloc[0]
    assert helps["verdict"] == "memory helps" and helps["gap"] == pytest.approx(0.10)
    assert helps["twice_spread"] == pytest.approx(0.02)
    assert verdict_sentence(helps).startswith(
        "memory helps: rollout MSE 0.1100 ± 0.0100 with memory vs 0.2100 ± 0.0100"
    )
    # A gap of 0.03 with a spread of 0.02 (twice: 0.04) is not shown, whichever way it points.
    close = memory_verdict(table([0.10, 0.12, 0.14], [0.13, 0.15, 0.17])).iloc[0]
    assert close["gap"] == pytest.approx(0.03) and close["verdict"] == "no difference shown"
    # The spread is the larger of the two variants' spreads.
    lopsided = memory_verdict(table([0.10, 0.10, 0.10], [0.05, 0.25, 0.30])).iloc[0]
    assert lopsided["twice_spread"] == pytest.approx(2 * pd.Series([0.05, 0.25, 0.30]).std())
    assert lopsided["verdict"] == "no difference shown"
    assert memory_verdict(table([0.30, 0.31, 0.32], [0.10, 0.11, 0.12])).iloc[0]["verdict"] == "memory hurts"
    single = memory_verdict(table([0.1], [0.5])).iloc[0]
    assert math.isnan(single["twice_spread"]) and single["verdict"].startswith("undetermined")
    with pytest.raises(ValueError, match="no_memory"):
        memory_verdict(table([0.1, 0.2], [0.1, 0.2]).query("variant == 'memory'"))


# ---------------------------------------------------------------------------------------------
# Phase 3's information-utility term
# ---------------------------------------------------------------------------------------------


def gate_grads(system: LeWorldSystem, batch, utility: str, lam: float, seed: int = 5):
    trainer = Phase3Trainer(system, TrainingConfig(info_utility=utility, lambda_info_util=lam))
    trainer.optimizer.zero_grad()
    total, metrics = trainer.objective(batch, torch.Generator().manual_seed(seed))
    total.backward()
    gate = system.blm.info_gate
    return [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in (gate.weight, gate.bias)
    ], metrics


def test_reinforce_term_gives_the_info_request_decision_a_gradient(cued):
    batch = cued[0].batch(torch.arange(16))
    system = tiny_system()
    with torch.no_grad():  # an undecided gate, so that both decisions are drawn
        system.blm.info_gate.bias.zero_()

    # The reference's form is inert: the decision head gets no gradient from it.
    (ref_w, ref_b), _ = gate_grads(system, batch, "reference", 0.1)
    assert ref_w.abs().sum() == 0 and ref_b.abs().sum() == 0

    (w1, b1), metrics = gate_grads(system, batch, "reinforce", 0.1)
    assert b1.abs().sum() > 0 and w1.abs().sum() > 0
    assert 0 < metrics["info_sent_rate"] < 1
    (w2, b2), _ = gate_grads(system, batch, "reinforce", 0.2)
    # ∝ λ
    assert torch.allclose(b2, 2 * b1, rtol=1e-4) and torch.allclose(w2, 2 * w1, rtol=1e-4, atol=1e-9)

    # The bias gradient is REINFORCE's: −λ·mean_i(Â_i · Σ_t (a_it − p_it)), from the same draws.
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        states, chars = batch["states"], batch["characteristics"]
        with_info = system.multi_step_forward(states, chars, info_policy="sample", generator=gen)
        without = system.multi_step_forward(states, chars, use_info=False)
        p = []
        sent = with_info["info_sent"]
        # Replay the policy's probabilities along the sampled trajectory.
        info, prev = None, None
        for t in range(states.shape[1] - 2):
            out = system(states[:, max(0, t - 1)], states[:, t], chars, None, info, False, None, prev)
            info, prev = out["info_query"], sent[:, t]
            p.append(torch.sigmoid(out["info_logit"]))
    reward = without["sequence_mse"] - with_info["sequence_mse"]
    advantage = (reward - reward.mean()) / (reward.std(unbiased=False) + 1e-8)
    expected = -0.1 * (advantage * (sent - torch.stack(p, 1)).sum(1)).mean()
    assert b1.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)


def test_reinforce_step_makes_the_better_decisions_likelier(cued):
    """A small step on the gate alone raises mean(Â · log π(a)) for the decisions that were drawn."""
    batch = cued[0].batch(torch.arange(16))
    system = tiny_system()
    with torch.no_grad():
        system.blm.info_gate.bias.zero_()
    states, chars = batch["states"], batch["characteristics"]

    def objective() -> torch.Tensor:
        out = system.multi_step_forward(
            states, chars, info_policy="sample", generator=torch.Generator().manual_seed(2)
        )
        with torch.no_grad():
            reward = (
                system.multi_step_forward(states, chars, use_info=False)["sequence_mse"] - out["sequence_mse"]
            )
        advantage = (reward - reward.mean()) / (reward.std(unbiased=False) + 1e-8)
        return (advantage * out["info_log_prob"]).mean(), out["info_sent"]

    before, sent_before = objective()
    (w, b), _ = gate_grads(system, batch, "reinforce", 1.0, seed=2)
    with torch.no_grad():
        system.blm.info_gate.weight -= 0.05 * w
        system.blm.info_gate.bias -= 0.05 * b
    after, sent_after = objective()
    assert torch.equal(
        sent_before, sent_after
    )  # the same draws (the step is small), now likelier when better
    assert after.item() > before.item()


def test_untrained_gate_sends_every_query_as_the_seed_did(cued):
    batch = cued[0].batch(torch.arange(8))
    system = tiny_system()
    states, chars = batch["states"], batch["characteristics"]
    greedy = system.multi_step_forward(states, chars)
    always = system.multi_step_forward(states, chars, info_policy="always")
    assert torch.equal(greedy["predictions"], always["predictions"]) and bool(greedy["info_sent"].all())
    with pytest.raises(ValueError, match="info_policy"):
        system.multi_step_forward(states, chars, info_policy="never")
    with pytest.raises(ValueError, match="info_utility"):
        TrainingConfig(info_utility="bonus")
