"""Thread control for LeWorld's small tensor work."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with `n` intra-op threads, then restore (`None`/0: leave as is).

    LeWorld's tensors are small (a few MB at most) and its models tiny: one thread avoids the thread
    pool's fork-join, which on a busy shared CPU can make a 0.3 ms kernel take 10 ms or more."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
