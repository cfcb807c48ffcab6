"""Agreement of the emotion taggers with the sample graph's own tags, held out.

Protocol: the user-tagged nodes of the built-in sample graph are split into K folds (seeded). For each
fold its nodes' tag lines are hidden (tags_json = {}), and `tag_nodes` tags them with the tagger under
test (min_score 0, so every scored (node, emotion) has a raw score), the other folds keeping their user
tags (so the emotion list is the graph's own). Every tagged node is thus scored once, held out.

Per emotion, two AUCs of the tagger's raw score (the model's expected score, the lexicon's hits per
100 words), Mann-Whitney with ties counted half:
- presence: nodes whose tag line names the emotion vs nodes whose tag line does not;
- high: nodes scoring it >= 8 (the pairs' positives) vs nodes without it (the pairs' negatives).
Spread: a 95 % bootstrap interval over nodes (resampled within each class), and the standard
deviation of the per-fold AUCs. 0.5 is chance. Emotions no lexicon category covers have no AUC.

Usage (from the project root; HF offline):
    .venv/bin/python scripts/tagger_agreement.py --taggers lexicon,offline
    .venv/bin/python scripts/tagger_agreement.py --taggers smollm2 --max-nodes 40 --emotions joy,love,...
Prints a table per tagger and, with --json, writes every number to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from carl_assets.memory.graph import load_graph  # noqa: E402
from carl_assets.memory.tagging import emotion_vocabulary, tag_nodes, user_tags  # noqa: E402
from carl_assets.steering.vectors import auc  # noqa: E402

HIGH = 8  # the pairs' min_positive_score


def folds(node_ids: list[str], k: int, seed: int) -> list[list[str]]:
    order = np.random.default_rng(seed).permutation(len(node_ids))
    return [[node_ids[i] for i in order[f::k]] for f in range(k)]


def held_out_scores(nodes: pd.DataFrame, tagger: str, k: int, seed: int, emotions: list[str] | None,
                    max_nodes: int | None, **kwargs) -> pd.DataFrame:
    """Raw scores (node_id, emotion, raw_score, fold) of every held-out node, tags hidden."""
    tagged = nodes[[bool(json.loads(t)) for t in nodes["tags_json"]]].reset_index(drop=True)
    ids = tagged["node_id"].astype(str).tolist()
    if max_nodes:  # a seeded subset for slow taggers
        rng = np.random.default_rng(seed + 1)
        ids = sorted(rng.choice(ids, size=min(max_nodes, len(ids)), replace=False))
    rows = []
    for f, held in enumerate(folds(ids, k, seed)):
        frame = tagged.copy()
        # hidden: the fold's tag lines; dropped: nodes outside the subset (they keep the vocabulary only)
        hide = frame["node_id"].isin(held)
        frame.loc[hide, "tags_json"] = "{}"
        started = time.time()
        tags = tag_nodes(frame, tagger, emotions, min_score=0, **kwargs)
        out = tags[(tags["source"] != "user") & tags["node_id"].isin(held)]
        rows.append(out.assign(fold=f)[["node_id", "emotion", "raw_score", "fold"]])
        print(f"  {tagger}: fold {f + 1}/{k}, {len(held)} nodes, {time.time() - started:.0f} s",
              file=sys.stderr)
    return pd.concat(rows, ignore_index=True)


def bootstrap_interval(pos: np.ndarray, neg: np.ndarray, n: int, seed: int) -> tuple[float, float]:
    if len(pos) == 0 or len(neg) == 0 or n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = [auc(rng.choice(pos, len(pos)), rng.choice(neg, len(neg))) for _ in range(n)]
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def agreement(scores: pd.DataFrame, truth: pd.DataFrame, emotions: list[str], n_boot: int,
              seed: int) -> pd.DataFrame:
    """Per emotion: n_pos, n_neg, AUC (presence and high) with bootstrap interval and fold spread."""
    held = scores[["node_id", "fold"]].drop_duplicates()
    rows = []
    for emotion in emotions:
        mine = scores[scores["emotion"] == emotion].set_index("node_id")
        given = truth[truth["emotion"] == emotion].set_index("node_id")["score"]
        row = {"emotion": emotion}
        for label in ("presence", "high"):
            data = held.assign(raw=held["node_id"].map(mine["raw_score"]), user=held["node_id"].map(given))
            pos_mask = data["user"].notna() if label == "presence" else data["user"] >= HIGH
            neg_mask = data["user"].isna()
            if data["raw"].isna().all():  # the tagger does not score this emotion
                row.update({f"{label}_auc": np.nan, f"{label}_lo": np.nan, f"{label}_hi": np.nan,
                            f"{label}_fold_sd": np.nan})
                continue
            pos, neg = data.loc[pos_mask, "raw"].to_numpy(float), data.loc[neg_mask, "raw"].to_numpy(float)
            per_fold = [auc(data.loc[pos_mask & (data["fold"] == f), "raw"].to_numpy(float),
                            data.loc[neg_mask & (data["fold"] == f), "raw"].to_numpy(float))
                        for f in sorted(data["fold"].unique())]
            lo, hi = bootstrap_interval(pos, neg, n_boot, seed)
            row.update({f"{label}_auc": auc(pos, neg), f"{label}_lo": lo, f"{label}_hi": hi,
                        f"{label}_fold_sd": float(np.nanstd(per_fold)) if len(per_fold) > 1 else np.nan,
                        f"n_{label}_pos": len(pos), "n_neg": len(neg)})
        rows.append(row)
    table = pd.DataFrame(rows)
    mean = table[[c for c in table.columns if c.endswith("_auc")]].mean(numeric_only=True)
    return pd.concat([table, pd.DataFrame([{"emotion": "MEAN", **mean.to_dict()}])], ignore_index=True)


def load_model(spec: str, cache: Path, texts: list[str]):
    from carl_assets.models.loading import load_model_and_tokenizer, prepare_base_model

    if spec == "offline":
        folder = cache / "offline_model"
        if not (folder / "config.json").exists():
            print("building the offline model (as base_model does)...", file=sys.stderr)
            prepare_base_model("offline", texts, folder)
        return load_model_and_tokenizer(folder)
    return load_model_and_tokenizer(spec)


def fmt(table: pd.DataFrame) -> str:
    def cell(v, lo, hi, sd):
        if v != v:
            return "—"
        spread = f" [{lo:.2f}, {hi:.2f}]" if lo == lo else ""
        return f"{v:.2f}{spread}" + (f" ±{sd:.2f}" if sd == sd else "")

    lines = ["| emotion | n pos / neg | AUC presence [95% boot] ±fold sd "
             "| AUC high (>=8) [95% boot] ±fold sd |",
             "|---|---|---|---|"]
    for r in table.to_dict("records"):
        counts = f"{int(r['n_presence_pos'])} / {int(r['n_neg'])}" if r.get("n_presence_pos") == r.get(
            "n_presence_pos") and "n_presence_pos" in r else ""
        presence, high = (cell(r[f"{name}_auc"], r.get(f"{name}_lo", np.nan), r.get(f"{name}_hi", np.nan),
                               r.get(f"{name}_fold_sd", np.nan)) for name in ("presence", "high"))
        lines.append(f"| {r['emotion']} | {counts} | {presence} | {high} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--taggers", default="lexicon,offline",
                        help="comma list of: lexicon, offline (the offline model), smollm2 (the packaged "
                        "SmolLM2-135M-Instruct), or a model folder / hub id")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--max-nodes", type=int, default=0, help="score only this many tagged nodes (0: all)")
    parser.add_argument("--emotions", default="", help="comma list (default: every emotion of the graph)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a small busy CPU)")
    parser.add_argument("--cache", default=".carl/tagger_agreement", help="where the offline model is built")
    parser.add_argument("--json", default="", help="write all numbers here")
    args = parser.parse_args(argv)

    graph = load_graph("sample")
    nodes = graph.nodes
    emotions = [e for e in args.emotions.split(",") if e] or emotion_vocabulary(nodes)
    truth = user_tags(nodes)
    results = {}
    for name in [t for t in args.taggers.split(",") if t]:
        started = time.time()
        if name == "lexicon":
            scores = held_out_scores(nodes, "lexicon", args.folds, args.seed, emotions,
                                     args.max_nodes or None)
        else:
            spec = {"smollm2": "smollm2-135m-instruct"}.get(name, name)
            model, tokenizer = load_model(spec, Path(args.cache), graph.texts())
            scores = held_out_scores(nodes, "model", args.folds, args.seed, emotions, args.max_nodes or None,
                                     model=model, tokenizer=tokenizer, batch_size=args.batch_size,
                                     threads=args.threads)
        table = agreement(scores, truth, emotions, args.bootstrap, args.seed)
        n_nodes = scores["node_id"].nunique()
        print(f"\n### {name}: {n_nodes} held-out nodes, {args.folds} folds, {time.time() - started:.0f} s\n")
        print(fmt(table))
        results[name] = {"nodes": n_nodes, "seconds": round(time.time() - started, 1),
                         "table": json.loads(table.to_json(orient="records"))}
    if args.json:
        Path(args.json).write_text(json.dumps({"protocol": {k: v for k, v in vars(args).items()},
                                               "emotions": emotions, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
