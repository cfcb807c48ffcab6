"""Benchmark: SmolLM2-135M-Instruct on this CPU: prefill, dream decoding and one SFT step, each against a
plain Hugging Face baseline and against this machine's matrix-multiply limit measured in the same run.

Model: `smollm2-135m-instruct` (the packaged GGUF, dequantized; `--model FOLDER` takes a saved Hugging Face
folder instead, e.g. a `base_model` version). Prompts: real dream scenarios (random walks over the sample
memory graph, collided into chat prompts). Threads: the cores this process may use (`--threads`).

- limit:    GFLOP/s of a 2048 x 2048 matmul in fp32 and in bf16 on those threads (best of `--repeats`
            timings of 4 matmuls, measured at the start and at the end; the higher of the two counts).
- prefill:  ours = the dream scorers' forward (`run_response_forward`: distinct prompts left-padded in one
            batch with a KV cache, then the completions right-padded) + the LM head on the completion
            positions; baseline = one plain `model(ids)` per prompt + completion. Agreement: the
            completion-token logits of both: fp32 `torch.testing.assert_close` (atol 2e-3, rtol 1e-4); bf16
            rounds differently on each side, so ours must be as close to the fp32 logits as the plain bf16
            forward (max |error| <= 2 x its error + 0.05; fp32 greedy token kept as often, less 2 points).
- decoding: ours = `generate_responses` (prompts batched, k samples sharing each prompt's prefilled
            cache) at the real-model dream sampling (T 1.0, top-p 0.9, min-p 0.05); baseline = plain
            `model.generate` for one prompt and one sample at a time, same sampling. Both generate exactly
            `--new-tokens` per response (`min_new_tokens`). Agreement: greedy decoding (k = 1) of every
            prompt must give the same tokens on both sides (fp32; in bf16 reported, not required: left
            padding changes bf16 rounding, and a near-tie may flip).
- SFT step: ours = `train_sft` (TRL SFTTrainer with the crystallization gate) on a pre-tokenized batch;
            baseline = a plain `transformers.Trainer` on the same token ids (labels: completion tokens),
            same batch size, optimizer, learning rate and precision flags. Time: per optimizer step
            (callback at step begin/end), median of the steps after the first. Agreement: the first
            step's loss (same weights, same batch) within rel 1e-4 (fp32) / 2e-2 (bf16).

FLOPs per token (counted, not measured): forward 2 x non-embedding parameters + 4 x layers x context x
hidden (attention scores and values; context = the average causal context of the counted tokens) + 2 x
vocabulary x hidden where logits are computed (the LM head; tied to the embedding, but a real matmul);
training 3 x forward (backward = 2 x forward). Only real tokens count (no padding). Fraction of limit =
FLOPs per token x tokens/s / limit GFLOP/s of the same dtype. Targets: prefill and SFT >= 0.5 of the limit;
decoding >= 3 x the one-at-a-time baseline.

On a shared machine wall-clock fractions move with the other load (a 1 s matmul burst gets a larger share
of the cores than a minute-long forward), so each fraction is also given by CPU time: GFLOP per CPU second
of this process on the path, over GFLOP per CPU second of the matmul (`*_cpu_time`).

Prints one JSON line: ratio = decoding speedup in bf16 (target 3), each fraction of the limit with its
target, peak memory of each path and its baseline, and `agreement`: every check above with its figure and
tolerance (`prefill_fp32`, `prefill_bf16`, `decoding_fp32`, `decoding_bf16` (reported, no tolerance),
`sft_fp32`, `sft_bf16`). Exits 1 without a ratio if a fast path disagrees with its baseline
(`_measure.run_bench`).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

from _measure import Disagreement, agree, measure, memory_ratio, prepare_process, run_bench

# before torch: it may restart the interpreter

prepare_process()

import torch  # noqa: E402
from _flops import forward_flops_per_token, matmul_gflops, mean_causal_context, model_shape  # noqa: E402
from _sft_step import sft_baseline, sft_batch, sft_ours  # noqa: E402

from carl_assets.dreams import (  # noqa: E402
    DreamConfig,
    dream_scenarios,
    generate_responses,
    scenario_messages,
)
from carl_assets.dreams.forward import run_response_forward  # noqa: E402
from carl_assets.dreams.generation import (  # noqa: E402
    GeneratedResponse,
    Sampling,
    encode_prompt,
    pad_and_eos_ids,
)
from carl_assets.memory_graph import load_graph  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DREAM_SAMPLING = Sampling(top_p=0.9, min_p=0.05)  # the real-model dream default (models.defaults)
PREFILL_TOL = {
    "fp32": {"atol": 2e-3, "rtol": 1e-4},
    "bf16": {"error_ratio": 2.0, "slack": 0.05, "argmax_slack": 0.02},
}
SFT_LOSS_TOL = {"fp32": 1e-4, "bf16": 2e-2}


# ---------------------------------------------------------------------------------------------- set-up


def load_model(spec: str) -> tuple[torch.nn.Module, object, float]:
    """(fp32 model in eval mode, tokenizer, load seconds): a saved folder, or the packaged GGUF."""
    started = time.perf_counter()
    if os.path.isdir(spec):
        from carl_assets.models.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(spec, dtype=torch.float32)
    else:
        from carl_assets.models.gguf import load_gguf
        from carl_assets.models.packaged import packaged_model_file

        model, tokenizer = load_gguf(packaged_model_file(spec), dtype=torch.float32)
    model.eval()
    return model, tokenizer, time.perf_counter() - started


def as_dtype(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The fp32 model itself, or a copy in `name`'s dtype (the fp32 weights stay unrounded)."""
    return model if name == "fp32" else copy.deepcopy(model).to(DTYPES[name])


