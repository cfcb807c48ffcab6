"""Benchmark: re-scoring one GRPO step of completions with the CARL reward.

One step = 16 prompt + completion sequences under a random-init Llama with a 32,000-token vocabulary
(hidden 256, 2 layers: the LM head dominates, as in real small models). Prompts are chat-formatted like
this project's GRPO and agent prompts (a system message, a memory text of the sample graph as the
observation and an instruction). Completions are REAL texts, deterministic: the sample graph's memory
texts (next ones in node order, joined until long enough), cut to mixed lengths of 8 to 128 tokens of a
BPE tokenizer trained on those texts; each is passed as TRL passes it, text (decoded from its ids, so at
least 5 characters: the reference's blank/short rule scores none of them 0) and token ids. The tokenizer's
ids are a small part of the model's 32k vocabulary; every reward is still over all 32k logits. Three
ways over the same sequences, in one run:

- reference: the reference prototype's way — its rules (blank or < 5 characters: 0; at most 512
         tokens), one forward pass per sequence, full logits, numpy `carl_reward` on the positions that
         predict the completion (aligned as the reference's agent step does).
- ours:  `make_carl_reward_fn` — one batched no-grad forward through the decoder stack, the LM head
         only on the completions' predicting positions, in vocabulary tiles; entropy and log
         P(selected) per token; the sequence maths vectorised in torch.
- bare:  one batched no-grad forward of the full model over the right-padded batch (full logits
         [16, T, 32000]) and nothing else: the floor for a batched forward (it computes no reward, so
         it has nothing to agree on).

Agreement, checked on the timed calls' outputs before any ratio is printed (`_measure.run_bench`: exit
1 and no JSON line otherwise): max |reward ours - reward reference way| <= 1e-5 (the reward tests' tolerance),
and every completion scored (none skipped to 0 by a rule; their spread is reported).

Time: the same protocol for every method — one warm-up call each, then at least 3 interleaved rounds
(reference, bare, ours, reference, ...), in this process with the default allocator; each ratio compares
medians (the fastest rounds are printed and reported too, as `best_*`).

Memory: peak extra resident memory — VmHWM after resetting it through /proc/self/clear_refs, minus
VmRSS just before the call. torch's CPU allocations are invisible to tracemalloc, so RSS it is. It is
measured in a child process started with MALLOC_MMAP_THRESHOLD_=65536, so that glibc serves every large
buffer with mmap and returns it on free: otherwise a call could reuse heap pages freed by an earlier
one and look cheaper. (That setting costs page faults, which is why timing is done in this process.)
With ``--device cuda``: torch's peak allocated CUDA memory above what was allocated before.

Memory, likewise: one warm-up call each, then the largest of 2 measured calls each.

Prints one JSON line: ratio = reference median time / our median time (target >= 2), ratio_vs_bare_forward =
our median / bare median (target <= 1.15), memory_ratio = the reference way's peak extra / ours,
memory_ratio_vs_bare_forward = bare peak extra / ours (target >= 8), peak_mb, agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _measure import agree, agree_close, memory_ratio, run_bench  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from carl_assets.carl import carl_reward, make_carl_reward_fn  # noqa: E402
from carl_assets.memory_graph import load_graph  # noqa: E402
from carl_assets.models.loading import train_tokenizer  # noqa: E402

SYSTEM = "You are a precise agent. Follow the instruction exactly."
INSTRUCTIONS = [
    "Which feelings does this memory carry?",
    "What kind of memory is this?",
    "Click the submit button.",
    "Summarise the note in one line.",
]
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
REWARD_TOLERANCE = 1e-5  # max |ours - reference way|, as in tests/test_carl_reward_fn.py
# The reference's rules: a shorter text scores 0; longer ones are cut.
REFERENCE_MIN_CHARS, REFERENCE_MAX_TOKENS = 5, 512


def _status_mb(key: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def measure_once(fn, device: torch.device) -> tuple[float, float, object]:
    """(seconds, peak extra MB, result) of one fn() call."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status_mb("VmRSS")
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_mb("VmHWM")
    return seconds, peak - before, result


MIN_REPEATS = 3


