"""LeWorld architecture, the three training phases, save/load and evaluation, on tiny sizes."""

import pytest
import torch
import torch.nn.functional as F

from carl_assets.leworld.architecture import (
    BLMConfig,
    LeWorldSystem,
    MemoryConfig,
    SLMConfig,
    load_system,
    save_system,
)
from carl_assets.leworld.data import generate_sequences
from carl_assets.leworld.evaluation import evaluate
from carl_assets.leworld.models import component_configs
from carl_assets.leworld.populators import structured_patterns
from carl_assets.leworld.sizes import ArchitectureSettings
from carl_assets.leworld.training import (
    REFERENCE_EPOCHS,
    LeWorldTrainingSettings,
    TrainingConfig,
    train_system,
    training_config,
)

D, C, T = 8, 4, 8


def tiny_system(seed: int = 0) -> LeWorldSystem:
    torch.manual_seed(seed)
    system = LeWorldSystem(
        MemoryConfig(num_words=2048, word_size=8, max_read_range=128, encoding_dim=16),
        SLMConfig(state_dim=D, char_dim=C, d_model=32),
        BLMConfig(state_dim=D, d_model=32, n_slms=3, info_dim=8),
    )
    structured_patterns(system.memory, seed=0)
    return system


@pytest.fixture(scope="module")
def data():
    bits = tiny_system().memory.memory
    return generate_sequences(bits, 64, T, D, C, "medium", generator=0), generate_sequences(
        bits, 32, T, D, C, "medium", generator=1
    )


def test_memory_read_bits_mask_and_encoding():
    system = tiny_system()
    memory = system.memory
    starts, ends = torch.tensor([0, 100, 2040, 50]), torch.tensor([16, 400, 2100, 50])
    bits, encoded, mask = memory.read(starts, ends)
    assert bits.shape == (4, 128, 8) and encoded.shape == (4, 16) and mask.shape == (4, 128)
    assert mask.sum(1).tolist() == [16, 128, 8, 0]  # clipped to max_read_range, to memory's end, empty
    assert torch.equal(bits[0, :16], memory.memory[:16]) and bits[0, 16:].sum() == 0
    assert torch.all(encoded[3] == 0)  # an empty read encodes to zero
    assert torch.allclose(memory.encode_range(starts, ends), encoded, atol=1e-6)  # prefix-sum path
    with torch.no_grad():
        memory.memory[:16] = 1 - memory.memory[:16]
    assert not torch.allclose(memory.encode_range(starts, ends)[0], encoded[0])  # the cache follows writes


def test_slm_outputs_and_address_bounds():
    system = tiny_system()
    slm = system.slms[0]
    out = slm(torch.randn(5, D), torch.randn(5, D), torch.randn(5, C))
    assert out["start_logits_high"].shape == (5, 8)  # 2048 words = 8 high bytes
    assert out["start_logits_low"].shape == (5, 256) and out["range_logits"].shape == (5, 128)
    assert out["hidden"].shape == (5, 32) and out["confidence"].shape == (5,)
    assert torch.all((out["confidence"] > 0) & (out["confidence"] < 1))
    assert torch.all(out["start_addr"] >= 0) and torch.all(out["end_addr"] <= 2048)
    assert torch.all(out["end_addr"] > out["start_addr"])
    expected = out["start_logits_high"].argmax(-1) * 256 + out["start_logits_low"].argmax(-1)
    assert torch.equal(out["start_addr"], expected.clamp(max=2047))


