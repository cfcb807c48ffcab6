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
fall back to their plain full-sequence forwards (same numbers). `score_with_shared_forward` feeds one
such forward per batch to every scorer that can read it (`fill`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from carl_assets.dreams.generation import GeneratedResponse, pad_and_eos_ids
from carl_assets.steering.residual import find_decoder_blocks


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


def _last_hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.last_hidden_state


def _left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[P, longest]` ids and mask, left-padded: the last column is every prompt's last token."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for u, tokens in enumerate(prompts):
        ids[u, width - len(tokens) :] = torch.as_tensor(tokens, dtype=torch.long)
        mask[u, width - len(tokens) :] = 1
    return ids, mask


def _right_padded(completions: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`[R, longest]` ids (0 in padding) and mask, right-padded."""
    width = max(len(c) for c in completions)
    ids = torch.zeros((len(completions), width), dtype=torch.long)
    mask = torch.zeros((len(completions), width), dtype=torch.long)
    for r, tokens in enumerate(completions):
        ids[r, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
        mask[r, : len(tokens)] = 1
    return ids, mask


class _LayerReader:
    """Hooks that keep the residual stream at `layers` (float32, detached) while `on` is set."""

    def __init__(self, model: Any, layers: Sequence[int]):
        self.on, self.captured = False, {}
        self.handles: list[Any] = []
        blocks = find_decoder_blocks(model) if layers else None
        for layer in sorted(set(layers)):
            if layer == 0:  # what enters block 0
                self.handles.append(
                    blocks[0].register_forward_pre_hook(
                        lambda _m, args, kwargs: self._keep(0, args[0] if args else kwargs["hidden_states"]),
                        with_kwargs=True,
                    )
                )
            else:
                self.handles.append(
                    blocks[layer - 1].register_forward_hook(
                        lambda _m, _i, out, layer=layer: self._keep(
                            layer, out[0] if isinstance(out, (tuple, list)) else out
                        )
                    )
                )

    def _keep(self, layer: int, hidden: torch.Tensor) -> None:
        if self.on:
            self.captured[layer] = hidden.detach().float()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _prefill_then_complete(
    model: Any,
    decoder: Any,
    prompt: tuple[torch.Tensor, torch.Tensor],
    completion: tuple[torch.Tensor, torch.Tensor],
    group_index: torch.Tensor,
    reader: _LayerReader,
    want_predicting: bool,
) -> torch.Tensor | None:
    """Run the prompts once into a cache, repeat its rows per response, run the completions on it.
    Returns the predicting hidden states `[R, Tc, H]` (None unless wanted)."""
    (prompt_ids, prompt_mask), (comp_ids, comp_mask) = prompt, completion
    device = next(model.parameters()).device
    keyword = _cache_keyword(decoder.forward)
    cache = DynamicCache(config=model.config)
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    prompt_out = decoder(
        input_ids=prompt_ids.to(device),
        attention_mask=prompt_mask.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        **{keyword: cache},
    )
    last_prompt_hidden = _last_hidden(prompt_out)[:, -1]  # predicts completion token 0
    cache.batch_select_indices(group_index.to(device))  # one cache row per response
    mask = torch.cat([prompt_mask[group_index], comp_mask], dim=1)
    prompt_len = prompt_mask.sum(dim=1)
    comp_positions = prompt_len[group_index].unsqueeze(1) + torch.arange(comp_ids.shape[1]).unsqueeze(0)
    reader.on = True
    comp_out = decoder(
        input_ids=comp_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=comp_positions.to(device),
        use_cache=True,
        **{keyword: cache},
    )
    reader.on = False
    if not want_predicting:
        return None
    comp_hidden = _last_hidden(comp_out)
    return torch.cat([last_prompt_hidden[group_index.to(device)].unsqueeze(1), comp_hidden[:, :-1]], dim=1)


def run_response_forward(
    model: Any,
    responses: Sequence[GeneratedResponse],
    rows: Sequence[int],
    layers: Sequence[int] = (),
    want_predicting: bool = True,
    pad_id: int = 0,
) -> ResponseForward | None:
    """The shared-prompt forward of `responses[i]` for i in `rows` (each with a non-empty completion), or
    None when the model has no separable decoder or does not take a prefilled DynamicCache."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model or not rows:
        return None
    prompts: dict[tuple[int, ...], int] = {}
    group = [prompts.setdefault(tuple(responses[i].prompt_ids), len(prompts)) for i in rows]
    prompt = _left_padded(list(prompts), pad_id)
    completion = _right_padded([list(responses[i].completion_ids) for i in rows])
    reader = _LayerReader(model, layers)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            predicting = _prefill_then_complete(
                model,
                decoder,
                prompt,
                completion,
                torch.as_tensor(group, dtype=torch.long),
                reader,
                want_predicting,
            )
    except (TypeError, ValueError, AttributeError, NotImplementedError):
        return None
    finally:
        reader.remove()
        model.train(was_training)
    return ResponseForward(
        rows=list(rows),
        completion_mask=completion[1],
        completion_ids=completion[0],
        predicting_hidden=predicting,
        residual={k: v.cpu() for k, v in reader.captured.items()},
    )


def score_with_shared_forward(
    scorers: Sequence[Any],
    model: Any,
    tokenizer: Any,
    responses: Sequence[GeneratedResponse],
    batch_size: int,
) -> dict[str, np.ndarray] | None:
    """Every scorer's components from ONE shared-prompt forward per batch of responses, or None when the
    model cannot run it (callers then score separately). A scorer here has `empty(n)`, `fill(out,
    forward, model, eos)`, `finish(out)`, `layers_needed`, `needs_predicting` and optionally
    `prepare(model)`. Empty completions are not run: they keep the scorers' empty values."""
    n = len(responses)
    pad_id, eos = pad_and_eos_ids(model, tokenizer)
    outputs = [scorer.empty(n) for scorer in scorers]
    for scorer in scorers:
        if hasattr(scorer, "prepare"):
            scorer.prepare(model)
    layers = sorted({layer for scorer in scorers for layer in scorer.layers_needed})
    predicting = any(scorer.needs_predicting for scorer in scorers)
    non_empty = [i for i in range(n) if len(responses[i].completion_ids) > 0]
    for start in range(0, len(non_empty), batch_size):
        forward = run_response_forward(
            model,
            responses,
            non_empty[start : start + batch_size],
            layers=layers,
            want_predicting=predicting,
            pad_id=pad_id,
        )
        if forward is None:
            return None
        for scorer, out in zip(scorers, outputs, strict=True):
            scorer.fill(out, forward, model, eos)
    merged: dict[str, np.ndarray] = {}
    for scorer, out in zip(scorers, outputs, strict=True):
        merged.update(scorer.finish(out))
    return merged


def batches(n: int, size: int) -> list[range]:
    """`range(n)` cut into consecutive ranges of at most `size`."""
    return [range(s, min(s + size, n)) for s in range(0, n, size)]
