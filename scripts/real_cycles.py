"""Dream cycles in two arms (plain scorer vs a `steering:<emotion>` scorer) with the two behavioural
measures of carl_assets.dreams.behaviour after each cycle, each against its control.

    usage: .venv/bin/python scripts/real_cycles.py [--preset offline|real] [--cycles N] [--home DIR]
           [--emotion E] [--steer-scorer SPEC] [--max-texts 64] [--heldout-scenarios 8]

Protocol:
- setup once in HOME/shared (`carl materialize --select +steering_vectors`: base model, memory graph,
  readout), copied into HOME/plain and HOME/steering (each with its own DAGSTER_HOME);
- each cycle, in each arm, `carl materialize --job retraining` (dreams from the previous cycle's GRPO
  checkpoint, else base_model; SFT; GRPO; evaluation) with `dream_scenarios.scorer` the arm's scorer;
- after each cycle, the arm's policy (grpo_checkpoint) is measured:
  absorption: per-token NLL of (a) held-out memory texts (a fixed hash-ordered subset of the non-stub
  nodes, less every node that reached a dream prompt in either arm), (b) the nodes of this arm's kept
  dreams (control: what SFT saw in its prompts), (c) `GENERIC_TEXTS` (control: general drift); each
  paired with base_model on the same texts, bootstrap over texts;
  readout: the policy's answers to the plain arm's cycle-0 held-out scenarios (`dream_heldout`), read by
  base_model and projected on the emotion's vector; per arm vs base's answers, and steering - plain
  paired by scenario, bootstrap over scenarios.
Prints the table after every cycle and writes HOME/behaviour.json (all per-text and per-answer rows too).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from carl_assets import storage
from carl_assets.artifacts import ArtifactVersions
from carl_assets.defs.presets import merge_run_config
from carl_assets.dreams import behaviour as B
from carl_assets.dreams.generation import Sampling
from carl_assets.dreams.loop import DreamSettings
from carl_assets.models.defaults import agent_sampling_defaults, is_offline_model, resolve_placement
from carl_assets.models.loading import load_model_and_tokenizer
from carl_assets.steering.vectors import load_readout

ROOT = Path(__file__).resolve().parent.parent
CARL = str(ROOT / ".venv" / "bin" / "carl")
ARMS = ("plain", "steering")
# One dream cycle without agent_evaluation (--with-evaluation runs the whole `retraining` job); the memory
# graph does not change between cycles here, so memory_graph and emotion_tags are not rerun.
CYCLE_ASSETS = "dream_scenarios,sft_dataset,sft_checkpoint,crystallization_events,grpo_checkpoint"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def start_carl(home: Path, args: list[str], log_file: Path) -> subprocess.Popen:
    """Start `carl materialize ...` with this arm's CARL_HOME and DAGSTER_HOME; output to `log_file`."""
    env = dict(os.environ, CARL_HOME=str(home / "carl"), DAGSTER_HOME=str(home / "dagster"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    if not (home / "dagster" / "dagster.yaml").exists():
        (home / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    out = open(log_file, "a")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([CARL, "materialize", *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                            cwd=ROOT)


def carl(runs: dict[Path, list[str]], log_name: str) -> dict[Path, int]:
    """Run `carl materialize` in each home at once (the arms are independent; on a shared machine two
    processes also get two shares of the CPU) and wait for all; the return code per home."""
    start = time.time()
    procs = {home: start_carl(home, args, home / log_name) for home, args in runs.items()}
    codes = {home: proc.wait() for home, proc in procs.items()}
    for home, rc in codes.items():
        log(f"carl materialize {' '.join(runs[home])} in {home.name}: rc {rc} ({home / log_name}), "
            f"{time.time() - start:.0f} s")
    return codes


def current(home: Path, asset: str) -> Path:
    return ArtifactVersions(storage.artifact_dir(asset, home / "carl"), asset).path()


def table(home: Path, name: str) -> pd.DataFrame | None:
    try:
        return storage.read_table(home / "carl" / "carl.duckdb", name)
    except Exception:  # noqa: BLE001 - a table not written yet
        return None


def setup(home: Path, preset: str) -> None:
    shared = home / "shared"
    if (shared / "carl" / "artifacts" / "steering_vectors").is_dir():
        log("setup: reusing shared/ (steering_vectors present)")
    elif carl({shared: ["--preset", preset, "--select", "*steering_vectors"]}, "setup.log")[shared] != 0:
        sys.exit(f"setup failed: see {shared / 'setup.log'}")
    for arm in ARMS:
        if not (home / arm / "carl").exists():
            shutil.copytree(shared / "carl", home / arm / "carl", symlinks=True)


def arm_config(home: Path, arm: str, spec: str, heldout: int, overlay: str | None = None) -> Path:
    """The arm's run config (laid over the preset): held-out scenarios, the steering arm's scorer, and an
    optional YAML `overlay` shared by both arms (e.g. smaller budgets) under them."""
    config: dict[str, Any] = {"heldout_scenarios": heldout}
    if arm == "steering":
        config["scorer"] = spec
    base = yaml.safe_load(Path(overlay).read_text()) if overlay else {}
    merged = merge_run_config(base or {}, {"ops": {"dream_scenarios": {"config": config}}})
    path = home / f"{arm}.yaml"
    path.write_text(yaml.safe_dump(merged))
    return path


class Measurer:
    """Holds the fixed reader (base_model), the readout and the texts; measures one checkpoint."""

    def __init__(self, home: Path, args: argparse.Namespace):
        shared = home / "shared"
        base_dir = current(shared, "base_model")
        self.offline = is_offline_model(base_dir)
        self.device, self.dtype = resolve_placement("auto", args.dtype, self.offline)
        self.base, self.tokenizer = load_model_and_tokenizer(base_dir, device=self.device, dtype=self.dtype)
        self.vectors = load_readout(current(shared, "steering_vectors"))
        self.emotion = args.emotion or pick_emotion(self.vectors)
        self.nodes = table(shared, "memory_nodes")
        self.candidates = B.memory_candidates(self.nodes, args.max_texts)
        self.args = args
        self.base_nll: dict[str, dict[str, float]] = {}
        sampling = agent_sampling_defaults(self.offline)
        self.temperature = sampling.temperature
        self.sampling = Sampling(top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p)
        self.k = args.k if self.temperature > 0 else 1  # greedy answers are all alike
        self.excerpt_chars = DreamSettings().excerpt_chars  # the scenarios' prompts as the dreams' default

    def nll(self, model: Any, texts: dict[str, str]) -> dict[str, dict[str, float]]:
        frame = B.text_nll(model, self.tokenizer, list(texts.values()), batch_size=self.args.batch_size,
                           max_length=self.args.max_length)
        return {key: {"tokens": int(t), "nll_sum": float(s)}
                for key, t, s in zip(texts, frame["tokens"], frame["nll_sum"], strict=True)}

    def base_for(self, texts: dict[str, str]) -> None:
        missing = {k: v for k, v in texts.items() if k not in self.base_nll}
        if missing:
            self.base_nll.update(self.nll(self.base, missing))

    def answers(self, model: Any, tokenizer: Any, collisions: list) -> pd.DataFrame:
        return B.answer_projections(model, tokenizer, self.base, self.tokenizer, self.vectors, self.emotion,
                                    collisions, excerpt_chars=self.excerpt_chars, k=self.k,
                                    temperature=self.temperature,
                                    sampling=self.sampling, max_new_tokens=self.args.max_new_tokens,
                                    seed=self.args.seed,
                                    batch_size=self.args.batch_size)


def pick_emotion(vectors: Any) -> str:
    """The emotion whose readout separates best on held-out pairs (stats' AUC at the deepest layer)."""
    stats = vectors.stats
    layer = max(vectors.layers)
    for column in ("heldout_auc", "auc_heldout", "auc"):
        if stats is not None and column in stats.columns:
            rows = stats[stats["layer"] == layer].sort_values(column, ascending=False)
            if len(rows):
                return str(rows.iloc[0]["emotion"])
    return sorted(vectors.concepts)[0]


def node_texts(nodes: pd.DataFrame, ids: list[str]) -> dict[str, str]:
    lookup = dict(zip(nodes["node_id"].astype(str), nodes["text"].fillna("").astype(str), strict=True))
    return {f"node:{i}": lookup[i] for i in ids if lookup.get(i, "").strip()}


def measure(m: Measurer, home: Path, arm: str, cycle: int, collisions: list, records: dict) -> None:
    """Score the arm's current GRPO checkpoint: NLL of candidates, dreamed nodes and generic texts;
    answers."""
    arm_home = home / arm
    scenarios = table(arm_home, "dream_scenarios")
    kept = scenarios[scenarios["kept"].astype(bool)] if scenarios is not None else None
    dreamed = sorted(B.node_ids_in([kept]))[: m.args.max_texts]
    texts = {**node_texts(m.nodes, m.candidates["node_id"].tolist()), **node_texts(m.nodes, dreamed),
             **{f"generic:{i}": t for i, t in enumerate(B.GENERIC_TEXTS)}}
    m.base_for(texts)
    policy_dir = current(arm_home, "grpo_checkpoint")
    model, tokenizer = load_model_and_tokenizer(policy_dir, device=m.device, dtype=m.dtype)
    start = time.time()
    records["nll"].extend({"arm": arm, "cycle": cycle, "key": k, **v} for k, v in m.nll(model, texts).items())
    frame = m.answers(model, tokenizer, collisions)
    records["answers"].extend({"arm": arm, "cycle": cycle, **row} for row in frame.to_dict("records"))
    records["dreamed"][f"{arm}:{cycle}"] = dreamed
    log(f"measured {arm} cycle {cycle} ({policy_dir.name}): {len(texts)} texts, {len(frame)} answers, "
        f"{time.time() - start:.0f} s")


def absorption_rows(m: Measurer, records: dict, reached: set[str]) -> list[dict[str, Any]]:
    nll = pd.DataFrame(records["nll"])
    heldout = {f"node:{i}" for i in m.candidates["node_id"] if i not in reached}
    rows = []
    for (arm, cycle), group in nll.groupby(["arm", "cycle"], sort=True):
        dreamed = {f"node:{i}" for i in records["dreamed"][f"{arm}:{cycle}"]}
        for split, keys in (("heldout", heldout), ("dreamed", dreamed),
                            ("generic", {k for k in group["key"] if k.startswith("generic:")})):
            after = group[group["key"].isin(keys)].sort_values("key")
            before = pd.DataFrame([{"tokens": m.base_nll[k]["tokens"], "nll_sum": m.base_nll[k]["nll_sum"]}
                                   for k in after["key"]])
            if after.empty:
                continue
            out = B.absorption_delta(before, after.reset_index(drop=True), n_boot=m.args.n_boot,
                                     seed=m.args.seed)
            rows.append({"arm": arm, "cycle": int(cycle), "split": split, "texts": out["texts"],
                         "nll_base": out["nll_before"], "nll": out["nll_after"], "ppl": out["ppl_after"],
                         "delta": out["delta"].to_dict()})
    return rows


def readout_rows(m: Measurer, records: dict) -> list[dict[str, Any]]:
    answers = pd.DataFrame(records["answers"])
    base = answers[answers["arm"] == "base"]
    rows = [{"arm": "base", "cycle": -1, "projection": B.projection_summary(base, m.args.n_boot).to_dict()}]
    for (arm, cycle), group in answers[answers["arm"] != "base"].groupby(["arm", "cycle"], sort=True):
        row = {"arm": arm, "cycle": int(cycle),
               "projection": B.projection_summary(group, m.args.n_boot, m.args.seed).to_dict(),
               "vs_base": B.paired_projection_delta(group, base, m.args.n_boot, m.args.seed).to_dict()}
        plain = answers[(answers["arm"] == "plain") & (answers["cycle"] == cycle)]
        if arm == "steering" and len(plain):
            row["steering_minus_plain"] = B.paired_projection_delta(group, plain, m.args.n_boot,
                                                                    m.args.seed).to_dict()
        rows.append(row)
    return rows


def fmt(interval: dict[str, Any] | None, digits: int = 3) -> str:
    if not interval:
        return "-"
    return f"{interval['mean']:+.{digits}f} [{interval['low']:+.{digits}f}, {interval['high']:+.{digits}f}]"


def report(m: Measurer, home: Path, records: dict) -> dict[str, Any]:
    reached = B.node_ids_in([table(home / arm, name) for arm in ARMS
                             for name in ("dream_scenarios", "dream_heldout")])
    absorption, readout = absorption_rows(m, records, reached), readout_rows(m, records)
    print(f"\nMemory absorption: pooled NLL (nats/token) under each arm's GRPO checkpoint; "
          f"delta vs base_model, paired over texts, 95 % bootstrap ({m.args.n_boot})")
    print(f"{'arm':9} {'cycle':>5} {'split':8} {'texts':>5} {'NLL base':>9} {'NLL':>7} {'ppl':>8}  "
          "delta vs base")
    for r in absorption:
        print(f"{r['arm']:9} {r['cycle']:>5} {r['split']:8} {r['texts']:>5} {r['nll_base']:9.3f} "
              f"{r['nll']:7.3f} {r['ppl']:8.1f}  {fmt(r['delta'])}")
    print(f"\nReadout projection on {m.emotion!r} (layer {max(m.vectors.layers)}, read by base_model) "
          f"of the policy's answers to {len(set(pd.DataFrame(records['answers'])['dream_id']))} "
          f"held-out scenarios x {m.k}; "
          "mean over scenarios [95 % bootstrap]")
    print(f"{'arm':9} {'cycle':>5}  {'projection':28} {'vs base (paired)':28} steering - plain (paired)")
    for r in readout:
        print(f"{r['arm']:9} {r['cycle']:>5}  {fmt(r['projection']):28} {fmt(r.get('vs_base')):28} "
              f"{fmt(r.get('steering_minus_plain'))}")
    cycles = {arm: table(home / arm, "dream_cycles") for arm in ARMS}
    cols = ["cycle", "temperature", "learning_rate", "score_mean", "score_std", "reject_fraction",
            "no_signal_fraction", "heldout_score_mean", "heldout_pass_rate", "scorer"]
    for arm, frame in cycles.items():
        if frame is not None:
            shown = frame[[c for c in cols if c in frame.columns]]
            print(f"\ndream_cycles ({arm}):\n" + shown.to_string(index=False))
    records["base_nll"] = m.base_nll
    summary = {"preset": m.args.preset, "emotion": m.emotion, "steer_scorer": m.args.steer_scorer or
               f"steering:{m.emotion}",
               "heldout_memories": len([i for i in m.candidates["node_id"] if i not in reached]),
               "absorption": absorption, "readout": readout, "records": records,
               "dream_cycles": {a: (f.to_dict("records") if f is not None else [])
                                for a, f in cycles.items()},
               "sampling": {"temperature": m.temperature, "k": m.k, **m.sampling.__dict__}}
    storage.atomic_write_json(home / "behaviour.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="offline", choices=["offline", "real"])
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--home", default=None,
                   help="working folder (default: a new temporary one); reruns reuse it")
    p.add_argument("--emotion", default=None, help="default: the readout's best-separating emotion")
    p.add_argument("--steer-scorer", default=None,
                   help="scorer spec of the steering arm (default steering:<emotion>)")
    p.add_argument("--max-texts", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--heldout-scenarios", type=int, default=8)
    p.add_argument("--k", type=int, default=2, help="answers per held-out scenario")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--overlay", default=None, help="YAML run config laid over the preset in both arms")
    p.add_argument("--with-evaluation", action="store_true", help="run the whole retraining job each cycle")
    p.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0))))
    args = p.parse_args(argv)
    home = Path(args.home or tempfile.mkdtemp(prefix="real_cycles-")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    log(f"home {home}, preset {args.preset}, {args.cycles} cycles")
    setup(home, args.preset)
    m = Measurer(home, args)
    spec = args.steer_scorer or f"steering:{m.emotion}"
    log(f"steering arm scorer {spec!r}; {len(m.candidates)} candidate memory texts")
    records: dict[str, Any] = {"nll": [], "answers": [], "dreamed": {}}
    collisions: list = []
    select = ["--job", "retraining"] if args.with_evaluation else ["--select", CYCLE_ASSETS]
    for cycle in range(args.cycles):
        runs = {home / arm: [*select, "--preset", args.preset, "--config",
                             str(arm_config(home, arm, spec, args.heldout_scenarios, args.overlay))]
                for arm in ARMS}
        if any(rc != 0 for rc in carl(runs, f"cycle{cycle}.log").values()):
            log(f"cycle {cycle} failed in an arm (logs above); stopping")
            return 1
        if not collisions:  # the plain arm's cycle-0 held-out scenarios, for every checkpoint
            collisions = B.collisions_from_rows(table(home / "plain", "dream_heldout"), m.nodes)
            base = m.answers(m.base, m.tokenizer, collisions)
            records["answers"].extend({"arm": "base", "cycle": -1, **r} for r in base.to_dict("records"))
        for arm in ARMS:
            measure(m, home, arm, cycle, collisions, records)
        report(m, home, records)
    log(f"done: {home / 'behaviour.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