def time_interleaved(fns: dict, repeats: int, device: torch.device) -> dict:
    """One warm-up call per method, then `repeats` (at least 3) interleaved rounds: the same for all."""
    repeats = max(MIN_REPEATS, repeats)
    for fn in fns.values():
        fn()  # warm-up: lazy inits, first touch of the weights
    rounds: dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            rounds[name].append(measure_once(fn, device))
    return {
        name: {
            "best": min(r[0] for r in runs),
            "median": statistics.median(r[0] for r in runs),
            "peak_mb": max(r[1] for r in runs),
            "result": runs[-1][2],
        }
        for name, runs in rounds.items()
    }


def real_completions(tokenizer, texts: list[str], lengths: list[int]) -> tuple[list[str], list[list[int]]]:
    """(texts, token ids): the memory texts in order, joined until each completion has its length in
    tokens, cut there; each text is its ids decoded (what a generated completion's text is)."""
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids, cursor = [], 0
    for length in lengths:
        taken: list[int] = []
        while len(taken) < length:
            taken += encoded[cursor % len(encoded)] + tokenizer(" ", add_special_tokens=False)["input_ids"]
            cursor += 1
        ids.append(taken[:length])
    return [tokenizer.decode(c, skip_special_tokens=True) for c in ids], ids


