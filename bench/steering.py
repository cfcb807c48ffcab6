"""Benchmark: amygdala readout extraction against `steering-vectors` and against a bare forward pass.

Data: (emotion, polarity, text) pairs from several seeds of the sample memory graph, balanced per
emotion (equal positive and negative counts, because the reference zips pairs), at least 2,000 pair
texts. As in real pairs, one node text is a positive for some emotions and a negative for most others.
Model: the default-size offline Llama (hidden 128, 4 blocks, BPE vocabulary trained on the texts),
randomly initialised (timing does not need its pretraining). Layers: the default four, [1, 2, 3, 4].

Ways over the same pairs, in one run, one torch thread each, each timed the same way:

- ours:         `train_steering_vectors` (reduction "last", held-out AUC included): each unique text once,
                sorted by length, batched, the forward stopped after the deepest layer, activations folded
                into running sums.
- reference:    `steering_vectors.train_steering_vector`, called once per emotion as its API requires (it
                trains one concept per call), so every text runs once per emotion it is a pair of; same
                batch size, `read_token_index=-1` (its layer n = our layer n + 1).
- shared_pass:  the straightforward shared pass a user would write without the reference: each unique
                text once in the same length-sorted batches, `output_hidden_states=True` through the whole
                model (LM head included), the last real token of each layer kept for every text, then
                per emotion mean(positive) - mean(negative) by indexing. Same numbers as ours.
- bare:         a bare batched forward of the full model (`model(**batch)`, tokenization included) over
                the same unique texts in the same batches, nothing read: the floor.
- reference_bs1 (only with --with-bs1): the reference at its default batch size of 1.

Timing protocol, the same for every way: one warm-up call each, then `--repeats` (>= 3) interleaved rounds;
every ratio is baseline median / our median. Peak memory: resident memory (RSS) sampled by the kernel, not
tracemalloc (torch's CPU tensors are invisible to it): /proc/self/clear_refs resets VmHWM before each call and
the peak is VmHWM minus the RSS just before the call. The script re-executes itself with
MALLOC_MMAP_THRESHOLD_=65536 so glibc returns large freed buffers to the OS and a later call cannot look
cheaper by reusing an earlier call's pages.

Agreement, checked in the same run on the timed calls' outputs before any ratio is printed (else exit 1, no
JSON line): our vectors equal the normalised reference vectors (max relative error <= 1e-5) and the
shared-pass vectors (max |difference| <= 1e-5, unit vectors; the layers before the last). The bare forward
computes no vectors: it is a floor, not a baseline. Prints one JSON line: ratio = reference median / our
median (target >= 3), ratio_vs_shared_pass, ratio_vs_bare_forward = bare / ours (target >= 1/1.2, i.e. ours
within 1.2x of a bare forward), peak_mb (ours), memory_ratio = the reference's peak / ours, agreement. """

from __future__ import annotations

import argparse
import json
import sys

from _measure import agree, memory_ratio, prepare_process, run_bench, time_interleaved

# before torch: it may restart the interpreter

prepare_process()

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402, F401  (before the sklearn placeholder: torch probes installed modules)

from carl_assets.memory.graph import extract_training_pairs, graph_from_records  # noqa: E402
from carl_assets.memory.sample import SAMPLE_SEED, sample_records  # noqa: E402
from carl_assets.models.loading import new_offline_model  # noqa: E402
from carl_assets.steering import train_steering_vectors  # noqa: E402
from carl_assets.steering.reference import import_train_steering_vector  # noqa: E402

VECTOR_TOLERANCE = 1e-5  # unit vectors in fp32, summed in another order on each side


