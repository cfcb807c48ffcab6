"""Benchmark: one dream cycle's generation + scoring, batched against one response at a time.

Model: the default-size offline Llama (hidden 128, 4 blocks, BPE vocabulary trained on the sample
graph's text), randomly initialised (timing does not need its pretraining). Prompts: real dream
scenarios (random walks over the sample memory graph, collided into chat prompts), `--scenarios` of
them with `--k` responses each. Every response has exactly `--new-tokens` tokens on both sides
(`min_new_tokens = max_new_tokens`), so both sides generate and score the same number of tokens.
Scorer: "carl + steering" (the CARL reward under the policy and a steering projection at the deepest
default layer, with random unit vectors: the values do not matter for timing).

- ours:     `generate_responses` (left-padded batches of `--batch-size` prompts, k samples each in one
            `generate` call) + the combined scorer over all responses (batched forwards).
- baseline: `generate_one_at_a_time` (one prompt, one sample per `generate` call) + the scorer
            called on one response at a time.

Time: a warm-up of each, then `--repeats` interleaved rounds; the median counts (best printed too).
Peak memory: resident memory (RSS) high-water mark after /proc/self/clear_refs, minus RSS before the
call; the script re-executes itself with MALLOC_MMAP_THRESHOLD_=65536 so large freed buffers go back
to the OS between calls. One torch thread.

Agreement, checked before any ratio is printed (else exit 1 and no JSON line): (1) scoring — the batched
scorer's components for our timed call's responses equal the scorer run on each of those responses alone
(the baseline's way), max |diff| <= 1e-4 over every component; (2) generation — greedy decoding (k = 1,
temperature 0) of every scenario gives the same tokens batched and one at a time (0 sequences differ).
Sampled responses are not compared token by token: each side draws from its own seeded streams.

Prints one JSON line: ratio = baseline time / our time (target >= 3), tokens/s on both sides, peak_mb,
memory_ratio = the baseline's peak / ours, agreement.
"""

from __future__ import annotations

import argparse
import sys

from _measure import agree, agree_close, measure, memory_ratio, prepare_process, run_bench, time_interleaved

# before torch: it may restart the interpreter

prepare_process()

import torch  # noqa: E402

from carl_assets.dreams import (  # noqa: E402
    CarlScorer,
    CombinedScorer,
    DreamConfig,
    SteeringScorer,
    dream_scenarios,
    generate_one_at_a_time,
    generate_responses,
    scenario_messages,
)
from carl_assets.memory_graph import load_graph  # noqa: E402
from carl_assets.models.loading import new_offline_model  # noqa: E402
from carl_assets.steering import SteeringVectors, default_layers  # noqa: E402

SCORE_TOLERANCE = 1e-4  # fp32 forwards over differently padded batches


def random_readout(hidden: int, layers: list[int], seed: int = 0) -> SteeringVectors:
    generator = torch.Generator().manual_seed(seed)
    vectors = {}
    for layer in layers:
        v = torch.randn(1, hidden, generator=generator)
        vectors[layer] = v / v.norm(dim=-1, keepdim=True)
    return SteeringVectors(concepts=["warmth"], layers=layers, vectors=vectors)


