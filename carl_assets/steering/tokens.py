"""Texts to token batches for the readout: encoding under a token limit, right padding, the pad/BOS ids.

Texts longer than the model's position table (GPT-2's `n_positions`) or `max_length` are cut to their
first tokens and counted (`truncated_texts` in the manifest).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from carl_assets.models.loading import model_max_positions


def encode_texts(tokenizer: Any, texts: Sequence[str], max_tokens: int | None) -> tuple[list[list[int]], int]:
    """Token ids of each text (special tokens as the tokenizer adds them), cut to the first
    `max_tokens`; and how many texts were cut."""
    encoded = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
    if max_tokens is None:
        return [list(ids) for ids in encoded], 0
    truncated = sum(1 for ids in encoded if len(ids) > max_tokens)
    return [list(ids[:max_tokens]) for ids in encoded], truncated


def token_limit(model: torch.nn.Module, max_length: int | None) -> int | None:
    """The tokens a text may keep: `max_length` and the model's position table, whichever is smaller.

    Raises ValueError when `max_length` is below 1."""
    limits = [x for x in (max_length, model_max_positions(model)) if x is not None]
    if any(x < 1 for x in limits):
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    return min(limits) if limits else None


def padded_batch(encoded: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids` and `attention_mask`, both `[B, longest]` long (the reader handles either
    side)."""
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)] = torch.as_tensor(list(tokens), dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return ids, mask


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else 0: GPT-2-style tokenizers have none, and any id works under a zero
    mask."""
    return tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0


def bos_to_skip(tokenizer: Any, exclude_bos: bool) -> int | None:
    """The BOS id the mean reduction leaves out, or None (not excluded, or the tokenizer has none)."""
    return getattr(tokenizer, "bos_token_id", None) if exclude_bos else None