def test_forward_losses_and_multi_step(data):
    system = tiny_system()
    states, chars = data[0].states[:4], data[0].characteristics[:4]
    out = system(states[:, 0], states[:, 1], chars, states[:, 2])
    assert set(out["losses"]) == {
        "next_state_loss",
        "balance_loss",
        "diversity_loss",
        "entropy_loss",
        "total_loss",
    }
    assert (
        out["next_state"].shape == (4, D)
        and out["info_query"].shape == (4, 8)
        and out["mask"].shape == (4, 3)
    )
    assert torch.isclose(out["losses"]["next_state_loss"], F.mse_loss(out["next_state"], states[:, 2]))
    assert system(states[:, 0], states[:, 1], chars)["losses"] == {}
    multi = system.multi_step_forward(states, chars)
    assert multi["predictions"].shape == (4, T - 1, D) and multi["masks"].shape == (4, T - 1, 3)
    rollout = system.multi_step_forward(states, chars, n_steps=3, rollout=True)
    assert rollout["predictions"].shape == (4, 3, D)
    # Step 0 is the same either way; later rollout steps see predictions, not the true states.
    assert torch.allclose(rollout["predictions"][:, 0], multi["predictions"][:, 0])
    assert not torch.allclose(rollout["predictions"][:, 2], multi["predictions"][:, 2])
    # Its losses are the mean of the per-step forward losses (computed at once on stacked steps).
    info, per_step = None, []
    for t in range(T - 1):
        step = system(states[:, max(0, t - 1)], states[:, t], chars, states[:, t + 1], info)
        info = step["info_query"]
        per_step.append(step["losses"])
    for name, value in multi["losses"].items():
        assert torch.isclose(value, torch.stack([s[name] for s in per_step]).mean(), rtol=1e-5, atol=1e-7), (
            name
        )
    ablated = system.multi_step_forward(states, chars, ablate_memory=True)
    assert not torch.allclose(ablated["predictions"], multi["predictions"])


def test_prediction_loss_reaches_address_logits_and_router(data):
    """The straight-through paths: hard addresses and hard gates still pass gradient."""
    system = tiny_system()
    states, chars = data[0].states[:8], data[0].characteristics[:8]
    system.multi_step_forward(states, chars)["next_state_loss"].backward()
    assert system.slms[0].address_head.logits.weight.grad[:8].abs().sum() > 0
    assert system.slms[0].address_head.logits.weight.grad[-128:].abs().sum() > 0
    assert system.blm.router.score.weight.grad.abs().sum() > 0
    assert system.memory.encoder[0].weight.grad.abs().sum() > 0


def test_router_temperature_anneals():
    router = tiny_system().blm.router
    assert router.anneal_temperature(0, 3e-5, 0.1) == pytest.approx(1.0)
    assert router.anneal_temperature(10_000, 3e-5, 0.1) == pytest.approx(
        torch.exp(torch.tensor(-0.3)).item(), rel=1e-5
    )
    assert router.anneal_temperature(10**7, 3e-5, 0.1) == pytest.approx(0.1)
    assert router.temperature.item() == pytest.approx(0.1)


def run_phase(phase: int, data, epochs: int, **overrides):
    system = tiny_system()
    config = TrainingConfig(
        phase1_epochs=epochs,
        phase2_epochs=epochs,
        phase3_epochs=epochs,
        phase1_batch_size=16,
        phase2_batch_size=16,
        phase3_batch_size=16,
        **overrides,
    )
    metrics = train_system(system, data[0], data[1], config, phases=(phase,))
    return system, metrics.pivot_table(index="epoch", columns="metric", values="value")


def test_phase1_reduces_slm_and_blm_losses(data):
    _, m = run_phase(1, data, 10, phase1_lr=3e-3)
    assert m["slm_loss"].iloc[-1] < 0.9 * m["slm_loss"].iloc[0]
    assert m["blm_loss"].iloc[-1] < 0.7 * m["blm_loss"].iloc[0]
    assert m["val_one_step_mse"].iloc[-1] < m["val_one_step_mse"].iloc[0]


def test_phase2_reduces_total_loss_and_anneals(data):
    _, m = run_phase(2, data, 5, phase2_lr=2e-3, temp_anneal_rate=1e-2)
    assert m["total_loss"].iloc[-1] < 0.7 * m["total_loss"].iloc[0]
    assert m["temperature"].iloc[-1] < m["temperature"].iloc[0] < 1.0


