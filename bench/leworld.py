"""LeWorld data benchmark: the seed's per-sequence/per-step and per-word loops against the vectorised forms.

1. Dataset generation, 1,000 sequences × 20 steps (state 64, characteristics 32, difficulty "medium"):
   the seed's `StateTransitionDataset._generate_sequences` (transcribed below) against
   `carl_assets.leworld.data.generate_sequences` (prefix sums + closed-form recurrence). Target ≥ 50×.
2. Structured population of 65,536 words × 32 bits: the seed's `MemoryPopulator.structured_patterns`
   (transcribed below) against `structured_bits`. Target ≥ 100×.

Baselines (what each ratio divides): `ratio` = the seed's dataset loop (one Python iteration per sequence,
region and step, torch ops on single vectors) / ours; `populate_ratio` = the seed's structured populator (one
Python iteration per word, and per bit for the history quarter) / ours. Both sides of every ratio use one
timing protocol: `WARMUP` untimed call(s), then the median of `REPEATS` timed calls, in this process.

Equivalence is checked in the same run: the dataset exactly on replayed draws (same numbers for the same
noise) and in distribution on independent draws (per-step moments, address statistics); the structured
memory exactly on every region but the pseudo-random context quarter, whose per-word `manual_seed` stream is
replaced by one generator (both checked for fair bits). Ends with one JSON line.
"""

from __future__ import annotations

import json
import math
import random
import resource
import statistics
import sys
import time

import torch

from carl_assets.leworld.architecture import ArtificialMemory, MemoryConfig
from carl_assets.leworld.data import generate_sequences
from carl_assets.leworld.populators import structured_bits

N_SEQ, SEQ_LEN, STATE_DIM, CHAR_DIM, DIFFICULTY = 1000, 20, 64, 32, "medium"
NUM_WORDS, WORD_SIZE = 65536, 32
THREADS = int(sys.argv[1]) if len(sys.argv) > 1 else 2  # the process's torch threads (the seed loops' setting)
WARMUP, REPEATS = 1, 3  # every timed function, ours and the seed's alike: WARMUP untimed calls, median of REPEATS
BASELINES = {
    "ratio": "seed StateTransitionDataset._generate_sequences loops (per sequence, region, step) / generate_sequences",
    "populate_ratio": "seed MemoryPopulator.structured_patterns loops (per word) / structured_bits",
}


# ---------------------------------------------------------------------------------------------
# The seed's loop forms, transcribed
# ---------------------------------------------------------------------------------------------


def seed_generate_sequences(memory: ArtificialMemory, num_sequences: int, seq_length: int, state_dim: int, char_dim: int, difficulty: str) -> list[dict]:
    data = []
    mem_size = memory.config.num_words
    for _ in range(num_sequences):
        characteristics = torch.randn(char_dim)
        n_relevant = 1 if difficulty == "easy" else 2 if difficulty == "medium" else 3
        relevant_addrs = []
        for _ in range(n_relevant):
            start = random.randint(0, mem_size - 256)
            length = random.randint(16, 128)
            relevant_addrs.append((start, start + length))
        states = torch.zeros(seq_length, state_dim)
        states[0] = torch.randn(state_dim)
        with torch.no_grad():
            for addr_start, addr_end in relevant_addrs:
                mem_bits = memory.memory[addr_start:addr_end].mean(dim=0)
                transition_seed_raw = mem_bits * 2 - 1
                transition_seed = transition_seed_raw.repeat(math.ceil(state_dim / len(transition_seed_raw)))[:state_dim]
                char_padded = characteristics.repeat(math.ceil(state_dim / len(characteristics)))[:state_dim]
                for t in range(1, seq_length):
                    noise = torch.randn(state_dim) * 0.1
                    states[t] = 0.8 * states[t - 1] + 0.15 * transition_seed + 0.05 * char_padded + noise
        data.append({"states": states, "characteristics": characteristics, "relevant_addrs": relevant_addrs, "n_relevant": n_relevant})
    return data


