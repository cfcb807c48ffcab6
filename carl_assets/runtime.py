"""Torch thread control shared by the training, model-building and LeWorld code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with `threads` intra-op threads, then restore the setting (`None`/0: leave it alone).

    The models here are tiny: on a small, busy CPU, torch's thread pool fork-join costs more than it
    saves (one thread trained the offline model and SFT several times faster on a shared 2-core box).
    """
    if not threads:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