def scenario_prompts(n: int) -> list[list[dict[str, str]]]:
    graph = load_graph("sample")
    config = DreamConfig(n_scenarios=n)
    collisions, _ = dream_scenarios(graph.nodes, graph.edges, config, cycle=0)
    return [scenario_messages(c, excerpt_chars=config.excerpt_chars) for c in collisions][:n]


def completion_texts(n: int) -> list[str]:
    texts = [t for t in load_graph("sample").nodes["text"].astype(str) if len(t) > 200]
    return texts[:n]


# ---------------------------------------------------------------------------------------------- prefill


def prefill_inputs(tokenizer, prompts, completion_tokens: int) -> list[GeneratedResponse]:
    """One response per prompt: its chat prompt ids and `completion_tokens` ids of a memory text."""
    out = []
    for i, (prompt, text) in enumerate(zip(prompts, completion_texts(len(prompts)), strict=True)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:completion_tokens]
        out.append(GeneratedResponse(i, 0, text, encode_prompt(tokenizer, prompt), ids))
    return out


def prefill_ours(model, responses, pad_id: int) -> torch.Tensor:
    with torch.no_grad():
        forward = run_response_forward(model, responses, list(range(len(responses))), pad_id=pad_id)
        if forward is None:
            raise RuntimeError("run_response_forward cannot run this model (no prefilled cache)")
        hidden = forward.predicting_hidden[forward.completion_mask.bool()]
        return model.get_output_embeddings()(hidden).float()


def prefill_baseline(model, responses) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for r in responses:
            ids = torch.tensor([r.prompt_ids + r.completion_ids])
            logits = model(input_ids=ids).logits[0]
            start = len(r.prompt_ids) - 1
            rows.append(logits[start : start + len(r.completion_ids)].float())
    return torch.cat(rows)


