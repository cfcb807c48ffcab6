"""`make run` (in-process `carl materialize`) against "Materialize all" through the UI path.

The UI path: `dagster dev` on loopback, the implicit asset job launched over GraphQL as the Materialize
button does, queued by the daemon, run in a run worker with the project's executor (processes forked
from a server that has torch imported). Both sides materialize the whole default graph (or the assets of
`--select`), in fresh homes, one after the other on the same machine; `--repeats` alternates them. Each
side runs in a child process of this script, which reports its time, its peak memory and the data
versions its run recorded.

Agreement, checked before any ratio is printed (else exit 1 and no JSON line): both sides materialized the
same assets, with the same data versions (the content and config hashes the assets report, which never
name the run) for every asset, read from each side's Dagster instance (`DagsterInstance.get`,
`get_latest_materialization_event`); tolerance 0 assets differing, per repeat.

Peak memory: per side, the largest total proportional resident memory (PSS: shared pages split among
the processes sharing them) of the side's process tree (every descendant of the side's child process:
`carl materialize`, or `dagster dev` with its webserver, daemon, code server and run workers), sampled
every 0.25 s from /proc, less the child's own before it started the side, in MB.

Prints one JSON line: ratio = make-run time / UI time (above 1: the UI path is faster; the target is
1/1.2 = 0.83: the UI path within 1.2x of `make run`), memory_ratio = make-run peak / UI peak, agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import agree, memory_ratio, run_bench  # noqa: E402

from tests.dagster_dev import DagsterDev, isolated_env, write_dagster_yaml  # noqa: E402
from tests.test_ui import launch_assets, served_graph, wait_for_run  # noqa: E402

SIDES = ("make_run", "ui")


def homes(root: Path) -> dict[str, str]:
    carl, dagster = root / "carl", root / "dagster"
    write_dagster_yaml(dagster)
    env_file = root / "bench.env"
    env_file.write_text(f"CARL_HOME={carl}\nDAGSTER_HOME={dagster}\nCARL_MEMORY_SOURCE=sample\n")
    return isolated_env(
        CARL_HOME=str(carl),
        DAGSTER_HOME=str(dagster),
        CARL_MEMORY_SOURCE="sample",
        CARL_ENV_FILE=str(env_file),
    )


def time_make_run(root: Path, select: list[str]) -> float:
    env = homes(root)
    command = [
        str(REPO / ".venv" / "bin" / "carl"),
        "materialize",
        *(["--select", ",".join(select)] if select else []),
    ]
    started = time.perf_counter()
    out = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"carl materialize failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return seconds


def time_ui(root: Path, select: list[str]) -> float:
    env = homes(root)
    with DagsterDev(env, cwd=root, log_path=root / "dagster-dev.log") as server:
        deps, _, checks = served_graph(server)
        # the source is observed, not materialized
        assets = sorted(select or (a for a in deps if a != "memory_source"))
        started = time.perf_counter()
        run_id = launch_assets(server, assets, checks)
        status = wait_for_run(server, run_id, timeout=1800)
        seconds = time.perf_counter() - started
    if status != "SUCCESS":
        raise SystemExit(f"UI run {run_id} ended {status}; see {root / 'dagster-dev.log'}")
    return seconds


def data_versions(dagster_home: Path) -> dict[str, str | None]:
    """Each materialized asset's latest data version in the instance at `dagster_home`."""
    os.environ["DAGSTER_HOME"] = str(dagster_home)  # DagsterInstance.get reads it (this is a child process)
    import dagster as dg

    instance = dg.DagsterInstance.get()
    out = {}
    for key in instance.get_asset_keys():
        event = instance.get_latest_materialization_event(key)
        if event is not None and event.asset_materialization is not None:
            out[key.to_user_string()] = dict(event.asset_materialization.tags or {}).get(
                "dagster/data_version"
            )
    return out


