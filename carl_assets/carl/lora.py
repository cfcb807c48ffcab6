"""LoRA (low-rank adapters, Hu et al. 2021) through `peft`, for SFT and GRPO on a real model.

`lora_config` turns the run settings into a `peft.LoraConfig` for TRL's ``peft_config`` (None when
``r == 0``: a full fine-tune). `default_target_modules` names the attention and MLP projections a
model has (every linear leaf inside its transformer blocks, so Llama's ``q_proj ... down_proj``,
GPT-2's ``c_attn``/``c_proj``/``c_fc`` Conv1D, NeoX's ``query_key_value``...), never the embeddings or
the LM head. `merge_adapters` folds the trained adapters into the base weights
(``merge_and_unload``), so the saved checkpoint is a plain Hugging Face folder that every downstream
asset loads without peft.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

LORA_TASK_TYPE = "CAUSAL_LM"


def _linear_leaf_types() -> tuple[type, ...]:
    return (torch.nn.Linear, Conv1D)


def default_target_modules(model: Any) -> list[str]:
    """Short names (the last dotted part) of the linear layers inside the model's transformer blocks, sorted.

    The output embedding (LM head) and anything outside the blocks are left out: adapting the LM head
    of a tied-embedding model would untie it. Raises ValueError when the model has no such layer.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = _linear_leaf_types()
    names = set()
    for name, module in model.named_modules():
        if module is head or not isinstance(module, linear):
            continue
        parts = name.split(".")
        # Inside a block: a numbered container ("layers.3", "h.3") somewhere on the path.
        if any(p.isdigit() for p in parts[:-1]):
            names.add(parts[-1])
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layers inside numbered transformer blocks: "
                         "give lora_target_modules explicitly")
    return sorted(names)


def lora_config(model: Any, r: int, alpha: float | None = None, dropout: float = 0.0,
                target_modules: Sequence[str] | None = None) -> Any:
    """A `peft.LoraConfig` for a causal LM, or None when ``r == 0`` (full fine-tune).

    ``alpha`` None means ``2 * r`` (a scale alpha/r of 2, common practice for small ranks);
    ``target_modules`` None means `default_target_modules(model)`. Raises ValueError for a negative
    rank, alpha <= 0, dropout outside [0, 1), or a target name the model does not have.
    """
    if r < 0:
        raise ValueError(f"lora_r must be 0 (full fine-tune) or a positive rank, not {r}")
    if r == 0:
        return None
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), not {dropout}")
    alpha = 2 * r if alpha is None or alpha == 0 else alpha
    if alpha <= 0:
        raise ValueError(f"lora_alpha must be positive, not {alpha}")
    targets = list(target_modules) if target_modules else default_target_modules(model)
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"lora_target_modules {missing} are not modules of {type(model).__name__} "
                         f"(its linear layers: {default_target_modules(model)})")
    from peft import LoraConfig  # 2.7 s to import (after torch/transformers): only LoRA runs pay it

    return LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=targets,
                      bias="none", task_type=LORA_TASK_TYPE)


def is_peft_model(model: Any) -> bool:
    """Whether `model` is wrapped by peft (a `PeftModel`)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def merge_adapters(model: Any) -> Any:
    """The base model with the LoRA adapters folded into its weights (W + B A * alpha/r) and the peft
    layers removed; `model` itself when it is not a peft model."""
    if not is_peft_model(model):
        return model
    return model.merge_and_unload()