def check_prefill(
    name: str, ours: torch.Tensor, base: torch.Tensor, reference: torch.Tensor | None = None
) -> dict[str, object]:
    """fp32: ours equals the plain forward (assert_close's rule: |ours - base| <= atol + rtol x |base|
    everywhere). bf16: both round differently (near-ties flip either way), so ours must be as close to the
    fp32 plain forward (`reference`) as the bf16 plain forward is: max |error| within `error_ratio` times
    its error plus `slack`, and the fp32 greedy token kept at as many positions as the plain bf16 forward
    keeps it, less `argmax_slack`. Returns the agreement record; raises Disagreement."""
    diff = (ours - base).abs().max().item()
    argmax = round((ours.argmax(-1) == base.argmax(-1)).float().mean().item(), 5)
    tol = PREFILL_TOL[name]
    if name == "fp32":
        beyond = ((ours - base).abs() - tol["rtol"] * base.abs()).max().item()
        return agree(
            f"prefill {name} logits vs the plain forward",
            beyond,
            tol["atol"],
            metric="max_abs_diff_beyond_rtol",
            rtol=tol["rtol"],
            max_abs_diff=diff,
            argmax_agreement=argmax,
        )
    if reference is None:
        raise Disagreement(f"prefill {name}: needs the fp32 run first (--dtypes fp32,{name})")
    ours_error = (ours - reference).abs().max().item()
    base_error = (base - reference).abs().max().item()
    greedy = reference.argmax(-1)
    ours_kept = (ours.argmax(-1) == greedy).float().mean().item()
    base_kept = (base.argmax(-1) == greedy).float().mean().item()
    error = agree(
        f"prefill {name} error vs fp32",
        ours_error,
        tol["error_ratio"] * base_error + tol["slack"],
        metric="max_abs_error_vs_fp32",
        baseline_max_abs_error_vs_fp32=base_error,
        rule=f"<= {tol['error_ratio']} x the plain bf16 forward's + {tol['slack']}",
    )
    kept = agree(
        f"prefill {name} fp32 greedy token kept",
        base_kept - ours_kept,
        tol["argmax_slack"],
        metric="argmax_kept_shortfall",
        fp32_argmax_kept=round(ours_kept, 5),
        baseline_fp32_argmax_kept=round(base_kept, 5),
    )
    return {
        "error_vs_fp32": error,
        "fp32_argmax_kept": kept,
        "max_abs_logit_diff": diff,
        "argmax_agreement": argmax,
    }


# ---------------------------------------------------------------------------------------------- decoding


def decode_baseline(
    model,
    tokenizer,
    prompts,
    k: int,
    new_tokens: int,
    temperature: float,
    sampling: Sampling | None,
    seed: int = 0,
) -> list[list[int]]:
    """Plain `generate`, one prompt and one sample per call; greedy when `sampling` is None."""
    pad_id, eos = pad_and_eos_ids(model, tokenizer)
    out = []
    kwargs = (
        {"do_sample": False}
        if sampling is None
        else {"do_sample": True, "temperature": temperature, **sampling.generate_kwargs()}
    )
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([encode_prompt(tokenizer, prompt)])
            for j in range(k):
                torch.manual_seed(seed + i * k + j)
                generated = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    pad_token_id=pad_id,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    **kwargs,
                )
                out.append(generated[0, ids.shape[1] :].tolist())
    return out


def greedy_agreement(model, tokenizer, prompts, new_tokens: int) -> dict[str, float]:
    ours = generate_responses(
        model,
        tokenizer,
        prompts,
        k=1,
        temperature=0.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        batch_size=len(prompts),
    )
    base = decode_baseline(model, tokenizer, prompts, 1, new_tokens, 0.0, None)
    same = [r.completion_ids == b for r, b in zip(ours, base, strict=True)]
    matched = 0
    for r, b in zip(ours, base, strict=True):
        for x, y in zip(r.completion_ids, b, strict=False):
            if x != y:
                break
            matched += 1
    total = sum(len(b) for b in base)
    return {
        "identical_sequences": round(sum(same) / len(same), 4),
        "matching_prefix_tokens": round(matched / total, 4),
    }


# ---------------------------------------------------------------------------------------------- main