def build(args: argparse.Namespace):
    """(model, tokenizer, chat prompts, completion texts, completion ids), deterministic for `args.seed`."""
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a sharper head than N(0, 0.02): Phi spread more like a trained model's
        model.lm_head.weight.mul_(25.0)
    memories = load_graph("sample").nodes.sort_values("node_id")["text"].astype(str).tolist()
    tokenizer = train_tokenizer([*memories, SYSTEM, *INSTRUCTIONS], vocab_size=2048)
    rng = np.random.default_rng(args.seed)
    n = args.sequences
    observations = [memories[int(i)] for i in rng.choice(len(memories) // 2, size=n, replace=False)]
    prompts = [
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"{observations[i]}\n\nInstruction: {INSTRUCTIONS[i % 4]}"},
        ]
        for i in range(n)
    ]
    lengths = np.linspace(8, args.max_completion, n).astype(int)
    rng.shuffle(lengths)
    # completions from the other half of the graph: an answer is not its own prompt
    texts, completion_ids = real_completions(
        tokenizer, memories[len(memories) // 2 :], [int(k) for k in lengths]
    )
    return model.to(torch.device(args.device)), tokenizer, prompts, texts, completion_ids


def methods(model, tokenizer, prompts, texts, completion_ids, device):
    """The three ways over the same sequences, and facts about them."""
    n = len(prompts)
    # prompt ids as TRL's GRPO makes them (the chat template with the generation prompt), written here
    # independently of the reward function's own tokenisation
    prompt_ids = [
        list(
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        for p in prompts
    ]
    sequences = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]

    def reference_way() -> list[float]:
        rewards = []
        with torch.no_grad():
            for p, c, text in zip(prompt_ids, completion_ids, texts, strict=True):
                if not text.strip() or len(text) < REFERENCE_MIN_CHARS:
                    rewards.append(0.0)
                    continue
                c = c[:REFERENCE_MAX_TOKENS]
                logits = model(input_ids=torch.tensor([p + c], device=device)).logits[0]
                start = len(p) - 1
                window = logits[start : start + len(c)].float().cpu().numpy()
                rewards.append(carl_reward(window, np.asarray(c))[0])
                del logits
        return rewards

    reward_fn = make_carl_reward_fn(model, tokenizer)

    def ours() -> list[float]:
        return reward_fn(prompts=prompts, completions=texts, completion_ids=completion_ids)

    width = max(len(s) for s in sequences)
    batch_ids = torch.zeros((n, width), dtype=torch.long)
    batch_mask = torch.zeros((n, width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        batch_ids[i, : len(seq)] = torch.tensor(seq)
        batch_mask[i, : len(seq)] = 1
    batch_ids, batch_mask = batch_ids.to(device), batch_mask.to(device)

    def bare() -> tuple[int, ...]:
        with torch.no_grad():
            logits = model(input_ids=batch_ids, attention_mask=batch_mask).logits
        return tuple(logits.shape)

    info = {
        "prompt_tokens_mean": float(np.mean([len(p) for p in prompt_ids])),
        "completion_tokens": int(sum(len(c) for c in completion_ids)),
        "completion_chars_min": min(len(t) for t in texts),
        "padded_width": width,
    }
    return {"reference": reference_way, "bare": bare, "ours": ours}, info, reward_fn


def memory_child(args: argparse.Namespace) -> None:
    """Peak extra memory of each method, one call after a warm-up, in a process with mmap'd buffers."""
    device = torch.device(args.device)
    fns, _, _ = methods(*build(args), device)
    peaks = {}
    for name, fn in fns.items():
        fn()
        peaks[name] = max(measure_once(fn, device)[1] for _ in range(2))
    print(json.dumps(peaks))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--max-completion", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def check_agreement(r_ref: list[float], r_ours: list[float], reward_fn) -> dict:
    """Ours equals the reference way within REWARD_TOLERANCE, and no completion was skipped (a bench of
    skipped completions would time a rule, not the reward). Raises Disagreement otherwise."""
    skipped = sum(c is None for c in reward_fn.last_components)
    return {
        "rewards_vs_reference_way": agree_close(
            "rewards vs the reference way",
            r_ours,
            r_ref,
            REWARD_TOLERANCE,
            reward_std=round(float(np.std(r_ref)), 4),
            reward_mean=round(float(np.mean(r_ref)), 4),
        ),
        "scored": agree(
            "completions scored", skipped, 0, metric="skipped_completions", completions=len(r_ours)
        ),
    }


def main() -> dict | None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return None
    device = torch.device(args.device)
    fns, info, reward_fn = methods(*build(args), device)
    stats = time_interleaved(fns, args.repeats, device)
    r_ref, shape, r_ours = (stats[k]["result"] for k in ("reference", "bare", "ours"))
    agreement = check_agreement(r_ref, r_ours, reward_fn)  # before any ratio is printed

    if device.type == "cuda":  # CUDA's allocator statistics need no help
        memory = {name: s["peak_mb"] for name, s in stats.items()}
    else:
        child = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--memory-child"],
            capture_output=True,
            text=True,
            env={**os.environ, MMAP_ENV: "65536"},
            check=True,
        )
        memory = json.loads(child.stdout.strip().splitlines()[-1])
    t_ref, t_bare, t_ours = (stats[k]["median"] for k in ("reference", "bare", "ours"))
    m_ref, m_bare, m_ours = (memory[k] for k in ("reference", "bare", "ours"))
    print(
        f"sequences={args.sequences}: prompts {info['prompt_tokens_mean']:.0f} tokens on average, "
        f"{info['completion_tokens']} completion tokens (8-{args.max_completion}, real memory texts, "
        f">= {info['completion_chars_min']} characters), padded width {info['padded_width']}; "
        f"V={args.vocab}; "
        f"full logits {shape}; threads={args.threads}",
        file=sys.stderr,
    )
    for label, key in (("ref way ", "reference"), ("bare fwd", "bare"), ("ours    ", "ours")):
        print(
            f"{label}: best {stats[key]['best'] * 1000:8.1f} ms  median {stats[key]['median'] * 1000:8.1f} "
            f"ms  "
            f"peak extra {memory[key]:7.1f} MB",
            file=sys.stderr,
        )
    return {
        "name": "carl_reward",
        "ratio": round(t_ref / t_ours, 3),
        "target": 2.0,
        "ratio_is": f"reference way median time / ours (the same {args.sequences} real completions, rewards "
        "agreeing)",
        "agreement": agreement,
        "ratio_vs_bare_forward": round(t_ours / t_bare, 3),
        "target_vs_bare_forward": 1.15,
        "memory_ratio": memory_ratio(m_ref, m_ours),
        "memory_ratio_vs_bare_forward": memory_ratio(m_bare, m_ours),
        "target_memory_ratio_vs_bare_forward": 8.0,
        "peak_mb": round(m_ours, 1),
        "peak_mb_bare_forward": round(m_bare, 1),
        "peak_mb_reference": round(m_ref, 1),
        "seconds_ours": round(t_ours, 4),
        "seconds_bare_forward": round(t_bare, 4),
        "seconds_reference": round(t_ref, 4),
        "timing": f"median of {max(MIN_REPEATS, args.repeats)} interleaved rounds after 1 warm-up, each "
        "method",
        "best_ratio": round(stats["reference"]["best"] / stats["ours"]["best"], 3),
        "best_ratio_vs_bare_forward": round(stats["ours"]["best"] / stats["bare"]["best"], 3),
        "completion_tokens": info["completion_tokens"],
        "threads": args.threads,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


if __name__ == "__main__":
    if "--memory-child" in sys.argv:
        main()
    else:
        run_bench(main)
