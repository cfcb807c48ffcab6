"""Amygdala readout vectors: per-layer CAA diff-of-means directions from (emotion, polarity, text) pairs.

For each emotion, mean(positive) - mean(negative) of the residual-stream activations at the configured
layers, normalised to unit length, saved as the safetensors + manifest pair a vLLM readout loads:
keys `layer_<idx>.vectors`, each `[n_concepts, hidden]` float32.

Conventions (written into the manifest):
- Layer index `i` is the residual stream after decoder block `i-1`; index 0 is the input of block 0
  (the embeddings, with position embeddings where the model adds them).
  All are before the final norm, which is what a vLLM readout sees (`hidden_states + residual`).
  Captured with forward hooks on the blocks, not from `output_hidden_states` (whose last entry is
  after the final norm).
- Token reduction `last`: the last real token of each text, found from the attention mask (so left and
  right padding both work); `mean`: the mask-weighted mean over real tokens, leaving out a leading BOS
  token (on real models its activations are huge and the same in every text, so averaging it in adds a
  direction that depends only on the text's length).
- Texts longer than the model's position table (GPT-2's `n_positions`) or `max_length` are cut to
  their first tokens and counted (`truncated_texts`).

Why it is fast: the same node text appears in many emotions' pairs (as a positive for one emotion and
a negative for most others), so each unique text is run once; texts are sorted by length so batches
carry little padding; the forward pass stops after the deepest requested layer; and activations are
folded into per-(emotion, polarity, split) running sums as batches stream, so activation memory does
not grow with the number of texts: what is kept is the sums, one batch of activations, and a capped
held-out sample for the separation score (plus the pairs themselves and their token ids).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from carl_assets.models.loading import model_max_positions  # noqa: F401  (re-exported: tests use it here)
from carl_assets.storage import atomic_write_bytes, atomic_write_json

VECTORS_FILE = "vectors.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "carl-amygdala-readout/1"
INDEX_CONVENTION = (
    "layer i = residual stream after decoder block i-1 (0 = embeddings, the input of block 0), before the final norm "
    "(what a vLLM readout sees as hidden_states + residual)"
)
REDUCTIONS = {
    "last": "last real token of each text (from the attention mask)",
    "mean": "attention-mask-weighted mean over the real tokens of each text",
}
BOS_EXCLUDED = ", leaving out a leading BOS token"
# The env vars a vLLM readout reads (the seed's ReadoutManager); paths relative to the manifest's folder.
VLLM_ENV = {"VLLM_READOUT_VECTORS": "vectors.safetensors", "VLLM_READOUT_MANIFEST": "manifest.json"}
LAYOUTS = ("per_layer", "ELH")
POLARITIES = ("positive", "negative")
DEPTH_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
UNIT_NORM_TOLERANCE = 1e-4


class ZeroNormError(ValueError):
    """mean(positive) == mean(negative) for a concept and layer: there is no direction to normalise."""


@dataclass
class SteeringVectors:
    """Unit readout directions: `vectors[layer]` is `[len(concepts), hidden]` float32, row k = concepts[k]."""

    concepts: list[str]
    layers: list[int]
    vectors: dict[int, torch.Tensor]
    pair_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    model: str = ""
    reduction: str = "last"
    index_convention: str = INDEX_CONVENTION
    stats: pd.DataFrame | None = None  # per (emotion, layer): counts, raw norm, held-out AUC
    dropped: dict[str, str] = field(default_factory=dict)  # concept -> why it has no vector
    truncated_texts: int = 0  # unique texts cut to `max_tokens`
    max_tokens: int | None = None  # the token limit applied: min(max_length, the model's positions)
    bos_excluded: bool = False  # a leading BOS token was left out of the mean reduction
    # Why the readout has no concepts at all (e.g. an untagged memory graph gave no pairs); "" otherwise.
    skipped_reason: str = ""
    # Reduced activations per unique text, `[len(layers), hidden]`, only when asked for (the layer
    # sweep hands them to the main run so those texts are not run twice); never saved.
    activations: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.vectors.values())).shape[1]) if self.vectors else 0

    def as_tensor(self) -> torch.Tensor:
        """The seed's `[E, L, H]` view: concept k, the k-th of `layers` (in order), hidden."""
        if not self.layers:
            return torch.zeros(len(self.concepts), 0, 0)
        return torch.stack([self.vectors[layer] for layer in self.layers], dim=1)

    def manifest(self) -> dict[str, Any]:
        detail = REDUCTIONS.get(self.reduction, self.reduction)
        if self.bos_excluded and self.reduction == "mean":
            detail += BOS_EXCLUDED
        return {
            "format": FORMAT,
            "concepts": list(self.concepts),
            "layers": [int(x) for x in self.layers],
            "hidden_size": self.hidden_size,
            "n_concepts": len(self.concepts),
            "dtype": "float32",
            "tensor_keys": {str(layer): tensor_key(layer) for layer in self.layers},
            "model": self.model,
            "method": "CAA: mean(positive) - mean(negative), normalised to unit length per concept and layer",
            "index_convention": self.index_convention,
            "token_reduction": self.reduction,
            "token_reduction_detail": detail,
            "bos_excluded": bool(self.bos_excluded),
            "max_tokens": self.max_tokens,
            "truncated_texts": int(self.truncated_texts),
            "elh_view": "stack layer_<idx>.vectors in `layers` order on dim 1: [n_concepts, n_layers, hidden]",
            "vllm_env": dict(VLLM_ENV),
            "vllm_env_note": "paths relative to the folder holding this manifest",
            "pair_counts": {c: dict(self.pair_counts.get(c, {})) for c in self.concepts},
            "dropped": dict(self.dropped),
            **({"skipped_reason": self.skipped_reason} if self.skipped_reason else {}),
        }