def check_agreement(model, tok, prompts, scorer, responses, scores, new_tokens: int) -> dict:
    """Scoring: batched scores of `responses` vs one response at a time. Generation: greedy tokens batched
    vs one at a time. Raises Disagreement when either differs beyond its tolerance."""
    alone = [scorer(model, tok, [r]) for r in responses]
    keys = sorted(scores)
    fast = [[float(scores[k][i]) for k in keys] for i in range(len(responses))]
    slow = [[float(a[k][0]) for k in keys] for a in alone]
    greedy = dict(k=1, temperature=0.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, seed=0)
    batched = generate_responses(model, tok, prompts, batch_size=len(prompts), **greedy)
    single = generate_one_at_a_time(model, tok, prompts, **greedy)
    differing = sum(a.completion_ids != b.completion_ids for a, b in zip(batched, single, strict=True))
    return {
        "scores_vs_one_at_a_time": agree_close(
            "scores, batched vs one response at a time",
            fast,
            slow,
            SCORE_TOLERANCE,
            components=keys,
            responses=len(responses),
        ),
        "greedy_tokens_vs_one_at_a_time": agree(
            "greedy decoding, batched vs one at a time",
            differing,
            0,
            metric="differing_sequences",
            sequences=len(batched),
        ),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", type=int, default=8)
    parser.add_argument("--k", type=int, default=4, help="responses per scenario")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (ours)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def set_up(args: argparse.Namespace):
    """(model, tokenizer, chat prompts of real dream scenarios, the carl + steering scorer)."""
    graph = load_graph("sample")
    model, tok = new_offline_model(graph.nodes["text"].astype(str).tolist())
    model.eval()
    config = DreamConfig(n_scenarios=args.scenarios)
    collisions, _ = dream_scenarios(graph.nodes, graph.edges, config, cycle=0)
    prompts = [scenario_messages(c, excerpt_chars=config.excerpt_chars) for c in collisions]
    layers = default_layers(model.config.num_hidden_layers)
    scorer = CombinedScorer(
        [
            (CarlScorer(), 1.0),
            (SteeringScorer(random_readout(model.config.hidden_size, layers), "warmth"), 1.0),
        ]
    )
    return model, tok, prompts, scorer


def main() -> dict:
    args = parse_args()
    torch.set_num_threads(1)
    model, tok, prompts, scorer = set_up(args)
    common = dict(
        k=args.k,
        temperature=args.temperature,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        seed=0,
    )

    def ours():
        responses = generate_responses(model, tok, prompts, batch_size=args.batch_size, **common)
        return responses, scorer(model, tok, responses)

    def baseline():
        responses = generate_one_at_a_time(model, tok, prompts, **common)
        return responses, [scorer(model, tok, [r]) for r in responses]

    stats = time_interleaved({"ours": ours, "baseline": baseline}, args.repeats)
    responses = stats["ours"]["result"][0]
    n_tokens = sum(len(r.completion_ids) for r in responses)
    baseline_tokens = sum(len(r.completion_ids) for r in stats["baseline"]["result"][0])
    agreement = {  # before any ratio is printed
        "generated_tokens": agree(
            "generated tokens, ours vs baseline",
            abs(n_tokens - baseline_tokens),
            0,
            metric="abs_diff",
            tokens=n_tokens,
        ),
        **check_agreement(model, tok, prompts, scorer, *stats["ours"]["result"], args.new_tokens),
    }
    prompt_tokens = sum(len(r.prompt_ids) for r in responses)
    # Where our time goes: generation alone (one more run) against the whole.
    gen_seconds, _, _ = measure(
        lambda: generate_responses(model, tok, prompts, batch_size=args.batch_size, **common)
    )
    median = {k: s["median"] for k, s in stats.items()}
    peaks = {k: s["peak_mb"] for k, s in stats.items()}
    for name, s in stats.items():
        print(
            f"{name:>9}: median {s['median']:.3f} s, best {s['best']:.3f} s, "
            f"{n_tokens / s['median']:.0f} generated tokens/s, peak +{s['peak_mb']:.1f} MB",
            file=sys.stderr,
        )
    print(
        f"{len(prompts)} scenarios x {args.k} responses x {args.new_tokens} tokens = {n_tokens} tokens; "
        f"mean prompt {prompt_tokens / len(responses):.0f} tokens; ours: generation {gen_seconds:.3f} s "
        f"of {median['ours']:.3f} s",
        file=sys.stderr,
    )
    return {
        "name": "dreams",
        "ratio": round(median["baseline"] / median["ours"], 3),
        "target": 3,
        "agreement": agreement,
        "peak_mb": round(peaks["ours"], 1),
        "memory_ratio": memory_ratio(peaks["baseline"], peaks["ours"]),
        "peak_mb_baseline": round(peaks["baseline"], 1),
        "peak_memory_method": "RSS high-water mark (VmHWM after /proc/self/clear_refs) minus RSS before",
        "tokens_per_s": round(n_tokens / median["ours"], 1),
        "tokens_per_s_baseline": round(n_tokens / median["baseline"], 1),
        "median_seconds": {k: round(v, 4) for k, v in median.items()},
        "best_seconds": {k: round(s["best"], 4) for k, s in stats.items()},
        "ours_generation_seconds": round(gen_seconds, 4),
        "scenarios": len(prompts),
        "responses_per_scenario": args.k,
        "new_tokens_per_response": args.new_tokens,
        "generated_tokens": n_tokens,
        "mean_prompt_tokens": round(prompt_tokens / len(responses), 1),
        "batch_size": args.batch_size,
        "scorer": "carl + steering:warmth (deepest default layer)",
        "model_parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "device": "cpu, 1 thread",
    }


if __name__ == "__main__":
    run_bench(main)
