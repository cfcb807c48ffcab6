"""A causal LM's output head, taken apart: the decoder stack that gives final-normed hidden states, the
output embedding, the logit soft-cap and scale (so only the positions that matter go through the head)."""

from __future__ import annotations

from typing import Any


def lm_head_parts(model: Any) -> tuple[Any, Any, float | None, float]:
    """(decoder stack giving final-normed hidden states, output embedding, soft-cap, logit scale) of a
    causal LM, or `(None, None, None, 1.0)` when the model has no separable LM head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = None
    if hasattr(model, "get_decoder"):
        try:
            decoder = model.get_decoder()
        except Exception:  # some exotic models raise here
            decoder = None
    if decoder is None or decoder is model or head is None:
        return None, None, None, 1.0
    config = getattr(model, "config", None)
    scale = 1.0
    if isinstance(getattr(config, "logit_scale", None), (int, float)):  # Cohere multiplies
        scale *= float(config.logit_scale)
    if isinstance(getattr(config, "logits_scaling", None), (int, float)):  # Granite divides
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return decoder, head, (float(softcap) if softcap else None), scale


def vocab_size_of(model: Any) -> int | None:
    """Rows of the output embedding (the vocabulary the head scores), or None when it has none."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.ndim == 2:
        return int(weight.shape[0])
    return None