def timed(fn, repeats: int, warm_up: bool = True) -> tuple[float, float, object, float]:
    """(median wall seconds, peak extra MB, last result, median CPU seconds of this process) over `repeats`
    calls (after one warm-up call)."""
    if warm_up:
        fn()
    seconds, cpu, peak, result = [], [], 0.0, None
    for _ in range(repeats):
        start_cpu = time.process_time()
        s, p, result = measure(fn)
        cpu.append(time.process_time() - start_cpu)
        seconds.append(s)
        peak = max(peak, p)
    return statistics.median(seconds), peak, result, statistics.median(cpu)


def limit_fractions(
    gflop: float, seconds: tuple[float, float, float, float], limits: dict, name: str
) -> dict:
    """The fraction of this machine's matmul limit (`limits[name]` GFLOP/s wall, `limits["cpu_" + name]`
    per CPU-second) that `gflop` of work reached in (ours wall, baseline wall, ours CPU, baseline CPU)
    seconds."""
    ours_s, base_s, ours_cpu, base_cpu = seconds
    wall, cpu = limits[name], limits["cpu_" + name]
    return {
        "fraction_of_limit": round(gflop / ours_s / wall, 3),
        "fraction_of_limit_baseline": round(gflop / base_s / wall, 3),
        "fraction_of_limit_cpu_time": round(gflop / ours_cpu / cpu, 3),
        "fraction_of_limit_cpu_time_baseline": round(gflop / base_cpu / cpu, 3),
    }


def run_prefill(model, tokenizer, prompts, shape, args, limits, report) -> None:
    pad_id, _ = pad_and_eos_ids(model, tokenizer)
    responses = prefill_inputs(tokenizer, prompts, args.new_tokens)
    lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in responses]
    tokens = sum(lengths)
    logits_share = sum(len(r.completion_ids) for r in responses) / tokens
    flops = forward_flops_per_token(shape, mean_causal_context(lengths), logits_share)
    reference = None
    for name in args.dtypes:
        typed = as_dtype(model, name)
        ours_s, peak, ours, ours_cpu = timed(lambda m=typed: prefill_ours(m, responses, pad_id), args.repeats)
        base_s, base_peak, base, base_cpu = timed(
            lambda m=typed: prefill_baseline(m, responses), args.repeats
        )
        agreement = check_prefill(name, ours, base, reference)
        if name == "fp32":
            reference = base
        report["prefill"][name] = {
            "tokens_per_s": round(tokens / ours_s, 1),
            "tokens_per_s_baseline": round(tokens / base_s, 1),
            **limit_fractions(flops * tokens / 1e9, (ours_s, base_s, ours_cpu, base_cpu), limits, name),
            "peak_mb": round(peak, 1),
            "peak_mb_baseline": round(base_peak, 1),
            "memory_ratio": memory_ratio(base_peak, peak),
            "agreement": agreement,
        }
        print(f"prefill {name}: {report['prefill'][name]}", file=sys.stderr, flush=True)
    report["prefill"]["tokens"] = tokens
    report["prefill"]["gflop_per_token"] = round(flops / 1e9, 4)


def run_decoding(model, tokenizer, prompts, args, report) -> None:
    for name in args.dtypes:
        typed = as_dtype(model, name)
        greedy = greedy_agreement(typed, tokenizer, prompts, args.new_tokens)
        if name == "fp32":  # bf16: reported, not required (left padding changes bf16 rounding)
            agreement = agree(
                f"decoding {name}: batched greedy tokens vs one at a time",
                1.0 - greedy["identical_sequences"],
                0.0,
                metric="differing_sequences_fraction",
                **greedy,
            )
        else:
            agreement = {
                "differing_sequences_fraction": round(1.0 - greedy["identical_sequences"], 4),
                "tolerance": None,
                **greedy,
            }
        ours_s, peak, _, _ = timed(
            lambda m=typed: generate_responses(
                m,
                tokenizer,
                prompts,
                k=args.k,
                temperature=1.0,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                batch_size=len(prompts),
                sampling=DREAM_SAMPLING,
            ),
            1,
            warm_up=False,
        )
        base_s, base_peak, _, _ = timed(
            lambda m=typed: decode_baseline(
                m, tokenizer, prompts, args.k, args.new_tokens, 1.0, DREAM_SAMPLING
            ),
            1,
            warm_up=False,
        )
        generated = len(prompts) * args.k * args.new_tokens
        report["decoding"][name] = {
            "speedup": round(base_s / ours_s, 3),
            "tokens_per_s": round(generated / ours_s, 1),
            "tokens_per_s_baseline": round(generated / base_s, 1),
            "peak_mb": round(peak, 1),
            "peak_mb_baseline": round(base_peak, 1),
            "memory_ratio": memory_ratio(base_peak, peak),
            "agreement": agreement,
        }
        print(f"decoding {name}: {report['decoding'][name]}", file=sys.stderr, flush=True)
    report["decoding"]["generated_tokens"] = len(prompts) * args.k * args.new_tokens