def balanced_pairs(n_graphs: int) -> pd.DataFrame:
    frames = []
    for k in range(n_graphs):
        records = sample_records(SAMPLE_SEED + k)
        graph = graph_from_records(
            ((i, r, json.dumps(r)) for i, r in enumerate(records, start=1)), f"sample{k}"
        )
        frames.append(extract_training_pairs(graph, max_examples_per_emotion=10_000, seed=k))
    pairs = pd.concat(frames, ignore_index=True)
    rows = []
    for _, group in pairs.groupby("emotion", sort=True):
        pos = group[group["polarity"] == "positive"]
        neg = group[group["polarity"] == "negative"]
        k = min(len(pos), len(neg))
        rows += [pos.head(k), neg.head(k)]
    return pd.concat(rows, ignore_index=True)[["emotion", "polarity", "text"]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--graphs", type=int, default=2, help="sample graphs (seeds) to draw pairs from")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--with-bs1", action="store_true", help="also time the reference at batch size 1 (slow)"
    )
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be at least 3 (ratios compare medians)")
    return args


def shared_pass_way(model, tok, sorted_texts: list[str], members: dict, layers: list[int], batch_size: int):
    """Each unique text once, full forward with output_hidden_states, diff of means by indexing."""

    def run():
        per_batch = []
        with torch.inference_mode():
            for start in range(0, len(sorted_texts), batch_size):
                batch = tok(sorted_texts[start : start + batch_size], return_tensors="pt", padding=True)
                hidden = model(**batch, output_hidden_states=True).hidden_states
                last = batch["attention_mask"].sum(dim=1) - 1  # right padding
                rows = torch.arange(len(last))
                # hidden_states[x] is the output of block x-1, except the last entry (after the final
                # norm): the same work either way, but only the layers before the last are compared.
                per_batch.append(torch.stack([hidden[x][rows, last] for x in layers], dim=1))
        acts = torch.cat(per_batch).double()  # [texts, layers, hidden]
        out = {}
        for e, (pos, neg) in members.items():
            diff = acts[pos].mean(dim=0) - acts[neg].mean(dim=0)
            out[e] = diff / diff.norm(dim=-1, keepdim=True)
        return out

    return run


def build_ways(args: argparse.Namespace, pairs: pd.DataFrame, model, tok, layers: list[int]) -> dict:
    """ours, reference, shared_pass, bare (and reference_bs1 with --with-bs1) over the same pairs."""
    unique_texts = list(dict.fromkeys(pairs["text"]))
    by_emotion = {
        e: (
            pairs[(pairs.emotion == e) & (pairs.polarity == "positive")]["text"].tolist(),
            pairs[(pairs.emotion == e) & (pairs.polarity == "negative")]["text"].tolist(),
        )
        for e in sorted(pairs["emotion"].unique())
    }
    train_steering_vector = import_train_steering_vector()

    def ours():
        return train_steering_vectors(
            model, tok, pairs, layers=layers, batch_size=args.batch_size, reduction="last"
        )

    def reference(batch_size: int):
        def run():
            return {
                e: train_steering_vector(
                    model,
                    tok,
                    list(zip(pos, neg, strict=True)),
                    layers=[x - 1 for x in layers],
                    read_token_index=-1,
                    batch_size=batch_size,
                )
                for e, (pos, neg) in by_emotion.items()
            }

        return run

    encoded = tok(unique_texts)["input_ids"]
    sorted_texts = [unique_texts[i] for i in sorted(range(len(unique_texts)), key=lambda i: len(encoded[i]))]
    text_row = {t: i for i, t in enumerate(sorted_texts)}
    members = {
        e: (torch.as_tensor([text_row[t] for t in pos]), torch.as_tensor([text_row[t] for t in neg]))
        for e, (pos, neg) in by_emotion.items()
    }

    def bare():
        with torch.inference_mode():
            for start in range(0, len(sorted_texts), args.batch_size):
                batch = tok(sorted_texts[start : start + args.batch_size], return_tensors="pt", padding=True)
                model(**batch)

    ways = {
        "ours": ours,
        "reference": reference(args.batch_size),
        "shared_pass": shared_pass_way(model, tok, sorted_texts, members, layers, args.batch_size),
        "bare": bare,
    }
    if args.with_bs1:
        ways["reference_bs1"] = reference(1)
    return ways