def seed_structured_patterns(memory: ArtificialMemory) -> None:
    n = memory.config.num_words
    w = memory.config.word_size
    quarter = n // 4
    with torch.no_grad():
        for i in range(quarter):
            pattern = torch.zeros(w)
            pattern[i % w] = 1.0
            memory.memory[i] = pattern
        for i in range(quarter, 2 * quarter):
            seed = i - quarter
            torch.manual_seed(seed)
            memory.memory[i] = torch.randint(0, 2, (w,)).float()
        for i in range(2 * quarter, 3 * quarter):
            binary = torch.zeros(w)
            val = i - 2 * quarter
            for bit in range(min(w, 16)):
                binary[bit] = float((val >> bit) & 1)
            memory.memory[i] = binary
        for i in range(3 * quarter, n):
            a = memory.memory[i % quarter]
            b = memory.memory[quarter + (i % quarter)]
            memory.memory[i] = (a + b) % 2


# ---------------------------------------------------------------------------------------------


def median_time(fn, repeats: int = REPEATS, warmup: int = WARMUP) -> tuple[float, object]:
    """The protocol for both sides of every ratio: `warmup` untimed calls, then the median of `repeats`
    timed calls; returns (median seconds, the last call's output)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def replayed_equivalence(bits: torch.Tensor, n: int = 50, seed: int = 7) -> float:
    """Max |vectorised − seed loop| when the loop consumes the same draws (the last region's pass)."""
    data = generate_sequences(bits, n, SEQ_LEN, STATE_DIM, CHAR_DIM, DIFFICULTY, generator=seed)
    g = torch.Generator().manual_seed(seed)
    chars = torch.randn(n, CHAR_DIM, generator=g)
    starts = torch.randint(0, NUM_WORDS - 256 + 1, (n, 2), generator=g)
    lengths = torch.randint(16, 129, (n, 2), generator=g)
    x0 = torch.randn(n, STATE_DIM, generator=g)
    noise = torch.randn(n, SEQ_LEN - 1, STATE_DIM, generator=g) * 0.1
    worst = 0.0
    for i in range(n):
        states = torch.zeros(SEQ_LEN, STATE_DIM)
        states[0] = x0[i]
        for r in range(2):
            mem_bits = bits[starts[i, r] : starts[i, r] + lengths[i, r]].mean(dim=0)
            seed_vec = (mem_bits * 2 - 1).repeat(math.ceil(STATE_DIM / WORD_SIZE))[:STATE_DIM]
            char_padded = chars[i].repeat(math.ceil(STATE_DIM / CHAR_DIM))[:STATE_DIM]
            for t in range(1, SEQ_LEN):
                states[t] = 0.8 * states[t - 1] + 0.15 * seed_vec + 0.05 * char_padded + noise[i, t - 1]
        worst = max(worst, (states - data.states[i]).abs().max().item())
    return worst


def main() -> None:
    torch.set_num_threads(THREADS)
    bits = structured_bits(NUM_WORDS, WORD_SIZE)

    # Ours first, so that the process's peak RSS after them is theirs (imports included: see start_rss_mb).
    start_rss_mb = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
    # As called by default (their kernels on one thread: see carl_assets.leworld.runtime) ...
    populate_ours, ours_bits = median_time(lambda: structured_bits(NUM_WORDS, WORD_SIZE, seed=0))
    data_ours, ours = median_time(lambda: generate_sequences(bits, N_SEQ, SEQ_LEN, STATE_DIM, CHAR_DIM, DIFFICULTY, generator=0))
    # ... and with the process's thread pool (THREADS), for comparison.
    populate_pool, _ = median_time(lambda: structured_bits(NUM_WORDS, WORD_SIZE, seed=0, num_threads=None))
    data_pool, _ = median_time(lambda: generate_sequences(bits, N_SEQ, SEQ_LEN, STATE_DIM, CHAR_DIM, DIFFICULTY, generator=0, num_threads=None))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    memory = ArtificialMemory(MemoryConfig(NUM_WORDS, WORD_SIZE))
    with torch.no_grad():
        memory.memory.copy_(bits)

    def seed_dataset() -> list[dict]:
        random.seed(0)  # every call draws the same sequences
        torch.manual_seed(0)
        return seed_generate_sequences(memory, N_SEQ, SEQ_LEN, STATE_DIM, CHAR_DIM, DIFFICULTY)

    data_seed, seed_data = median_time(seed_dataset)
    seed_memory = ArtificialMemory(MemoryConfig(NUM_WORDS, WORD_SIZE))
    populate_seed, _ = median_time(lambda: seed_structured_patterns(seed_memory))

    # Equivalence: dataset in distribution (independent draws) and exactly on replayed draws.
    seed_states = torch.stack([d["states"] for d in seed_data])
    seed_starts = torch.tensor([[s for s, _ in d["relevant_addrs"]] for d in seed_data], dtype=torch.float32)
    seed_lengths = torch.tensor([[e - s for s, e in d["relevant_addrs"]] for d in seed_data], dtype=torch.float32)
    step_mean_gap = (seed_states.mean(dim=(0, 2)) - ours.states.mean(dim=(0, 2))).abs().max().item()
    step_std_ratio = (ours.states.std(dim=(0, 2)) / seed_states.std(dim=(0, 2))).tolist()
    ours_lengths = (ours.relevant_ends - ours.relevant_starts)[:, :2].float()
    distribution_ok = (
        step_mean_gap < 0.05
        and all(0.95 < r < 1.05 for r in step_std_ratio)
        and abs(seed_lengths.mean().item() - ours_lengths.mean().item()) < 3
        and abs(seed_starts.mean().item() - ours.relevant_starts[:, :2].float().mean().item()) < 0.03 * NUM_WORDS
    )
    replay_gap = replayed_equivalence(bits)

    quarter = NUM_WORDS // 4
    context = slice(quarter, 2 * quarter)
    loop_bits = seed_memory.memory
    others = torch.ones(NUM_WORDS, dtype=torch.bool)
    others[context] = False
    # Regions 1 and 3 exactly; region 4 is XOR(region 1, region 2) in both.
    fixed_equal = torch.equal(loop_bits[:quarter], ours_bits[:quarter]) and torch.equal(loop_bits[2 * quarter : 3 * quarter], ours_bits[2 * quarter : 3 * quarter])
    xor_ok = torch.equal(loop_bits[3 * quarter :], (loop_bits[:quarter] + loop_bits[context]) % 2) and torch.equal(
        ours_bits[3 * quarter :], (ours_bits[:quarter] + ours_bits[context]) % 2
    )
    context_density = (loop_bits[context].mean().item(), ours_bits[context].mean().item())
    populate_ok = fixed_equal and xor_ok and all(abs(d - 0.5) < 0.01 for d in context_density)

    report = {
        "dataset_seed_s": round(data_seed, 4),
        "dataset_ours_s": round(data_ours, 5),
        "populate_seed_s": round(populate_seed, 4),
        "populate_ours_s": round(populate_ours, 5),
        f"dataset_ours_{THREADS}_threads_s": round(data_pool, 5),
        f"populate_ours_{THREADS}_threads_s": round(populate_pool, 5),
        "dataset_step_mean_gap": round(step_mean_gap, 4),
        "dataset_step_std_ratio_range": [round(min(step_std_ratio), 3), round(max(step_std_ratio), 3)],
        "dataset_replayed_max_abs_diff": replay_gap,
        "populate_context_density": [round(d, 4) for d in context_density],
    }
    for key, value in report.items():
        print(f"{key}: {value}")
    print(
        json.dumps(
            {
                "name": "leworld",
                "ratio": round(data_seed / data_ours, 1),
                "target": 50,
                "populate_ratio": round(populate_seed / populate_ours, 1),
                "populate_target": 100,
                "peak_mb": round(peak_mb, 1),
                "start_rss_mb": round(start_rss_mb, 1),
                "ratio_thread_pool": round(data_seed / data_pool, 1),
                "populate_ratio_thread_pool": round(populate_seed / populate_pool, 1),
                "threads": THREADS,
                "dataset_equivalent": bool(distribution_ok and replay_gap < 1e-4),
                "populate_equivalent": bool(populate_ok),
                "timing": f"both sides: {WARMUP} warm-up call, median of {REPEATS} timed calls",
                "baselines": BASELINES,
            }
        )
    )


if __name__ == "__main__":
    main()
