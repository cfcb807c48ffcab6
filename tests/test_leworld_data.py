"""LeWorld populators and synthetic dataset: layouts, semantics and equivalence with the reference's loops."""

import math

import pytest
import torch

from carl_assets.leworld.architecture import ArtificialMemory, MemoryConfig
from carl_assets.leworld.data import (
    DatasetSettings,
    evolve,
    generate_sequences,
    generate_splits,
    region_means,
)
from carl_assets.leworld.memory import MemorySettings
from carl_assets.leworld.populators import (
    experience_bits,
    from_experience,
    random_bits,
    region_of,
    structured_bits,
    structured_patterns,
    text_experiences,
)


def reference_structured_loop(n: int, w: int, context: torch.Tensor) -> torch.Tensor:
    """The reference's per-word loops (region 2 taken from `context`, since its per-word manual_seed stream
    is replaced by one generator: same distribution, different bits)."""
    memory = torch.zeros(n, w)
    quarter = n // 4
    for i in range(quarter):
        pattern = torch.zeros(w)
        pattern[i % w] = 1.0
        memory[i] = pattern
    memory[quarter : 2 * quarter] = context
    for i in range(2 * quarter, 3 * quarter):
        binary = torch.zeros(w)
        val = i - 2 * quarter
        for bit in range(min(w, 16)):
            binary[bit] = float((val >> bit) & 1)
        memory[i] = binary
    for i in range(3 * quarter, n):
        memory[i] = (memory[i % quarter] + memory[quarter + (i % quarter)]) % 2
    return memory


@pytest.mark.parametrize("n,w", [(1024, 16), (1030, 32), (2048, 8)])
def test_structured_patterns_match_seed_layout(n, w):
    bits = structured_bits(n, w, seed=3)
    quarter = n // 4
    reference = reference_structured_loop(n, w, bits[quarter : 2 * quarter])
    assert torch.equal(bits, reference)
    # Region layout, stated directly.
    assert torch.equal(bits[:quarter].argmax(1), torch.arange(quarter) % w)
    assert torch.all(bits[:quarter].sum(1) == 1)
    assert bits[2 * quarter + 5, :3].tolist() == [1.0, 0.0, 1.0]  # 5 in binary, low bit first
    if w > 16:
        assert bits[2 * quarter : 3 * quarter, 16:].sum() == 0
    context = bits[quarter : 2 * quarter]
    assert 0.4 < context.mean().item() < 0.6
    assert torch.equal(structured_bits(n, w, seed=3), bits)  # deterministic
    assert not torch.equal(structured_bits(n, w, seed=4)[quarter : 2 * quarter], context)