def run_sft(model, tokenizer, prompts, shape, args, limits, report) -> None:
    batch = sft_batch(
        tokenizer,
        prompts[: args.sft_batch],
        completion_texts(args.sft_batch),
        args.sft_length,
        args.new_tokens,
    )
    tokens = sum(len(r) for r in batch["input_ids"])
    logits_share = 1.0  # training computes logits at every position
    flops = 3 * forward_flops_per_token(shape, mean_causal_context([args.sft_length]), logits_share)
    for name in args.dtypes:
        # peak: the whole training call (trainer set-up, optimizer state, steps), above the RSS before it
        ours_model, base_model = copy.deepcopy(model), copy.deepcopy(model)
        _, peak, (ours_steps, ours_loss) = measure(
            lambda m=ours_model, n=name: sft_ours(
                m, tokenizer, batch, n, args.sft_steps, 1e-5, torch.get_num_threads()
            )
        )
        _, base_peak, (base_steps, base_loss) = measure(
            lambda m=base_model, n=name: sft_baseline(m, tokenizer, batch, n, args.sft_steps, 1e-5)
        )
        del ours_model, base_model
        rel = abs(ours_loss - base_loss) / abs(base_loss)
        agreement = agree(
            f"SFT {name}: first-step loss vs the plain Trainer",
            rel,
            SFT_LOSS_TOL[name],
            metric="loss_rel_diff",
            first_loss=round(ours_loss, 6),
            first_loss_baseline=round(base_loss, 6),
        )
        ours_s, base_s = statistics.median(ours_steps.seconds[1:]), statistics.median(base_steps.seconds[1:])
        ours_cpu, base_cpu = statistics.median(ours_steps.cpu[1:]), statistics.median(base_steps.cpu[1:])
        report["sft"][name] = {
            "tokens_per_s": round(tokens / ours_s, 1),
            "tokens_per_s_baseline": round(tokens / base_s, 1),
            "step_seconds": round(ours_s, 3),
            "step_seconds_baseline": round(base_s, 3),
            **limit_fractions(flops * tokens / 1e9, (ours_s, base_s, ours_cpu, base_cpu), limits, name),
            "peak_mb": round(peak, 1),
            "peak_mb_baseline": round(base_peak, 1),
            "memory_ratio": memory_ratio(base_peak, peak),
            "agreement": agreement,
        }
        print(f"sft {name}: {report['sft'][name]}", file=sys.stderr, flush=True)
    report["sft"].update({"tokens_per_step": tokens, "gflop_per_token": round(flops / 1e9, 4)})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="packaged model name or a model folder"
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--prompts", type=int, default=4, help="dream scenario prompts")
    parser.add_argument("--k", type=int, default=4, help="samples per prompt (decoding)")
    parser.add_argument("--new-tokens", type=int, default=24, help="completion tokens (all three)")
    parser.add_argument("--sft-batch", type=int, default=2)
    parser.add_argument("--sft-length", type=int, default=128, help="tokens per SFT example")
    parser.add_argument(
        "--sft-steps", type=int, default=2, help="optimizer steps per side (the first is warm-up)"
    )
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    return args


