"""The `carl` parser and entry point: one argparse tree whose commands live in cli/coherence.py,
cli/models.py and cli/pipeline.py; every input error is one line on stderr with exit status 2."""

from __future__ import annotations

import argparse
import os
import sys

from carl_assets.cli import coherence, models, pipeline
from carl_assets.cli.arguments import Parser, UsageError

__all__ = ["UsageError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """`carl` with every command; each command's arguments carry `run`, the function that executes it."""
    parser = Parser(prog="carl",
                    description="Coherence-Aware Reinforcement Learning (CARL) and its asset graph.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    coherence.add_parsers(sub)
    models.add_parsers(sub)
    pipeline.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `carl` console script; returns the exit status (0 ok, 1 failed while running,
    2 bad input, 130 interrupted). `--help` prints and returns 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    try:
        args = parser.parse_args(argv)
        if getattr(args, "run", None) is None:  # `carl` alone with an option, e.g. a stray flag
            parser.print_help()
            return 2
        return int(args.run(args) or 0)
    except SystemExit as exc:  # argparse's --help (0); a failed setup's message was already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else _fail(str(exc.code), 1))
    except UsageError as exc:
        return _fail(f"carl: error: {exc}", 2)
    except KeyboardInterrupt:
        return _fail("carl: interrupted", 130)
    except Exception as exc:  # a failure while running: one line, unless debugging
        if os.environ.get("CARL_DEBUG"):
            raise
        return _fail(f"carl: error: {type(exc).__name__}: {exc}", 1)


def _fail(message: str, status: int) -> int:
    print(" ".join(message.split()), file=sys.stderr)
    return status