def tensor_key(layer: int) -> str:
    return f"layer_{int(layer)}.vectors"


def default_layers(num_blocks: int, fractions: Sequence[float] = DEPTH_FRACTIONS) -> list[int]:
    """Four layers spread by depth: round(L * f) for f in 0.25, 0.5, 0.75, 1.0 (half rounds up),
    at least 1, deduplicated. For L=4: [1, 2, 3, 4]; L=32: [8, 16, 24, 32]; L=64: [16, 32, 48, 64]."""
    if num_blocks < 1:
        raise ValueError("the model has no decoder blocks")
    return sorted({min(num_blocks, max(1, int(math.floor(num_blocks * f + 0.5)))) for f in fractions})


# --------------------------------------------------------------------------------------------
# Reading the residual stream
# --------------------------------------------------------------------------------------------


def find_decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder blocks (Llama/Qwen/Mistral `model.layers`, GPT-2 `transformer.h`, ...)."""
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
                 "model.decoder.layers", "transformer.blocks", "layers"):
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, torch.nn.ModuleList) and len(module):
            return module
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    lists = [m for m in lists if expected is None or len(m) == expected] or lists
    if not lists:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")
    return max(lists, key=len)


class _StopForward(Exception):
    """Raised from the deepest hook: the blocks after it (and the LM head) are not needed."""


def _tensor_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class ResidualReader:
    """Run texts through the model and return the reduced residual stream at `layers`: `[B, n_layers, H]`.

    Hooks sit on the input of block 0 (layer 0) and on the output of block i-1 (layer i); the hook of
    the deepest layer stops the forward pass.
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[int], reduction: str = "last",
                 skip_leading_token_id: int | None = None):
        """`skip_leading_token_id`: with the `mean` reduction, a text whose first real token is this id
        (the BOS) is averaged without it."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, not {reduction!r}")
        self.model = model
        self.blocks = find_decoder_blocks(model)
        self.layers = [int(x) for x in layers]
        bad = [x for x in self.layers if not 0 <= x <= len(self.blocks)]
        if bad or not self.layers:
            raise ValueError(f"layers must be in 0..{len(self.blocks)} (0 = embeddings), got {list(layers)}")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"duplicate layers in {list(layers)}")
        self.reduction = reduction
        self.skip_leading_token_id = skip_leading_token_id
        self.deepest = max(self.layers)
        self._mask: torch.Tensor | None = None
        self._mean_mask: torch.Tensor | None = None
        self._out: dict[int, torch.Tensor] = {}
        import inspect

        self._takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    def _hook(self, layer: int) -> Callable[..., None]:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            self._capture(layer, _tensor_of(output))

        return hook

    def _input_hook(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Layer 0 is what enters block 0: the embeddings plus whatever the model adds before the first
        # block (GPT-2's position embeddings, Gemma's scaling), not the bare token-embedding output.
        self._capture(0, args[0] if args else kwargs["hidden_states"])

    def _capture(self, layer: int, hidden: torch.Tensor) -> None:
        self._out[layer] = self._reduce(hidden)
        if layer == self.deepest:
            raise _StopForward

    def _register(self, layer: int) -> Any:
        if layer == 0:
            return self.blocks[0].register_forward_pre_hook(self._input_hook, with_kwargs=True)
        return self.blocks[layer - 1].register_forward_hook(self._hook(layer))

    def _reduce(self, hidden: torch.Tensor) -> torch.Tensor:
        mask = self._mask
        assert mask is not None
        hidden = hidden.float()
        if self.reduction == "last":
            positions = torch.arange(mask.shape[1], device=mask.device)
            last = torch.where(mask.bool(), positions, -1).max(dim=1).values  # left or right padding
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        # where(), not a product: padded positions may hold NaN/inf in some attention kernels.
        keep = self._mean_mask if self._mean_mask is not None else mask.bool()
        total = torch.where(keep[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
        return total.sum(dim=1) / keep.sum(dim=1, keepdim=True).to(hidden.dtype)

    def _mean_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The positions the mean reduction averages: the real tokens less a leading BOS."""
        if self.reduction != "mean" or self.skip_leading_token_id is None:
            return None
        keep = attention_mask.bool().clone()
        rows = torch.arange(keep.shape[0], device=keep.device)
        first = keep.long().argmax(dim=1)  # first real position, for left or right padding
        is_bos = input_ids[rows, first] == self.skip_leading_token_id
        keep[rows[is_bos], first[is_bos]] = False
        if bool((keep.sum(dim=1) == 0).any()):
            raise ValueError("a text encodes to the BOS token alone: nothing is left to average")
        return keep

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if bool((attention_mask.sum(dim=1) == 0).any()):
            raise ValueError("a text encodes to zero tokens: empty texts have no activation to read")
        device = next(self.model.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        self._mask, self._out = attention_mask, {}
        self._mean_mask = self._mean_positions(input_ids, attention_mask)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self._takes_positions:
            # Positions count real tokens only, so a left-padded text reads as it would alone.
            kwargs["position_ids"] = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        handles = [self._register(layer) for layer in self.layers]
        try:
            with torch.inference_mode():
                self.model(**kwargs)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
            self._mask = self._mean_mask = None
        return torch.stack([self._out[layer] for layer in self.layers], dim=1)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _as_frame(pairs: pd.DataFrame | Iterable[Mapping[str, Any]], with_kind: bool = False) -> pd.DataFrame:
    frame = pairs if isinstance(pairs, pd.DataFrame) else pd.DataFrame(list(pairs))
    required = {"emotion", "polarity", "text"} | ({"kind"} if with_kind else set())
    missing = required - set(frame.columns)
    if missing:
        raise ValueError(f"pairs need columns {sorted(required)} (missing {sorted(missing)})")
    columns = ["emotion", "polarity", "text"] + (["kind"] if with_kind else [])
    frame = frame[columns].astype(str).reset_index(drop=True)
    bad = sorted(set(frame["polarity"]) - set(POLARITIES))
    if bad:
        raise ValueError(f"polarity must be 'positive' or 'negative', got {bad}")
    if (frame["text"].str.len() == 0).any():
        raise ValueError("pairs contain empty texts")
    return frame


def _stable_rank(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(parts).encode()).digest()[:8], "big")