def _pss_bytes(pid: int) -> int:
    """Proportional set size of one process (shared pages split among their sharers), 0 if it ended."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_pss_mb(root_pid: int) -> float:
    """Total proportional resident memory (MB) of `root_pid` and all its descendants, from /proc: PSS, so
    pages that forked workers share with their server (torch, the model) count once, not once per process."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
    tree, frontier = {root_pid}, {root_pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier and p not in tree}
        tree |= frontier
    return sum(_pss_bytes(p) for p in tree) / 2**20


def run_side(side: str, root: Path, select: list[str]) -> None:
    """The child process of one side: time it while sampling its process tree's memory, then print its
    seconds, peak MB (above this process's own RSS) and data versions."""
    base = tree_pss_mb(os.getpid())
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            peak[0] = max(peak[0], tree_pss_mb(os.getpid()) - base)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        seconds = (time_make_run if side == "make_run" else time_ui)(root, select)
    finally:
        done.set()
        sampler.join()
    print(
        json.dumps({"seconds": seconds, "peak_mb": peak[0], "data_versions": data_versions(root / "dagster")})
    )


def side(name: str, select: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"carl-bench-{name}-") as root:
        command = [sys.executable, __file__, "--side", name, "--root", root]
        if select:
            command += ["--select", ",".join(select)]
        out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{name} side failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_agreement(runs: list[dict[str, dict]]) -> dict:
    """Both sides materialized the same assets, and every asset got the same data version (a data version
    is a content + config hash, never the run's name: tests/test_run_independent_versions.py), in every
    repeat; raises Disagreement otherwise."""
    worst, differing, missing = 0, [], 0
    for cli, ui in ((r["make_run"]["data_versions"], r["ui"]["data_versions"]) for r in runs):
        missing = max(missing, len(set(cli) ^ set(ui)))
        diff = sorted(k for k in set(cli) & set(ui) if cli.get(k) != ui.get(k) or cli.get(k) is None)
        worst, differing = max(worst, len(diff)), differing or diff
    assets = len(runs[0]["make_run"]["data_versions"])
    compared = assets
    return {
        "assets": agree(
            "assets materialized, make run vs the UI path",
            missing,
            0,
            metric="assets_on_one_side_only",
            assets=assets,
        ),
        "data_versions": agree(
            "data versions, make run vs the UI path",
            worst,
            0,
            metric="assets_differing",
            compared=compared,
            differing=differing,
        ),
    }


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--select", default="", help="comma-separated assets (default: the whole graph)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    select = [a.strip() for a in args.select.split(",") if a.strip()]
    if args.side:
        run_side(args.side, Path(args.root), select)
        sys.exit(0)
    runs = []
    for _ in range(args.repeats):
        runs.append({name: side(name, select) for name in SIDES})
    agreement = check_agreement(runs)  # before any time is printed
    cli = [r["make_run"]["seconds"] for r in runs]
    ui = [r["ui"]["seconds"] for r in runs]
    peaks = {name: max(r[name]["peak_mb"] for r in runs) for name in SIDES}
    for c, u in zip(cli, ui, strict=True):
        print(
            f"make run {c:.1f} s, UI materialize {'all' if not select else ','.join(select)} {u:.1f} s",
            file=sys.stderr,
        )
    return {
        "name": "ui_path",
        "ratio": round(statistics.median(cli) / statistics.median(ui), 3),
        "target": round(1 / 1.2, 3),
        "agreement": agreement,
        "make_run_seconds": [round(s, 1) for s in cli],
        "ui_materialize_all_seconds": [round(s, 1) for s in ui],
        "peak_mb": round(peaks["ui"], 1),
        "peak_mb_make_run": round(peaks["make_run"], 1),
        "memory_ratio": memory_ratio(peaks["make_run"], peaks["ui"]),
        "peak_memory_method": "largest total PSS of the side's process tree, sampled every 0.25 s",
        "selection": select or "whole default graph",
        "protocol": f"fresh homes, {args.repeats} alternating repeat(s), median",
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


if __name__ == "__main__":
    run_bench(main)