def test_structured_patterns_fill_memory_and_leave_global_rng_alone():
    memory = ArtificialMemory(MemoryConfig(num_words=4096, word_size=32))
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    structured_patterns(memory, seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    assert torch.equal(memory.memory, structured_bits(4096, 32, 0))
    assert region_of(torch.tensor([0, 1023, 1024, 4095]), 4096).tolist() == [0, 0, 1, 3]


def test_random_bits_are_fair_and_seeded():
    memory = ArtificialMemory(MemoryConfig(num_words=4096, word_size=16))
    random_bits(memory, seed=1)
    first = memory.memory.clone()
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert abs(first.mean().item() - 0.5) < 0.01
    random_bits(memory, seed=1)
    assert torch.equal(memory.memory, first)


@pytest.mark.parametrize("dim", [40, 10])
def test_from_experience_matches_reference_loop(dim):
    w = 16
    memory = ArtificialMemory(MemoryConfig(num_words=1024, word_size=w))
    experiences = torch.randn(50, dim, generator=torch.Generator().manual_seed(0))
    written = from_experience(memory, experiences)
    assert written == 50
    for i in range(50):  # the reference's per-row loop
        feat = experiences[i]
        if len(feat) >= w:
            bits = (feat[:w] > feat[:w].median()).float()
        else:
            bits = torch.zeros(w)
            bits[: len(feat)] = (feat > feat.median()).float()
        assert torch.equal(memory.memory[i], bits)
    assert memory.memory[50:].sum() == 0  # the rest untouched, as in the reference
    from_experience(memory, experiences, tile=True)
    assert torch.equal(memory.memory[50:100], memory.memory[:50])


def test_text_experiences_give_similar_sentences_similar_bits():
    texts = [
        "The river was calm at dawn. I felt warm.",
        "The river was calm at dawn!",
        "Compilers hate me today.",
    ]
    features = text_experiences(texts, 32)
    assert features.shape == (4, 32)
    bits = experience_bits(features, 32)
    assert torch.equal(bits[0], bits[2])  # the same sentence twice
    assert (bits[0] != bits[3]).sum() > 4


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------

N_WORDS, W, D, C, T = 4096, 16, 24, 8, 12


@pytest.fixture(scope="module")
def memory_bits():
    return structured_bits(N_WORDS, W, seed=0)


@pytest.mark.parametrize("difficulty,n_rel", [("easy", 1), ("medium", 2), ("hard", 3)])
def test_dataset_shapes_and_address_bounds(memory_bits, difficulty, n_rel):
    data = generate_sequences(memory_bits, 300, T, D, C, difficulty, generator=5)
    assert data.states.shape == (300, T, D) and data.characteristics.shape == (300, C)
    assert data.relevant_starts.shape == (300, 3) and data.relevant_starts.dtype == torch.long
    assert torch.all(data.n_relevant == n_rel)
    starts, ends = data.relevant_starts[:, :n_rel], data.relevant_ends[:, :n_rel]
    assert starts.min() >= 0 and starts.max() <= N_WORDS - 256
    lengths = ends - starts
    assert lengths.min() >= 16 and lengths.max() <= 128
    assert lengths.float().mean().item() == pytest.approx(72, abs=5)
    assert torch.all(data.relevant_starts[:, n_rel:] == 0) and torch.all(data.relevant_ends[:, n_rel:] == 0)
    assert torch.isfinite(data.states).all()


def test_dataset_is_seeded(memory_bits):
    a = generate_sequences(memory_bits, 20, T, D, C, "medium", generator=1)
    b = generate_sequences(memory_bits, 20, T, D, C, "medium", generator=1)
    c = generate_sequences(memory_bits, 20, T, D, C, "medium", generator=2)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values(), strict=True))
    assert not torch.equal(a.states, c.states)


def test_splits_follow_the_settings(memory_bits):
    settings = DatasetSettings(num_train=6, num_validation=3, seq_length=T, state_dim=D, char_dim=C, seed=2)
    splits = generate_splits(memory_bits, settings)
    assert list(splits) == ["train", "validation"] and splits["validation"].states.shape == (3, T, D)
    # train draws with 2·seed, validation with 2·seed + 1; medium: 2 relevant regions
    expected = generate_sequences(memory_bits, 3, T, D, C, "medium", generator=5)
    assert torch.equal(splits["validation"].states, expected.states)
    train = generate_sequences(memory_bits, 6, T, D, C, "medium", generator=4)
    assert torch.equal(splits["train"].states, train.states)
    with pytest.raises(ValueError, match="unknown cue 'address'"):
        DatasetSettings(cue="address")


def test_memory_settings_size_the_memory_config():
    assert (MemoryConfig().num_words, MemoryConfig().word_size) == (65536, 32) == (
        MemorySettings().num_words, MemorySettings().word_size)
    assert MemorySettings(populator="random", num_words=1024).num_words == 1024
    with pytest.raises(ValueError, match="unknown populator 'dreams'"):
        MemorySettings(populator="dreams")


def test_closed_form_equals_recurrence():
    g = torch.Generator().manual_seed(0)
    x0, drive, noise = (
        torch.randn(7, 5, generator=g),
        torch.randn(7, 5, generator=g),
        torch.randn(7, 30, 5, generator=g),
    )
    states = evolve(x0, drive, noise)
    x = x0.clone()
    assert torch.allclose(states[:, 0], x0)
    for t in range(1, 31):
        x = 0.8 * x + drive + noise[:, t - 1]
        assert torch.allclose(states[:, t], x, atol=1e-5)


