"""What a loaded model can take: the length of its position table (and a prompt cut to fit it), its size."""

from __future__ import annotations

from typing import Any

import torch


def model_max_positions(model: Any) -> int | None:
    """The longest input the model's position table allows (GPT-2 `n_positions`, Llama
    `max_position_embeddings`, ...), or None if the config does not say."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_prompt(prompt_ids: list[int], model: Any, new_tokens: int) -> list[int]:
    """The prompt cut from the left so that it and `new_tokens` generated tokens fit the model's
    position table (absolute positions, as GPT-2's, raise an IndexError past it); unchanged if they fit."""
    limit = model_max_positions(model)
    if limit is None or len(prompt_ids) + new_tokens <= limit:
        return list(prompt_ids)
    keep = max(1, limit - new_tokens)
    return list(prompt_ids[-keep:])


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