def summary(
    report: dict, args: argparse.Namespace, limits_start: dict, limits_end: dict, cpu_limits: dict
) -> dict:
    """The JSON record: the decoding ratio, fractions of the limit, peaks, every agreement check."""
    decode_dtype = "bf16" if "bf16" in report["decoding"] else args.dtypes[0]
    decoding = report["decoding"][decode_dtype]
    return {
        "name": "real_model",
        "ratio": decoding["speedup"],
        "target": 3,
        "ratio_is": f"dream decoding speedup over one-at-a-time plain generate ({decode_dtype})",
        "agreement": {
            f"{part}_{d}": report[part][d]["agreement"]
            for part in ("prefill", "decoding", "sft")
            for d in args.dtypes
        },
        "prefill_fraction_of_limit": {d: report["prefill"][d]["fraction_of_limit"] for d in args.dtypes},
        "sft_fraction_of_limit": {d: report["sft"][d]["fraction_of_limit"] for d in args.dtypes},
        "prefill_fraction_of_limit_cpu_time": {
            d: report["prefill"][d]["fraction_of_limit_cpu_time"] for d in args.dtypes
        },
        "sft_fraction_of_limit_cpu_time": {
            d: report["sft"][d]["fraction_of_limit_cpu_time"] for d in args.dtypes
        },
        "limit_gflop_per_cpu_second": {k[4:]: round(v, 1) for k, v in cpu_limits.items()},
        "fraction_target": 0.5,
        "peak_mb": decoding["peak_mb"],
        "memory_ratio": decoding["memory_ratio"],
        "memory_is": f"dream decoding ({decode_dtype}): peak extra RSS of one-at-a-time / ours; per path in "
        "each part",
        "limit_gflops": {d: round(max(limits_start[d], limits_end[d]), 1) for d in DTYPES},
        "limit_gflops_start_end": {d: [round(limits_start[d], 1), round(limits_end[d], 1)] for d in DTYPES},
        **report,
    }


def main() -> dict:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    measured = {name: matmul_gflops(DTYPES[name]) for name in DTYPES}
    limits_start = {name: wall for name, (wall, _) in measured.items()}
    cpu_limits = {f"cpu_{name}": cpu for name, (_, cpu) in measured.items()}
    print(f"matmul limit (GFLOP/s, {args.threads} threads): {measured}", file=sys.stderr, flush=True)
    model, tokenizer, load_s = load_model(args.model)
    shape = model_shape(model)
    prompts = scenario_prompts(max(args.prompts, args.sft_batch))
    report: dict = {"prefill": {}, "decoding": {}, "sft": {}}
    limits = {**limits_start, **cpu_limits}
    # a Disagreement raised in any part ends the bench in run_bench: exit 1, no ratio
    run_prefill(model, tokenizer, prompts[: args.prompts], shape, args, limits, report)
    run_decoding(model, tokenizer, prompts[: args.prompts], args, report)
    run_sft(model, tokenizer, prompts, shape, args, limits, report)
    limits_end = {name: matmul_gflops(DTYPES[name])[0] for name in DTYPES}
    # The higher reading is the limit; the fractions above used the first: rescale them to the higher.
    for name in DTYPES:
        scale = limits_start[name] / max(limits_start[name], limits_end[name])
        for part in ("prefill", "sft"):
            if name in report[part]:
                for key in ("fraction_of_limit", "fraction_of_limit_baseline"):
                    report[part][name][key] = round(report[part][name][key] * scale, 3)
    return {
        **summary(report, args, limits_start, limits_end, cpu_limits),
        "model": args.model,
        "model_shape": shape,
        "load_seconds": round(load_s, 1),
        "prompts": args.prompts,
        "k": args.k,
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
        "device": f"cpu, {torch.get_num_threads()} threads",
    }


if __name__ == "__main__":
    run_bench(main)