@pytest.mark.parametrize("utility", ["reinforce", "reference"])
def test_phase3_reduces_loss_with_info(data, utility):
    _, m = run_phase(3, data, 5, phase3_lr=1e-2, info_utility=utility)
    assert m["loss_with_info"].iloc[-1] < 0.9 * m["loss_with_info"].iloc[0]
    if utility == "reinforce":  # REINFORCE: the loss with info plus the policy-gradient term it logs
        assert torch.allclose(
            torch.tensor(m["total_loss"].values),
            torch.tensor((m["loss_with_info"] + m["info_utility_loss"]).values),
            atol=1e-6,
        )
        assert ((m["info_sent_rate"] > 0) & (m["info_sent_rate"] < 1)).all()
        return
    # The reference's objective: loss with info minus λ·(detached improvement over the branch without it).
    expected = m["loss_with_info"] - 0.1 * (m["loss_without_info"] - m["loss_with_info"])
    assert torch.allclose(torch.tensor(m["total_loss"].values), torch.tensor(expected.values), atol=1e-6)


def test_phase3_optimiser_groups_follow_the_seed():
    from carl_assets.leworld.training import Phase3Trainer

    system = tiny_system()
    trainer = Phase3Trainer(system, TrainingConfig(phase3_lr=1e-3))
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    assert lrs == pytest.approx([1e-3, 1e-4, 1e-4, 1e-5])
    sizes = [sum(p.numel() for p in g["params"]) for g in trainer.optimizer.param_groups]
    assert sum(sizes) == sum(p.numel() for p in system.parameters())  # every parameter in exactly one group


def test_one_batch_size_feeds_every_phase_and_the_record_keeps_its_keys(data):
    settings = LeWorldTrainingSettings(batch_size=12, seed=4)
    config = training_config(settings, data[0])
    assert (config.phase1_batch_size, config.phase2_batch_size, config.phase3_batch_size) == (12, 12, 12)
    assert (config.state_dim, config.char_dim, config.sequence_length) == (D, C, T)
    assert (config.phase1_epochs, config.phase2_epochs, config.phase3_epochs, config.seed) == (3, 2, 1, 4)
    assert TrainingConfig(phase2_batch_size=16).phase1_batch_size == 32  # None: batch_size's default
    record = config.record()
    assert len(record) == 23 and "batch_size" not in record and record["phase3_batch_size"] == 12
    assert list(record)[:3] == ["phase1_lr", "phase1_epochs", "phase1_batch_size"]
    metrics = train_system(tiny_system(), data[0], None, config.model_copy(update={
        "phase1_epochs": 1, "phase2_epochs": 0, "phase3_epochs": 0}))
    # 64 training sequences in batches of 12: one epoch of phase 1 only
    assert set(metrics["phase"]) == {1} and set(metrics["epoch"]) == {1}
    with pytest.raises(ValueError, match="info_utility must be one of"):
        LeWorldTrainingSettings(info_utility="bonus")


def test_component_configs_take_the_sizes():
    sizes = ArchitectureSettings(slm_d_model=24, blm_d_model=40, n_slms=2, info_dim=6, encoding_dim=10,
                                 max_read_range=32)
    system = LeWorldSystem(*component_configs(sizes, 2048, 8, D, C))
    assert len(system.slms) == 2 and system.slm_config.d_model == 24 and system.blm_config.d_model == 40
    assert (system.memory_config.max_read_range, system.memory_config.encoding_dim) == (32, 10)
    assert (system.blm_config.info_dim, system.slm_config.char_dim) == (6, C)
    assert system.memory_config.num_words == 2048
    # the components' own defaults are the asset's sizes (one definition)
    default = ArchitectureSettings()
    assert SLMConfig().d_model == default.slm_d_model == 64 and MemoryConfig().encoding_dim == 64


def test_save_load_round_trip(tmp_path, data):
    system, _ = run_phase(2, data, 1, temp_anneal_rate=1e-2)
    save_system(system, tmp_path / "ckpt")
    assert not list((tmp_path / "ckpt").glob("*.pt")) and not list((tmp_path / "ckpt").glob("*.bin"))
    loaded = load_system(tmp_path / "ckpt")
    assert loaded.blm.router.temperature.item() == system.blm.router.temperature.item() < 1.0
    assert torch.equal(loaded.memory.memory, system.memory.memory)
    states, chars = data[1].states, data[1].characteristics
    system.eval()
    loaded.eval()
    with torch.no_grad():
        a = system.multi_step_forward(states, chars, n_steps=4, rollout=True)
        b = loaded.multi_step_forward(states, chars, n_steps=4, rollout=True)
    assert torch.equal(a["predictions"], b["predictions"]) and torch.equal(a["masks"], b["masks"])


