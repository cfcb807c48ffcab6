"""`carl materialize` and `carl lineage`: the asset graph headless, through the Dagster instance in
`$DAGSTER_HOME` (default `./.dagster_home`), so a headless run shows up in `dagster dev` with its logs,
metadata and lineage. The work is done by carl_assets/defs/pipeline_cli.py; it is imported only when one
of these commands runs, because loading the definitions imports Dagster, torch and every asset (~10 s).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from carl_assets.cli.arguments import UsageError

ALL = "*"
PRESETS = ("offline", "real")  # carl_assets/defs/presets.py; checked against it when the command runs


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `materialize` and `lineage` on `carl`'s subparsers."""
    mat = sub.add_parser("materialize", help="materialize the asset graph headless (default: all of it)")
    mat.add_argument("--select", default=ALL, help="asset selection, Dagster syntax (e.g. "
                     "'steering_vectors+', '+base_model', 'a,b'); default: everything")
    mat.add_argument("--job", default=None, help="materialize what a job selects: 'retraining' (one dream "
                     "cycle), 'steering_refresh' or 'carl_all'")
    mat.add_argument("--home", default=None, help="CARL_HOME for this run (default: $CARL_HOME or ./.carl)")
    mat.add_argument("--config", default=None, help="YAML/JSON run config: {ops: {<asset>: {config: {...}}}}")
    mat.add_argument("--preset", default=None, help=f"run-config preset ({' or '.join(PRESETS)}; "
                     "carl_assets/defs/presets.py): 'offline' (the defaults) or 'real' "
                     "(SmolLM2-135M-Instruct, budgets for ~15 min on 2 cores); --config is laid over it")
    mat.set_defaults(run=cmd_materialize)

    lin = sub.add_parser("lineage",
                         help="print the asset graph with each asset's latest data version and staleness")
    lin.add_argument("asset", nargs="?", default=None, help="show only this asset's upstream and downstream")
    lin.add_argument("--nodes", metavar="ASSET", default=None,
                     help="the memory nodes behind a checkpoint (sft_checkpoint or grpo_checkpoint), with "
                     "counts, following the chain of dream cycles it started from")
    lin.add_argument("--version", default=None, help="with --nodes: that version (default: the current one)")
    lin.add_argument("--limit", type=int, default=20, help="with --nodes: rows to print")
    lin.add_argument("--home", default=None, help="CARL_HOME to read (default: $CARL_HOME or ./.carl)")
    lin.set_defaults(run=cmd_lineage)


def _use_home(home: str | None) -> None:
    if home:
        os.environ["CARL_HOME"] = str(Path(home).resolve())


def cmd_materialize(args: argparse.Namespace) -> int:
    _use_home(args.home)
    from carl_assets.defs import pipeline_cli
    from carl_assets.defs.presets import preset_names

    if args.preset is not None and args.preset not in preset_names():
        raise UsageError(f"materialize: argument --preset: invalid choice: {args.preset!r} "
                         f"(choose from {', '.join(preset_names())})")
    pipeline_cli.ensure_dagster_home()
    try:
        own = pipeline_cli.load_run_config(args.config)
        run_config = pipeline_cli.with_preset(args.preset, own)
        return pipeline_cli.materialize(args.select, run_config, job=args.job, user_config=own)
    except pipeline_cli.PipelineUsageError as exc:  # its message names the command already
        return _usage(exc)


def cmd_lineage(args: argparse.Namespace) -> int:
    _use_home(args.home)
    from carl_assets.defs import pipeline_cli

    pipeline_cli.ensure_dagster_home()
    try:
        if args.nodes:
            return pipeline_cli.lineage_nodes(args.nodes, args.version, args.limit)
        return pipeline_cli.lineage(args.asset)
    except pipeline_cli.PipelineUsageError as exc:
        return _usage(exc)


def _usage(exc: Exception) -> int:
    print(str(exc), file=sys.stderr)
    return 2
