"""One no-grad forward over responses that share prompts: each prompt runs once, its KV cache is reused.

A dream scenario has k responses to one long prompt (the memories) and each response is short, so
re-running prompt + response for every response spends most of the compute on the same prompt k
times. `ResponseForward` runs each distinct prompt once (left-padded, with a KV cache), repeats the
cache rows for its responses, then runs only the response tokens (right-padded), reading:

- `predicting_hidden`: the final-normed hidden states at the positions that PREDICT each completion
  token (the last prompt position for token 0, completion position t-1 for token t) — what CARL needs;
- `residual[layer]`: the residual stream at the completion positions at a readout layer (index i =
  output of decoder block i-1, 0 = the input of block 0) — what the steering scorer needs.

`run_response_forward` returns None when the model cannot take a prefilled cache; the scorers then
fall back to their plain full-sequence forwards (same numbers).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from carl_assets.dreams.generation import GeneratedResponse
from carl_assets.steering.vectors import find_decoder_blocks


@dataclass
class ResponseForward:
    """Activations of one batch of non-empty responses (rows follow `rows`, indices into the input)."""

    rows: list[int]
    completion_mask: torch.Tensor  # [R, Tc] 1 where the completion has a token
    completion_ids: torch.Tensor  # [R, Tc] (0 in padding)
    predicting_hidden: torch.Tensor | None  # [R, Tc, H] final-normed, or None when not asked for
    residual: dict[int, torch.Tensor]  # layer -> [R, Tc, H] float32


def _cache_keyword(function: Any) -> str:
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


def run_response_forward(model: Any, responses: Sequence[GeneratedResponse], rows: Sequence[int],
                         layers: Sequence[int] = (), want_predicting: bool = True,
                         pad_id: int = 0) -> ResponseForward | None:
    """The shared-prompt forward of `responses[i]` for i in `rows` (each with a non-empty completion), or
    None when the model has no separable decoder or does not take a prefilled DynamicCache."""
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover - very old transformers
        return None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model or not rows:
        return None
    device = next(model.parameters()).device
    prompts: dict[tuple[int, ...], int] = {}
    group = [prompts.setdefault(tuple(responses[i].prompt_ids), len(prompts)) for i in rows]
    unique = list(prompts)
    width = max(len(p) for p in unique)
    prompt_ids = torch.full((len(unique), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(unique), width), dtype=torch.long)
    for u, ids in enumerate(unique):  # left padding: the last column is every prompt's last token
        prompt_ids[u, width - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
        prompt_mask[u, width - len(ids):] = 1
    completions = [list(responses[i].completion_ids) for i in rows]
    comp_width = max(len(c) for c in completions)
    comp_ids = torch.zeros((len(rows), comp_width), dtype=torch.long)
    comp_mask = torch.zeros((len(rows), comp_width), dtype=torch.long)
    for r, ids in enumerate(completions):
        comp_ids[r, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        comp_mask[r, : len(ids)] = 1
    group_index = torch.as_tensor(group, dtype=torch.long)
    prompt_len = prompt_mask.sum(dim=1)

    blocks = find_decoder_blocks(model) if layers else None
    captured: dict[int, torch.Tensor] = {}
    reading = {"on": False}

    def keep(layer: int, hidden: torch.Tensor) -> None:
        if reading["on"]:
            captured[layer] = hidden.detach().float()

    handles = []
    for layer in sorted(set(layers)):
        if layer == 0:
            handles.append(blocks[0].register_forward_pre_hook(
                lambda _m, args, kwargs: keep(0, args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
        else:
            handles.append(blocks[layer - 1].register_forward_hook(
                lambda _m, _i, out, layer=layer: keep(layer, out[0] if isinstance(out, (tuple, list)) else out)))
    keyword = _cache_keyword(decoder.forward)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
            prompt_out = decoder(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device),
                                 position_ids=positions.to(device), use_cache=True, **{keyword: cache})
            last_prompt_hidden = _last_hidden(prompt_out)[:, -1]  # predicts completion token 0
            cache.batch_select_indices(group_index.to(device))  # one cache row per response
            mask = torch.cat([prompt_mask[group_index], comp_mask], dim=1)
            comp_positions = prompt_len[group_index].unsqueeze(1) + torch.arange(comp_width).unsqueeze(0)
            reading["on"] = True
            comp_out = decoder(input_ids=comp_ids.to(device), attention_mask=mask.to(device),
                               position_ids=comp_positions.to(device), use_cache=True, **{keyword: cache})
            reading["on"] = False
            predicting = None
            if want_predicting:
                comp_hidden = _last_hidden(comp_out)
                predicting = torch.cat([last_prompt_hidden[group_index.to(device)].unsqueeze(1),
                                        comp_hidden[:, :-1]], dim=1)
    except (TypeError, ValueError, AttributeError, NotImplementedError):
        return None
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return ResponseForward(rows=list(rows), completion_mask=comp_mask, completion_ids=comp_ids,
                           predicting_hidden=predicting, residual={k: v.cpu() for k, v in captured.items()})


def _last_hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.last_hidden_state
