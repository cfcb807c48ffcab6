"""Benchmark: re-scoring one GRPO step of completions with the CARL reward.

One step = 16 prompt + completion sequences (prompts of 12-60 tokens, completions of mixed lengths up to
128 tokens) under a random-init Llama with a 32,000-token vocabulary (hidden 256, 2 layers: the LM
head dominates, as in real small models). Three ways over the same sequences, in one run:

- seed:  the seed's way — one forward pass per sequence, full logits, numpy `carl_reward` on the
         positions that predict the completion (aligned as the seed's agent step does).
- ours:  `make_carl_reward_fn` — one batched no-grad forward through the decoder stack, the LM head
         only on the completion's predicting positions, in chunks; entropy and log P(selected) per
         token; the sequence maths vectorised in torch.
- bare:  one batched no-grad forward of the full model over the right-padded batch (full logits
         [16, T, 32000]) and nothing else: the floor for a batched forward.

Time: median of `--repeats` runs after a warm-up. Memory: the peak resident memory above what the
process held just before the call (Linux: /proc/self/clear_refs resets VmHWM, then VmHWM - VmRSS
before). torch's CPU allocations are invisible to tracemalloc, so RSS it is; the script re-executes
itself with MALLOC_MMAP_THRESHOLD_=65536 so that glibc serves every large buffer with mmap and returns
it on free — otherwise a later call could reuse pages freed by an earlier one and look cheaper.

Prints one JSON line: ratio = seed time / our time (target >= 2), ratio_vs_bare_forward = our time /
bare time (target <= 1.15), memory_ratio = bare peak extra / our peak extra (target >= 8), peak_mb.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"

if os.environ.get(MMAP_ENV) is None and sys.platform.startswith("linux"):
    os.environ[MMAP_ENV] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from carl_assets.carl import _prompt_ids, carl_reward, make_carl_reward_fn  # noqa: E402
from carl_assets.model_loading import train_tokenizer  # noqa: E402

WORDS = ("the agent reads a page clicks submit button form memory graph warmth clarity crystal phase "
         "order parameter token distribution entropy coherence gate abstain act reward").split()


def _status_mb(key: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def measure(fn, repeats: int) -> tuple[float, float, object]:
    """(median seconds, peak extra resident MB, last result) of fn() over `repeats` runs."""
    fn()  # warm-up: lazy inits, first-touch of weights
    times, peaks, result = [], [], None
    for _ in range(repeats):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status_mb("VmRSS")
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        peaks.append(_status_mb("VmHWM") - before)
    return statistics.median(times), max(peaks), result


def build(vocab: int, hidden: int, layers: int, seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a sharper head than N(0, 0.02): Phi spread over [0, 1] like a trained model
        model.lm_head.weight.mul_(25.0)
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=40)) for _ in range(50)]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--max-completion", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = build(args.vocab, args.hidden, args.layers, args.seed)
    rng = np.random.default_rng(args.seed)
    n = args.sequences
    prompts = [" ".join(rng.choice(WORDS, size=int(k))) for k in rng.integers(8, 40, size=n)]
    lengths = np.linspace(8, args.max_completion, n).astype(int)
    rng.shuffle(lengths)
    completion_ids = [rng.integers(1, args.vocab, size=int(k)).tolist() for k in lengths]
    prompt_ids = [_prompt_ids(tokenizer, p, {}) for p in prompts]
    sequences = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]

    def seed_way() -> list[float]:
        rewards = []
        with torch.no_grad():
            for p, c, seq in zip(prompt_ids, completion_ids, sequences, strict=True):
                logits = model(input_ids=torch.tensor([seq])).logits[0]
                start = len(p) - 1
                window = logits[start : start + len(c)].float().numpy()
                rewards.append(carl_reward(window, np.asarray(c))[0])
                del logits
        return rewards

    reward_fn = make_carl_reward_fn(model, tokenizer)

    def ours() -> list[float]:
        return reward_fn(prompts=prompts, completions=[""] * n, completion_ids=completion_ids)

    width = max(len(s) for s in sequences)
    batch_ids = torch.zeros((n, width), dtype=torch.long)
    batch_mask = torch.zeros((n, width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        batch_ids[i, : len(seq)] = torch.tensor(seq)
        batch_mask[i, : len(seq)] = 1

    def bare() -> tuple[int, ...]:
        with torch.no_grad():
            logits = model(input_ids=batch_ids, attention_mask=batch_mask).logits
        return tuple(logits.shape)

    t_ours, m_ours, r_ours = measure(ours, args.repeats)
    t_bare, m_bare, shape = measure(bare, args.repeats)
    t_seed, m_seed, r_seed = measure(seed_way, args.repeats)
    max_diff = float(np.max(np.abs(np.asarray(r_ours) - np.asarray(r_seed))))
    print(f"sequences={n} completion tokens={int(lengths.sum())} (max {int(lengths.max())}) "
          f"padded batch={width} tokens, V={args.vocab}, full logits {shape}, threads={args.threads}")
    print(f"seed way: {t_seed * 1000:8.1f} ms  peak extra {m_seed:7.1f} MB")
    print(f"bare fwd: {t_bare * 1000:8.1f} ms  peak extra {m_bare:7.1f} MB")
    print(f"ours:     {t_ours * 1000:8.1f} ms  peak extra {m_ours:7.1f} MB")
    print(f"max |reward ours - reward seed way| = {max_diff:.2e}; reward std = {np.std(r_ours):.4f}")
    print(json.dumps({
        "name": "carl_reward",
        "ratio": round(t_seed / t_ours, 3),
        "target": 2.0,
        "ratio_vs_bare_forward": round(t_ours / t_bare, 3),
        "target_vs_bare_forward": 1.15,
        "memory_ratio": round(m_bare / max(m_ours, 1e-6), 2),
        "target_memory_ratio": 8.0,
        "peak_mb": round(m_ours, 1),
        "peak_mb_bare_forward": round(m_bare, 1),
        "peak_mb_seed": round(m_seed, 1),
        "seconds_ours": round(t_ours, 4),
        "seconds_bare_forward": round(t_bare, 4),
        "seconds_seed": round(t_seed, 4),
        "max_reward_diff": max_diff,
        "threads": args.threads,
        "device": "cpu",
    }))


if __name__ == "__main__":
    main()