@pytest.mark.parametrize("difficulty", ["easy", "hard"])
def test_dataset_equals_reference_loop_on_the_same_draws(memory_bits, difficulty):
    """Replay the generator's draws and run the reference's per-sequence, per-region, per-step loops."""
    n, seed = 6, 11
    data = generate_sequences(memory_bits, n, T, D, C, difficulty, generator=seed)
    g = torch.Generator().manual_seed(seed)
    n_rel = data.n_relevant[0].item()
    chars = torch.randn(n, C, generator=g)
    starts = torch.randint(0, N_WORDS - 256 + 1, (n, n_rel), generator=g)
    lengths = torch.randint(16, 129, (n, n_rel), generator=g)
    x0 = torch.randn(n, D, generator=g)
    noise = torch.randn(n, T - 1, D, generator=g) * 0.1
    assert torch.equal(data.relevant_starts[:, :n_rel], starts)
    for i in range(n):
        states = torch.zeros(T, D)
        states[0] = x0[i]
        for r in range(n_rel):  # each region re-runs the steps; the last one's pass is what remains
            mem_bits = memory_bits[starts[i, r] : starts[i, r] + lengths[i, r]].mean(dim=0)
            seed_vec = (mem_bits * 2 - 1).repeat(math.ceil(D / W))[:D]
            char_padded = chars[i].repeat(math.ceil(D / C))[:D]
            for t in range(1, T):
                states[t] = 0.8 * states[t - 1] + 0.15 * seed_vec + 0.05 * char_padded + noise[i, t - 1]
        assert torch.allclose(data.states[i], states, atol=1e-5)


def test_region_means_match_slices(memory_bits):
    starts = torch.tensor([[0, 100], [4000, 7]])
    ends = torch.tensor([[16, 228], [4096, 30]])
    means = region_means(memory_bits, starts, ends)
    for i in range(2):
        for j in range(2):
            assert torch.allclose(means[i, j], memory_bits[starts[i, j] : ends[i, j]].mean(0))


@pytest.mark.parametrize("mix", ["last", "mean"])
def test_dynamics_depend_on_relevant_memory_only(memory_bits, mix):
    data = generate_sequences(memory_bits, 40, T, D, C, "medium", generator=3, mix=mix)
    start, end = data.relevant_starts[0, 1].item(), data.relevant_ends[0, 1].item()  # the driving region
    changed = memory_bits.clone()
    changed[start:end] = 1 - changed[start:end]
    after = generate_sequences(changed, 40, T, D, C, "medium", generator=3, mix=mix)
    assert torch.equal(after.states[0, 0], data.states[0, 0])  # the initial state is drawn, not driven
    assert (after.states[0, 1:] - data.states[0, 1:]).abs().max() > 0.05  # the targets change

    # Flip words that no sequence reads: nothing changes.
    used = torch.zeros(N_WORDS, dtype=torch.bool)
    for s, e in zip(
        data.relevant_starts[:, :2].flatten().tolist(),
        data.relevant_ends[:, :2].flatten().tolist(),
        strict=True,
    ):
        used[s:e] = True
    elsewhere = memory_bits.clone()
    elsewhere[~used] = 1 - elsewhere[~used]
    assert torch.equal(
        generate_sequences(elsewhere, 40, T, D, C, "medium", generator=3, mix=mix).states, data.states
    )

    # The first region drives the dynamics only with mix="mean" (the reference keeps the last region's run).
    s0, e0 = data.relevant_starts[0, 0].item(), data.relevant_ends[0, 0].item()
    first = memory_bits.clone()
    first[s0:e0] = 1 - first[s0:e0]
    overlaps = (s0 < end) and (start < e0)
    moved = not torch.equal(
        generate_sequences(first, 40, T, D, C, "medium", generator=3, mix=mix).states[0], data.states[0]
    )
    assert moved == (mix == "mean" or overlaps)


def test_dataset_drifts_to_the_memory_equilibrium(memory_bits):
    """x_t → (0.15 s + 0.05 c̃) / 0.2: the long-run state is set by memory and characteristics."""
    data = generate_sequences(memory_bits, 200, 60, D, C, "easy", generator=0)
    mean_bits = region_means(memory_bits, data.relevant_starts[:, :1], data.relevant_ends[:, :1])[:, 0]
    s = (mean_bits * 2 - 1)[:, torch.arange(D) % W]
    c = data.characteristics[:, torch.arange(D) % C]
    equilibrium = (0.15 * s + 0.05 * c) / 0.2
    residual = data.states[:, -1] - equilibrium
    assert residual.mean().abs() < 0.02
    assert residual.var().item() == pytest.approx(0.01 / (1 - 0.64), rel=0.15)  # stationary noise variance