def heldout_mask(frame: pd.DataFrame, fraction: float, max_per_group: int, seed: int) -> np.ndarray:
    """A deterministic held-out split per (emotion, polarity): the rows with the smallest hash of
    (seed, emotion, polarity, text, row-in-group), `floor(n * fraction)` of them (at most
    `max_per_group`), always leaving at least one training row."""
    held = np.zeros(len(frame), dtype=bool)
    if fraction <= 0:
        return held
    for (emotion, polarity), rows in frame.groupby(["emotion", "polarity"], sort=False).groups.items():
        rows = list(rows)
        n_held = min(int(len(rows) * fraction), max_per_group, len(rows) - 1)
        if n_held <= 0:
            continue
        ranked = sorted(rows, key=lambda r: _stable_rank(str(seed), emotion, polarity, frame.at[r, "text"], str(r)))
        held[ranked[:n_held]] = True
    return held


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores (Mann-Whitney U, ties count half); NaN if a side is empty."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    scores = np.concatenate([positive, negative])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(average, counts)
    u = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2.0
    return float(u / (len(positive) * len(negative)))


def _model_name(model: torch.nn.Module) -> str:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return str(name) or type(model).__name__


def encode_texts(tokenizer: Any, texts: Sequence[str], max_tokens: int | None) -> tuple[list[list[int]], int]:
    """Token ids of each text (special tokens as the tokenizer adds them), cut to the first
    `max_tokens`; and how many texts were cut."""
    encoded = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
    if max_tokens is None:
        return [list(ids) for ids in encoded], 0
    truncated = sum(1 for ids in encoded if len(ids) > max_tokens)
    return [list(ids[:max_tokens]) for ids in encoded], truncated


