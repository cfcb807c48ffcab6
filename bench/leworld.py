"""LeWorld data benchmark: the reference's per-sequence/per-step and per-word loops against the vectorised
forms.

1. Dataset generation, 1,000 sequences × 20 steps (state 64, characteristics 32, difficulty "medium"):
   the reference's `StateTransitionDataset._generate_sequences` (transcribed below) against
   `carl_assets.leworld.data.generate_sequences` (prefix sums + closed-form recurrence). Target ≥ 50×.
2. Structured population of 65,536 words × 32 bits: the reference's `MemoryPopulator.structured_patterns`
   (transcribed below) against `structured_bits`. Target ≥ 100×.

Baselines (what each ratio divides): `ratio` = the reference's dataset loop (one Python iteration per
sequence, region and step, torch ops on single vectors) / ours; `populate_ratio` = the reference's structured
populator (one Python iteration per word, and per bit for the history quarter) / ours. Both sides of every
ratio use one timing protocol: `WARMUP` untimed call(s), then the median of `REPEATS` timed calls, in this
process.

Agreement is checked in the same run, before any ratio is printed (else exit 1 and no JSON line; tolerances
in `check_dataset` / `check_population`): the dataset exactly on replayed draws (same numbers for the same
noise: max |diff| <= 1e-4) and in distribution on the timed calls' independent draws (per-step mean gap <=
0.05, per-step std ratio within 5 %, address lengths within 3 words and starts within 3 % of the memory,
each for 1,000 sequences and scaled by sqrt(1000 / n) for fewer: about 4 standard errors);
the structured memory exactly on every region but the pseudo-random context quarter (max |diff| 0), whose
per-word `manual_seed` stream is replaced by one generator (both checked for fair bits: density within
0.01 of 0.5). Peak memory: the RSS high-water mark of each timed call above the RSS before it (the
largest over the calls; `_measure.measure`), ours and the reference's. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics

from _measure import agree, measure, memory_ratio, prepare_process, run_bench

# before torch: it may restart the interpreter

prepare_process()

import torch  # noqa: E402

from carl_assets.leworld.architecture import ArtificialMemory, MemoryConfig  # noqa: E402
from carl_assets.leworld.data import generate_sequences  # noqa: E402
from carl_assets.leworld.populators import structured_bits  # noqa: E402

N_SEQ, SEQ_LEN, STATE_DIM, CHAR_DIM, DIFFICULTY = 1000, 20, 64, 32, "medium"
NUM_WORDS, WORD_SIZE = 65536, 32
WARMUP, REPEATS = (
    1,
    3,
)  # every timed function, ours and the reference's alike: WARMUP untimed calls, median of REPEATS
BASELINES = {
    "ratio": "reference StateTransitionDataset._generate_sequences loops (per sequence, region, step) / "
    "generate_sequences",
    "populate_ratio": "reference MemoryPopulator.structured_patterns loops (per word) / structured_bits",
}


# ---------------------------------------------------------------------------------------------
# The reference's loop forms, transcribed
# ---------------------------------------------------------------------------------------------


def reference_generate_sequences(
    memory: ArtificialMemory,
    num_sequences: int,
    seq_length: int,
    state_dim: int,
    char_dim: int,
    difficulty: str,
) -> list[dict]:
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
                transition_seed = transition_seed_raw.repeat(math.ceil(state_dim / len(transition_seed_raw)))[
                    :state_dim
                ]
                char_padded = characteristics.repeat(math.ceil(state_dim / len(characteristics)))[:state_dim]
                for t in range(1, seq_length):
                    noise = torch.randn(state_dim) * 0.1
                    states[t] = 0.8 * states[t - 1] + 0.15 * transition_seed + 0.05 * char_padded + noise
        data.append(
            {
                "states": states,
                "characteristics": characteristics,
                "relevant_addrs": relevant_addrs,
                "n_relevant": n_relevant,
            }
        )
    return data


def reference_structured_patterns(memory: ArtificialMemory) -> None:
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


def median_time(fn, repeats: int = REPEATS, warmup: int = WARMUP) -> tuple[float, object, float]:
    """The protocol for both sides of every ratio: `warmup` untimed calls, then the median of `repeats`
    timed calls; returns (median seconds, the last call's output, the largest peak extra MB)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times, peak = [], 0.0
    for _ in range(repeats):
        seconds, extra, out = measure(fn)
        times.append(seconds)
        peak = max(peak, extra)
    return statistics.median(times), out, peak


def replayed_equivalence(bits: torch.Tensor, n: int = 50, seed: int = 7) -> float:
    """Max |vectorised − reference loop| when the loop consumes the same draws (the last region's pass)."""
    num_words = bits.shape[0]
    data = generate_sequences(bits, n, SEQ_LEN, STATE_DIM, CHAR_DIM, DIFFICULTY, generator=seed)
    g = torch.Generator().manual_seed(seed)
    chars = torch.randn(n, CHAR_DIM, generator=g)
    starts = torch.randint(0, num_words - 256 + 1, (n, 2), generator=g)
    lengths = torch.randint(16, 129, (n, 2), generator=g)
    x0 = torch.randn(n, STATE_DIM, generator=g)
    noise = torch.randn(n, SEQ_LEN - 1, STATE_DIM, generator=g) * 0.1
    worst = 0.0
    for i in range(n):
        states = torch.zeros(SEQ_LEN, STATE_DIM)
        states[0] = x0[i]
        for r in range(2):
            mem_bits = bits[starts[i, r] : starts[i, r] + lengths[i, r]].mean(dim=0)
            transition_vec = (mem_bits * 2 - 1).repeat(math.ceil(STATE_DIM / WORD_SIZE))[:STATE_DIM]
            char_padded = chars[i].repeat(math.ceil(STATE_DIM / CHAR_DIM))[:STATE_DIM]
            for t in range(1, SEQ_LEN):
                states[t] = 0.8 * states[t - 1] + 0.15 * transition_vec + 0.05 * char_padded + noise[i, t - 1]
        worst = max(worst, (states - data.states[i]).abs().max().item())
    return worst


def check_dataset(bits: torch.Tensor, ref_data: list[dict], ours) -> dict:
    """The dataset agreement: exact on replayed draws, in distribution on the timed calls' draws."""
    num_words = bits.shape[0]
    ref_states = torch.stack([d["states"] for d in ref_data])
    ref_starts = torch.tensor([[s for s, _ in d["relevant_addrs"]] for d in ref_data], dtype=torch.float32)
    ref_lengths = torch.tensor(
        [[e - s for s, e in d["relevant_addrs"]] for d in ref_data], dtype=torch.float32
    )
    step_mean_gap = (ref_states.mean(dim=(0, 2)) - ours.states.mean(dim=(0, 2))).abs().max().item()
    step_std_ratio = ours.states.std(dim=(0, 2)) / ref_states.std(dim=(0, 2))
    ours_lengths = (ours.relevant_ends - ours.relevant_starts)[:, :2].float()
    # the distribution tolerances are set for N_SEQ sequences; sampling noise grows as 1/sqrt(n)
    scale = math.sqrt(N_SEQ / min(len(ref_data), len(ours.states)))
    start_gap = abs(ref_starts.mean().item() - ours.relevant_starts[:, :2].float().mean().item())
    return {
        "dataset_replayed": agree("dataset on replayed draws", replayed_equivalence(bits), 1e-4),
        "dataset_step_mean": agree(
            "dataset per-step mean", step_mean_gap, 0.05 * scale, metric="max_abs_gap"
        ),
        "dataset_step_std": agree(
            "dataset per-step std ratio",
            (step_std_ratio - 1).abs().max().item(),
            0.05 * scale,
            metric="max_abs_ratio_minus_1",
        ),
        "dataset_address_length": agree(
            "address length mean",
            abs(ref_lengths.mean().item() - ours_lengths.mean().item()),
            3.0 * scale,
            metric="abs_gap_words",
        ),
        "dataset_address_start": agree(
            "address start mean", start_gap / num_words, 0.03 * scale, metric="abs_gap_fraction_of_memory"
        ),
    }


def check_population(loop_bits: torch.Tensor, ours_bits: torch.Tensor) -> dict:
    """The structured memory's agreement: exact outside the context quarter, XOR layout, fair context bits."""
    quarter = loop_bits.shape[0] // 4
    context = slice(quarter, 2 * quarter)
    fixed = [slice(0, quarter), slice(2 * quarter, 3 * quarter)]  # regions 1 and 3
    fixed_gap = max((loop_bits[r] - ours_bits[r]).abs().max().item() for r in fixed)
    xor_gap = max(
        (b[3 * quarter :] - (b[:quarter] + b[context]) % 2).abs().max().item() for b in (loop_bits, ours_bits)
    )
    density = [loop_bits[context].mean().item(), ours_bits[context].mean().item()]
    return {
        "populate_fixed_regions": agree("structured regions 1 and 3", fixed_gap, 0.0),
        "populate_xor_region": agree("region 4 = region 1 XOR region 2", xor_gap, 0.0),
        "populate_context_density": agree(
            "context bits fair",
            max(abs(d - 0.5) for d in density),
            0.01,
            metric="max_abs_density_minus_half",
            density=[round(d, 4) for d in density],
        ),
    }


def time_ours(bits: torch.Tensor, args: argparse.Namespace) -> dict:
    """Our two functions as called by default (their kernels on one thread: see carl_assets.leworld.runtime)
    and with the process's thread pool (`args.threads`), for comparison."""
    words, n = bits.shape[0], args.sequences
    out = {}
    out["populate"] = median_time(lambda: structured_bits(words, WORD_SIZE, seed=0))
    out["dataset"] = median_time(
        lambda: generate_sequences(bits, n, SEQ_LEN, STATE_DIM, CHAR_DIM, DIFFICULTY, generator=0)
    )
    out["populate_pool"] = median_time(lambda: structured_bits(words, WORD_SIZE, seed=0, num_threads=None))
    out["dataset_pool"] = median_time(
        lambda: generate_sequences(
            bits, n, SEQ_LEN, STATE_DIM, CHAR_DIM, DIFFICULTY, generator=0, num_threads=None
        )
    )
    return out


def time_reference(bits: torch.Tensor, args: argparse.Namespace) -> tuple[dict, ArtificialMemory]:
    """The reference's loops, same protocol; returns their timings and the memory the reference populator
    filled."""
    memory = ArtificialMemory(MemoryConfig(bits.shape[0], WORD_SIZE))
    with torch.no_grad():
        memory.memory.copy_(bits)

    def reference_dataset() -> list[dict]:
        random.seed(0)  # every call draws the same sequences
        torch.manual_seed(0)
        return reference_generate_sequences(memory, args.sequences, SEQ_LEN, STATE_DIM, CHAR_DIM, DIFFICULTY)

    reference_memory = ArtificialMemory(MemoryConfig(bits.shape[0], WORD_SIZE))
    out = {
        "dataset": median_time(reference_dataset),
        "populate": median_time(lambda: reference_structured_patterns(reference_memory)),
    }
    return out, reference_memory


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "threads",
        type=int,
        nargs="?",
        default=2,
        help="the process's torch threads (the reference loops' setting)",
    )
    parser.add_argument("--sequences", type=int, default=N_SEQ)
    parser.add_argument("--words", type=int, default=NUM_WORDS, help="memory words (a multiple of 4, >= 512)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bits = structured_bits(args.words, WORD_SIZE)
    ours = time_ours(bits, args)
    reference, reference_memory = time_reference(bits, args)
    agreement = {
        **check_dataset(bits, reference["dataset"][1], ours["dataset"][1]),
        **check_population(reference_memory.memory.detach(), ours["populate"][1]),
    }
    seconds = {
        f"{side}_{what}": timing[what][0]
        for side, timing in (("reference", reference), ("ours", ours))
        for what in timing
    }
    peaks = {
        f"{side}_{what}": timing[what][2]
        for side, timing in (("reference", reference), ("ours", ours))
        for what in timing
    }
    for key in sorted(seconds):
        print(f"{key}: median {seconds[key]:.5f} s, peak extra {peaks[key]:.1f} MB")
    return {
        "name": "leworld",
        "ratio": round(seconds["reference_dataset"] / seconds["ours_dataset"], 1),
        "target": 50,
        "populate_ratio": round(seconds["reference_populate"] / seconds["ours_populate"], 1),
        "populate_target": 100,
        "agreement": agreement,
        "peak_mb": round(peaks["ours_dataset"], 1),
        "peak_mb_reference": round(peaks["reference_dataset"], 1),
        "memory_ratio": memory_ratio(peaks["reference_dataset"], peaks["ours_dataset"]),
        "populate_peak_mb": round(peaks["ours_populate"], 1),
        "populate_peak_mb_reference": round(peaks["reference_populate"], 1),
        "populate_memory_ratio": memory_ratio(peaks["reference_populate"], peaks["ours_populate"]),
        "peak_memory_method": "RSS high-water mark (VmHWM after /proc/self/clear_refs) minus RSS before, "
        "per call",
        "ratio_thread_pool": round(seconds["reference_dataset"] / seconds["ours_dataset_pool"], 1),
        "populate_ratio_thread_pool": round(seconds["reference_populate"] / seconds["ours_populate_pool"], 1),
        "median_seconds": {k: round(v, 5) for k, v in seconds.items()},
        "threads": args.threads,
        "sequences": args.sequences,
        "words": args.words,
        "timing": f"both sides: {WARMUP} warm-up call, median of {REPEATS} timed calls",
        "baselines": BASELINES,
    }


if __name__ == "__main__":
    run_bench(main)
