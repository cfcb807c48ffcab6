"""`make run` (in-process `carl materialize`) against "Materialize all" through the UI path.

The UI path: `dagster dev` on loopback, the implicit asset job launched over GraphQL as the Materialize
button does, queued by the daemon, run in a run worker with the project's executor (processes forked
from a server that has torch imported). Both sides materialize the whole default graph, in fresh homes,
one after the other on the same machine; `--repeats` alternates them. Prints one JSON line:
ratio = make-run time / UI time (above 1: the UI path is faster; the target is 1/1.2 = 0.83: the UI path
within 1.2x of `make run`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.dagster_dev import DagsterDev, isolated_env, write_dagster_yaml  # noqa: E402
from tests.test_ui import launch_assets, served_graph, wait_for_run  # noqa: E402


def homes(root: Path) -> dict[str, str]:
    carl, dagster = root / "carl", root / "dagster"
    write_dagster_yaml(dagster)
    env_file = root / "bench.env"
    env_file.write_text(f"CARL_HOME={carl}\nDAGSTER_HOME={dagster}\nCARL_MEMORY_SOURCE=sample\n")
    return isolated_env(CARL_HOME=str(carl), DAGSTER_HOME=str(dagster), CARL_MEMORY_SOURCE="sample",
                        CARL_ENV_FILE=str(env_file))


def time_make_run(root: Path) -> float:
    env = homes(root)
    started = time.perf_counter()
    out = subprocess.run([str(REPO / ".venv" / "bin" / "carl"), "materialize"], env=env, cwd=REPO,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"carl materialize failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return seconds


def time_ui(root: Path) -> float:
    env = homes(root)
    with DagsterDev(env, cwd=root, log_path=root / "dagster-dev.log") as server:
        deps, _, checks = served_graph(server)
        assets = sorted(a for a in deps if a != "memory_source")  # the source is observed, not materialized
        started = time.perf_counter()
        run_id = launch_assets(server, assets, checks)
        status = wait_for_run(server, run_id, timeout=1800)
        seconds = time.perf_counter() - started
    if status != "SUCCESS":
        raise SystemExit(f"UI run {run_id} ended {status}; see {root / 'dagster-dev.log'}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    cli, ui = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="carl-bench-cli-") as a:
            cli.append(time_make_run(Path(a)))
        with tempfile.TemporaryDirectory(prefix="carl-bench-ui-") as b:
            ui.append(time_ui(Path(b)))
        print(f"make run {cli[-1]:.1f} s, UI materialize all {ui[-1]:.1f} s", file=sys.stderr)
    result = {
        "name": "ui_path",
        "ratio": round(statistics.median(cli) / statistics.median(ui), 3),
        "target": round(1 / 1.2, 3),
        "make_run_seconds": [round(s, 1) for s in cli],
        "ui_materialize_all_seconds": [round(s, 1) for s in ui],
        "peak_mb": None,  # separate processes on both sides; see the per-step times in the run logs
        "protocol": f"fresh homes, whole default graph, {args.repeats} alternating repeat(s), median",
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
