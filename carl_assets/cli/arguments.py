"""What every `carl` command shares: the one-line usage error, argument types that refuse NaN and
non-positive counts, and the model placement flags."""

from __future__ import annotations

import argparse
import math


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with errors raised as `UsageError` ("<command>: <message>") instead of a usage block and
    `SystemExit`, so `main` reports every input error the same way."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("carl").strip()
        raise UsageError(f"{command}: {message}" if command else message)


def finite_float(text: str) -> float:
    """A float that is a number: "nan" or "inf" would pass every gate comparison silently."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, threads, batch sizes)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_placement_flags(parser: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype`, resolved by models.defaults.resolve_placement."""
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on a CUDA device that has it, else fp32; "
                        "fp32 for the offline model), bf16, fp16 or fp32")


def add_allow_pickle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load a model whose weights are pickles (.bin/.pt/.pkl): they can run code")