def test_evaluation_reports_both_baselines(data):
    system, _ = run_phase(2, data, 3, phase2_lr=2e-3)
    validation = data[1]
    result = evaluate(system, validation, n_steps=3)
    summary = result.summary.set_index("system")
    assert list(summary.index) == ["leworld", "persistence", "memory_ablated", "oracle_reads"]
    truth = validation.states[:, 1:4]
    persistence = (validation.states[:, :1] - truth).pow(2).mean().item()
    assert summary.loc["persistence", "mse"] == pytest.approx(persistence, rel=1e-5)
    one_step = (validation.states[:, :-1] - validation.states[:, 1:]).pow(2).mean().item()
    assert summary.loc["persistence", "one_step_mse"] == pytest.approx(one_step, rel=1e-5)
    assert len(result.steps) == 12 and result.steps["step"].max() == 3
    assert result.metrics["beats_persistence"] == (summary.loc["leworld", "mse"] < persistence)
    assert result.metrics["beats_memory_ablated"] == (
        summary.loc["leworld", "mse"] < summary.loc["memory_ablated", "mse"]
    )
    usage = result.metrics["slm_usage"]
    assert len(usage) == 3 and all(0 <= u <= 1 for u in usage)
    assert result.metrics["routing_entropy"] >= 0


def test_oracle_reads_read_the_given_regions(data):
    system = tiny_system()
    batch = data[0].batch(torch.arange(4))
    states, chars = batch["states"], batch["characteristics"]
    outputs = [slm(states[:, 0], states[:, 1], chars) for slm in system.slms]
    starts, ends = batch["relevant_starts"][:, :2], batch["relevant_ends"][:, :2]
    reads = system.read_for(outputs, oracle=(starts, ends))
    assert torch.allclose(reads[0], system.memory.encode_range(starts[:, 0], ends[:, 0]))
    assert torch.allclose(reads[1], system.memory.encode_range(starts[:, 1], ends[:, 1]))
    assert torch.all(reads[2] == 0)  # no third region given: an empty read
    own = system.read_for(outputs)
    assert not torch.allclose(own[0], reads[0])


def test_seed_pipeline_runs_as_written():
    """The reference's `run_training` flow with its class names: populate, dataset + DataLoader, the three
    trainers' steps, the evaluator."""
    from torch.utils.data import DataLoader

    from carl_assets.leworld import (
        Evaluator,
        MemoryPopulator,
        Phase1Trainer,
        Phase2Trainer,
        Phase3Trainer,
        StateTransitionDataset,
    )

    def run() -> dict:
        torch.manual_seed(0)
        system = tiny_system()
        MemoryPopulator.structured_patterns(system.memory)
        make = lambda n: StateTransitionDataset(n, T, D, C, system.memory, difficulty="medium")  # noqa: E731
        train, val = make(32), make(16)
        assert train[0]["states"].shape == (T, D) and train[0]["n_relevant"] == 2
        loader = DataLoader(train, batch_size=16, shuffle=True)
        config = TrainingConfig(**REFERENCE_EPOCHS, state_dim=D, char_dim=C, sequence_length=T)
        phase1, phase2, phase3 = (
            Phase1Trainer(system, config),
            Phase2Trainer(system, config),
            Phase3Trainer(system, config),
        )
        for batch in loader:
            phase1.train_slms_step(batch)
            phase1.train_blm_step(batch)
        for batch in loader:
            step2 = phase2.train_step(batch)
        for batch in loader:
            step3 = phase3.train_step(batch)
        assert step2["temperature"] < 1.0 and set(step3) >= {
            "loss_with_info",
            "loss_without_info",
            "improvement",
        }
        return Evaluator.prediction_accuracy(system, DataLoader(val, batch_size=16), n_steps=3)

    metrics = run()
    assert set(metrics) == {"mse", "mae", "step_mses", "routing_entropy", "slm_usage"}
    assert len(metrics["step_mses"]) == 3 and len(metrics["slm_usage"]) == 3
    assert metrics["mse"] == pytest.approx(sum(metrics["step_mses"]) / 3, rel=1e-5)
    assert run()["mse"] == metrics["mse"]  # torch.manual_seed governs it, as in the reference