def check_agreement(results: dict, layers: list[int]) -> dict:
    """Our vectors vs the normalised reference vectors and vs the shared pass; raises Disagreement."""
    sv, ref = results["ours"], results["reference"]
    worst = 0.0
    for k, emotion in enumerate(sv.concepts):
        for layer in layers:
            expected = ref[emotion].layer_activations[layer - 1].double()
            expected = expected / expected.norm()
            worst = max(worst, float((sv.vectors[layer][k].double() - expected).norm() / expected.norm()))
    # The shared pass reads output_hidden_states, whose last entry is after the final norm: compare it
    # on the layers before the last block only.
    shared_worst = 0.0
    for k, emotion in enumerate(sv.concepts):
        for j, layer in enumerate(layers[:-1]):
            expected = results["shared_pass"][emotion][j]
            shared_worst = max(shared_worst, float((sv.vectors[layer][k].double() - expected).norm()))
    return {
        "vectors_vs_reference": agree(
            "vectors vs steering-vectors",
            worst,
            VECTOR_TOLERANCE,
            metric="max_relative_error",
            vectors=len(sv.concepts) * len(layers),
        ),
        "vectors_vs_shared_pass": agree(
            "vectors vs the shared pass",
            shared_worst,
            VECTOR_TOLERANCE,
            metric="max_abs_diff",
            vectors=len(sv.concepts) * (len(layers) - 1),
        ),
    }


BASELINES = {
    "reference": "steering-vectors train_steering_vector, one call per emotion (one concept per call: "
    "each text runs once per emotion it belongs to)",
    "shared_pass": "each unique text once, full forward with output_hidden_states, diff of means by indexing",
    "bare": "full forward of each unique text once, nothing read",
}


def main() -> dict:
    args = parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pairs = balanced_pairs(args.graphs)
    unique_texts = list(dict.fromkeys(pairs["text"]))
    model, tok = new_offline_model(unique_texts)
    layers = [1, 2, 3, 4]
    emotions = sorted(pairs["emotion"].unique())
    print(
        f"{len(pairs)} pair texts, {len(unique_texts)} unique, {len(emotions)} emotions, "
        f"model {sum(p.numel() for p in model.parameters()):,} parameters",
        file=sys.stderr,
    )
    stats = time_interleaved(build_ways(args, pairs, model, tok, layers), args.repeats)
    agreement = check_agreement({name: s["result"] for name, s in stats.items()}, layers)  # before any ratio
    median = {name: s["median"] for name, s in stats.items()}
    peaks = {name: s["peak_mb"] for name, s in stats.items()}
    for name, s in stats.items():
        print(
            f"{name:>14}: median {s['median']:.3f} s of {len(s['seconds'])} "
            f"({', '.join(f'{x:.3f}' for x in s['seconds'])}), peak +{s['peak_mb']:.1f} MB",
            file=sys.stderr,
        )
    return {
        "name": "steering_vectors_extraction",
        "ratio": round(median["reference"] / median["ours"], 3),
        "target": 3.0,
        "agreement": agreement,
        "ratio_vs_shared_pass": round(median["shared_pass"] / median["ours"], 3),
        "ratio_vs_bare_forward": round(median["bare"] / median["ours"], 3),
        "target_vs_bare_forward": round(1 / 1.2, 3),
        "ratio_vs_reference_batch1": round(median["reference_bs1"] / median["ours"], 3)
        if args.with_bs1
        else None,
        "peak_mb": round(peaks["ours"], 1),
        "memory_ratio": memory_ratio(peaks["reference"], peaks["ours"]),
        "peak_mb_reference": round(peaks["reference"], 1),
        "peak_mb_shared_pass": round(peaks["shared_pass"], 1),
        "peak_mb_bare": round(peaks["bare"], 1),
        "peak_memory_method": "RSS high-water mark (VmHWM after /proc/self/clear_refs) minus RSS before",
        "timing": f"one warm-up per way, then median of {args.repeats} interleaved runs per way",
        "baselines": BASELINES,
        "median_seconds": {k: round(v, 4) for k, v in median.items()},
        "pair_texts": len(pairs),
        "unique_texts": len(unique_texts),
        "emotions": len(emotions),
        "layers": layers,
        "batch_size": args.batch_size,
        "device": "cpu, 1 thread",
    }


if __name__ == "__main__":
    run_bench(main)