def token_limit(model: torch.nn.Module, max_length: int | None) -> int | None:
    """The tokens a text may keep: `max_length` and the model's position table, whichever is smaller."""
    limits = [x for x in (max_length, model_max_positions(model)) if x is not None]
    if any(x < 1 for x in limits):
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    return min(limits) if limits else None


def padded_batch(encoded: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids` and `attention_mask` (the reader handles either side)."""
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)] = torch.as_tensor(list(tokens), dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return ids, mask


def _pad_id(tokenizer: Any) -> int:
    # GPT-2-style tokenizers have no pad token; any id works under a zero attention mask.
    return tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0


def _bos_id(tokenizer: Any, exclude_bos: bool) -> int | None:
    return getattr(tokenizer, "bos_token_id", None) if exclude_bos else None


def train_steering_vectors(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: pd.DataFrame | Iterable[Mapping[str, Any]],
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    reduction: str = "last",
    heldout_fraction: float = 0.2,
    max_heldout_per_polarity: int = 64,
    seed: int = 0,
    max_length: int | None = 512,
    on_zero_norm: str = "raise",
    model_name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    exclude_bos: bool = True,
    transfer: tuple[str, str] | None = None,
    max_transfer_texts: int = 512,
    precomputed: Mapping[str, torch.Tensor] | None = None,
    keep_activations: bool = False,
) -> SteeringVectors:
    """Per-emotion, per-layer unit diff-of-means directions (CAA) from (emotion, polarity, text) pairs.

    `pairs`: a DataFrame or records with `emotion`, `polarity` ("positive"/"negative") and `text`.
    `layers`: residual-stream indices (see the module docstring); default `default_layers(L)`.
    The vector uses every pair; the held-out AUC scores a direction computed without the held-out
    rows (a deterministic `heldout_fraction` per emotion and polarity, capped) on those rows.
    `on_zero_norm`: "raise" (ZeroNormError naming concept and layer) or "drop" (the concept is left
    out and listed in `dropped`).
    `max_length`: tokens kept per text, further capped by the model's position table.
    `exclude_bos`: leave a leading BOS token out of the `mean` reduction.
    `transfer=(train_kind, test_kind)`: pairs need a `kind` column; the stats gain `transfer_auc`, the
    AUC on `test_kind` rows (at most `max_transfer_texts` texts) of a direction computed from
    `train_kind` rows only (a generalisation check to a kind of node never trained on).
    `precomputed`: reduced activations `[len(layers), hidden]` per text, read with the same settings
    (the layer sweep's); those texts are not run again. `keep_activations`: return every text's
    activations in `.activations`.
    """
    if on_zero_norm not in ("raise", "drop"):
        raise ValueError("on_zero_norm must be 'raise' or 'drop'")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    frame = _as_frame(pairs, with_kind=transfer is not None)
    if frame.empty:
        raise ValueError("no training pairs")
    blocks = find_decoder_blocks(model)
    layers = default_layers(len(blocks)) if layers is None or len(layers) == 0 else sorted(int(x) for x in layers)
    bos_id = _bos_id(tokenizer, exclude_bos)
    reader = ResidualReader(model, layers, reduction, skip_leading_token_id=bos_id)
    max_tokens = token_limit(model, max_length)

    concepts = sorted(frame["emotion"].unique())
    counts = frame.groupby(["emotion", "polarity"]).size()
    for concept in concepts:
        for polarity in POLARITIES:
            if counts.get((concept, polarity), 0) == 0:
                raise ValueError(f"emotion {concept!r} has no {polarity} pairs: a difference of means needs both")
    held = heldout_mask(frame, heldout_fraction, max_heldout_per_polarity, seed)

    # Each unique text runs once; its activation is added to the sums of every group it belongs to.
    # Groups 0..4C-1: (concept, polarity, split) with split 0 = train, 1 = held out; with `transfer`,
    # groups 4C..6C-1: (concept, polarity) over the rows of the training kind.
    unique_texts, text_index = np.unique(frame["text"].to_numpy(dtype=object), return_inverse=True)
    n_concepts = len(concepts)
    concept_of_row = frame["emotion"].map({c: k for k, c in enumerate(concepts)}).to_numpy()
    negative_row = (frame["polarity"] == "negative").to_numpy().astype(int)
    member_text = [text_index]
    member_group = [concept_of_row * 4 + negative_row * 2 + held.astype(int)]
    test_rows = np.zeros(len(frame), dtype=bool)
    if transfer is not None:
        train_kind, test_kind = (str(k) for k in transfer)
        if train_kind == test_kind:
            raise ValueError(f"transfer needs two different kinds, got {train_kind!r} twice")
        train_rows = (frame["kind"] == train_kind).to_numpy()
        member_text.append(text_index[train_rows])
        member_group.append(4 * n_concepts + concept_of_row[train_rows] * 2 + negative_row[train_rows])
        test_rows = _capped_rows(frame, (frame["kind"] == test_kind).to_numpy(), text_index,
                                 max_transfer_texts, seed)
    n_groups = n_concepts * (6 if transfer is not None else 4)
    member_text, member_group = np.concatenate(member_text), np.concatenate(member_group)
    # Sparse membership (one entry per (text, group) link, sorted by text), not a dense matrix.
    by_text = np.argsort(member_text, kind="stable")
    row_start = np.searchsorted(member_text[by_text], np.arange(len(unique_texts) + 1))
    group_of_member = torch.as_tensor(member_group[by_text])
    # Texts whose activations are kept: held-out rows (AUC), transfer test rows, or all when asked.
    kept_texts = range(len(unique_texts)) if keep_activations else sorted(set(text_index[held | test_rows].tolist()))
    slot_of = {t: k for k, t in enumerate(kept_texts)}

    encoded, truncated = encode_texts(tokenizer, list(unique_texts), max_tokens)
    hidden = int(getattr(model.config, "hidden_size", 0) or model.get_input_embeddings().weight.shape[1])
    n_layers = len(layers)
    sums = torch.zeros(n_groups, n_layers, hidden, dtype=torch.float64)
    kept_acts = torch.zeros(len(slot_of), n_layers, hidden, dtype=torch.float32)

    def fold(batch: Sequence[int], acts: torch.Tensor) -> None:
        """Add a batch's activations `[b, n_layers, hidden]` to its groups' sums; keep the ones needed."""
        acts = acts.to("cpu", torch.float64)
        spans = [(row, row_start[i], row_start[i + 1]) for row, i in enumerate(batch)]
        groups_b = torch.cat([group_of_member[a:b] for _, a, b in spans])
        rows_b = torch.as_tensor(np.concatenate([np.full(b - a, row) for row, a, b in spans]))
        sums.view(n_groups, -1).index_add_(0, groups_b, acts.reshape(len(batch), -1)[rows_b])
        for row, i in enumerate(batch):
            slot = slot_of.get(i)
            if slot is not None:
                kept_acts[slot] = acts[row].float()

    cached = precomputed or {}
    ready = [i for i in range(len(unique_texts)) if unique_texts[i] in cached]
    to_run = sorted((i for i in range(len(unique_texts)) if unique_texts[i] not in cached),
                    key=lambda i: len(encoded[i]))  # length-sorted: little padding per batch
    for start in range(0, len(ready), 256):
        batch = ready[start: start + 256]
        acts = torch.stack([cached[unique_texts[i]] for i in batch])
        if acts.shape[1:] != (n_layers, hidden):
            raise ValueError(f"precomputed activations are {tuple(acts.shape[1:])}, expected ({n_layers}, {hidden})")
        fold(batch, acts)
    pad_id = _pad_id(tokenizer)
    for start in range(0, len(to_run), batch_size):
        batch = to_run[start: start + batch_size]
        fold(batch, reader(*padded_batch([encoded[i] for i in batch], pad_id)))
        if progress is not None:
            progress(len(ready) + min(start + batch_size, len(to_run)), len(unique_texts))

    n = torch.as_tensor(np.bincount(member_group, minlength=n_groups), dtype=torch.float64)
    base_n = n[: 4 * n_concepts].view(n_concepts, 2, 2)  # [concept, polarity, split]
    base = sums[: 4 * n_concepts].view(n_concepts, 2, 2, n_layers, hidden)
    mean_all = base.sum(dim=2) / base_n.sum(dim=2)[..., None, None]  # [concept, polarity, layer, hidden]
    diff = mean_all[:, 0] - mean_all[:, 1]  # [concept, layer, hidden]
    raw_norm = diff.norm(dim=-1)  # [concept, layer]
    scale = torch.maximum(mean_all[:, 0].norm(dim=-1), mean_all[:, 1].norm(dim=-1)).clamp_min(1e-30)
    zero = raw_norm <= 1e-6 * scale
    unit_all = diff / raw_norm.clamp_min(1e-30)[..., None]
    # Where the class means sit along the vector: calibrates projections of new text (0 = a typical
    # negative, 1 = a typical positive).
    mean_projection = torch.einsum("cplh,clh->cpl", mean_all, unit_all)

    train_n = base_n[:, :, 0].clamp_min(1)
    train_diff = base[:, 0, 0] / train_n[:, 0, None, None] - base[:, 1, 0] / train_n[:, 1, None, None]
    transfer_diff, transfer_n = None, None
    if transfer is not None:
        transfer_n = n[4 * n_concepts:].view(n_concepts, 2)
        t_sums = sums[4 * n_concepts:].view(n_concepts, 2, n_layers, hidden)
        t_means = t_sums / transfer_n.clamp_min(1)[..., None, None]
        transfer_diff = t_means[:, 0] - t_means[:, 1]

    def separation(direction: torch.Tensor, pos: list[int], neg: list[int], j: int) -> float:
        norm = float(direction.norm())
        if not pos or not neg or norm == 0:
            return float("nan")
        d = (direction / norm).float()
        return auc((kept_acts[pos, j] @ d).numpy(), (kept_acts[neg, j] @ d).numpy())

    records, dropped = [], {}
    for k, concept in enumerate(concepts):
        rows_of = {p: np.flatnonzero((frame["emotion"] == concept).to_numpy() & (frame["polarity"] == p).to_numpy())
                   for p in POLARITIES}
        held_of = {p: [slot_of[text_index[r]] for r in rows_of[p] if held[r]] for p in POLARITIES}
        test_of = {p: [slot_of[text_index[r]] for r in rows_of[p] if test_rows[r]] for p in POLARITIES}
        for j, layer in enumerate(layers):
            record = {
                "emotion": concept, "layer": int(layer),
                "n_positive": int(base_n[k, 0].sum()), "n_negative": int(base_n[k, 1].sum()),
                "n_heldout_positive": int(base_n[k, 0, 1]), "n_heldout_negative": int(base_n[k, 1, 1]),
                "raw_norm": float(raw_norm[k, j]),
                "heldout_auc": separation(train_diff[k, j], held_of["positive"], held_of["negative"], j),
                "zero_norm": bool(zero[k, j]),
                "mean_projection_positive": float(mean_projection[k, 0, j]),
                "mean_projection_negative": float(mean_projection[k, 1, j]),
            }
            if transfer_diff is not None and transfer_n is not None:
                record.update({
                    "transfer_auc": separation(transfer_diff[k, j], test_of["positive"], test_of["negative"], j)
                    if bool((transfer_n[k] > 0).all()) else float("nan"),
                    "n_transfer_train_positive": int(transfer_n[k, 0]),
                    "n_transfer_train_negative": int(transfer_n[k, 1]),
                    "n_transfer_test_positive": len(test_of["positive"]),
                    "n_transfer_test_negative": len(test_of["negative"]),
                })
            records.append(record)
        if bool(zero[k].any()):
            bad_layers = [layers[j] for j in range(n_layers) if bool(zero[k, j])]
            why = f"mean(positive) equals mean(negative) at layers {bad_layers}: zero-norm direction"
            if on_zero_norm == "raise":
                raise ZeroNormError(f"emotion {concept!r}: {why}")
            dropped[concept] = why
    stats = pd.DataFrame.from_records(records)
    keep = [k for k, c in enumerate(concepts) if c not in dropped]
    vectors = {layer: unit_all[keep][:, j].to(torch.float32).contiguous() for j, layer in enumerate(layers)}
    kept = [concepts[k] for k in keep]
    pair_counts = {c: {"positive": int(counts[(c, "positive")]), "negative": int(counts[(c, "negative")])}
                   for c in kept}
    activations = {str(unique_texts[t]): kept_acts[slot] for t, slot in slot_of.items()} if keep_activations else None
    return SteeringVectors(kept, list(layers), vectors, pair_counts=pair_counts,
                           model=model_name if model_name is not None else _model_name(model),
                           reduction=reduction, stats=stats, dropped=dropped, truncated_texts=truncated,
                           max_tokens=max_tokens, bos_excluded=bos_id is not None, activations=activations)


def _capped_rows(frame: pd.DataFrame, rows: np.ndarray, text_index: np.ndarray, max_texts: int,
                 seed: int) -> np.ndarray:
    """`rows` limited to the rows of at most `max_texts` of their texts (smallest hash first)."""
    texts = sorted(set(text_index[rows].tolist()), key=lambda t: _stable_rank(str(seed), "transfer", str(t)))
    if len(texts) <= max_texts:
        return rows
    allowed = np.zeros(int(text_index.max()) + 1, dtype=bool)
    allowed[texts[:max_texts]] = True
    return rows & allowed[text_index]


# --------------------------------------------------------------------------------------------
# The readout files
# --------------------------------------------------------------------------------------------


def save_readout(vectors: SteeringVectors, directory: str | os.PathLike[str],
                 extra: Mapping[str, Any] | None = None) -> Path:
    """Write `vectors.safetensors` (keys `layer_<idx>.vectors`) and `manifest.json`, each atomically.
    `extra` adds fields to the manifest (e.g. the emotions skipped for too few pairs)."""
    directory = Path(directory)
    tensors = {tensor_key(layer): vectors.vectors[layer].detach().to("cpu", torch.float32).contiguous()
               for layer in vectors.layers}
    manifest = {**vectors.manifest(), **(extra or {})}
    calibration = _calibration_records(vectors.stats)
    if calibration:  # the training projections' class means: a reader can place new texts on that scale
        manifest["calibration"] = calibration
    atomic_write_bytes(directory / VECTORS_FILE, safetensors_save(tensors, metadata={"format": FORMAT}))
    atomic_write_json(directory / MANIFEST_FILE, manifest)
    return directory


CALIBRATION_COLUMNS = ["emotion", "layer", "mean_projection_positive", "mean_projection_negative"]


def _calibration_records(stats: pd.DataFrame | None) -> list[dict[str, Any]]:
    if stats is None or not set(CALIBRATION_COLUMNS) <= set(stats.columns):
        return []
    rows = stats[CALIBRATION_COLUMNS].dropna()
    return [{"emotion": str(r.emotion), "layer": int(r.layer), "mean_projection_positive": float(r.mean_projection_positive),
             "mean_projection_negative": float(r.mean_projection_negative)} for r in rows.itertuples(index=False)]


def readout_problems(directory: str | os.PathLike[str]) -> list[str]:
    """Everything wrong with a saved readout: files, keys, shapes, dtypes, finiteness, unit norms."""
    directory = Path(directory)
    problems: list[str] = []
    for name in (VECTORS_FILE, MANIFEST_FILE):
        if not (directory / name).is_file():
            problems.append(f"{name} is missing in {directory}")
    if problems:
        return problems
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    tensors = safetensors_load((directory / VECTORS_FILE).read_bytes())
    concepts, layers = manifest.get("concepts", []), manifest.get("layers", [])
    expected = {tensor_key(layer) for layer in layers}
    if set(tensors) != expected:
        problems.append(f"tensor keys {sorted(tensors)} != manifest layers {sorted(expected)}")
    if len(set(concepts)) != len(concepts):
        problems.append("duplicate concepts in the manifest")
    if set(manifest.get("pair_counts", {})) != set(concepts):
        problems.append("pair_counts do not list exactly the manifest's concepts")
    for key in sorted(expected & set(tensors)):
        t = tensors[key]
        if tuple(t.shape) != (len(concepts), manifest.get("hidden_size")):
            problems.append(f"{key} has shape {tuple(t.shape)}, manifest says "
                            f"({len(concepts)}, {manifest.get('hidden_size')})")
        if t.dtype != torch.float32:
            problems.append(f"{key} is {t.dtype}, not float32")
        if not bool(torch.isfinite(t).all()):
            problems.append(f"{key} has non-finite values")
        elif t.numel():
            err = float((t.double().norm(dim=-1) - 1).abs().max())
            if err > UNIT_NORM_TOLERANCE:
                problems.append(f"{key} rows are not unit norm (max |norm-1| = {err:.2e})")
    return problems


@overload
def load_readout(directory: str | os.PathLike[str], layout: Literal["per_layer"] = "per_layer") -> SteeringVectors: ...


@overload
def load_readout(directory: str | os.PathLike[str], layout: Literal["ELH"]) -> torch.Tensor: ...


def load_readout(directory: str | os.PathLike[str], layout: str = "per_layer") -> SteeringVectors | torch.Tensor:
    """Read a readout written by `save_readout`; a clear error if files and manifest disagree.

    `layout="per_layer"`: a `SteeringVectors`; `layout="ELH"`: the seed's `[n_concepts, n_layers, hidden]`
    tensor (concepts and layers in manifest order)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, not {layout!r}")
    directory = Path(directory)
    problems = readout_problems(directory)
    if problems:
        raise ValueError(f"invalid readout in {directory}: " + "; ".join(problems))
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    tensors = safetensors_load((directory / VECTORS_FILE).read_bytes())
    layers = [int(x) for x in manifest["layers"]]
    vectors = SteeringVectors(
        concepts=list(manifest["concepts"]),
        layers=layers,
        vectors={layer: tensors[tensor_key(layer)] for layer in layers},
        pair_counts={c: {k: int(v) for k, v in d.items()} for c, d in manifest.get("pair_counts", {}).items()},
        model=manifest.get("model", ""),
        reduction=manifest.get("token_reduction", "last"),
        index_convention=manifest.get("index_convention", INDEX_CONVENTION),
        dropped=dict(manifest.get("dropped", {})),
        truncated_texts=int(manifest.get("truncated_texts", 0)),
        max_tokens=manifest.get("max_tokens"),
        bos_excluded=bool(manifest.get("bos_excluded", False)),
        skipped_reason=str(manifest.get("skipped_reason", "")),
    )
    if manifest.get("calibration"):
        vectors.stats = pd.DataFrame(manifest["calibration"])
    return vectors.as_tensor() if layout == "ELH" else vectors
