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
  right padding both work); `mean`: the mask-weighted mean over real tokens.

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
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

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

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.vectors.values())).shape[1]) if self.vectors else 0

    def manifest(self) -> dict[str, Any]:
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
            "token_reduction_detail": REDUCTIONS.get(self.reduction, self.reduction),
            "pair_counts": {c: dict(self.pair_counts.get(c, {})) for c in self.concepts},
            "dropped": dict(self.dropped),
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

    def __init__(self, model: torch.nn.Module, layers: Sequence[int], reduction: str = "last"):
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
        self.deepest = max(self.layers)
        self._mask: torch.Tensor | None = None
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
        keep = mask.bool()[..., None]
        total = torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).sum(dim=1)
        return total / mask.sum(dim=1, keepdim=True).to(hidden.dtype)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if bool((attention_mask.sum(dim=1) == 0).any()):
            raise ValueError("a text encodes to zero tokens: empty texts have no activation to read")
        device = next(self.model.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        self._mask, self._out = attention_mask, {}
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
            self._mask = None
        return torch.stack([self._out[layer] for layer in self.layers], dim=1)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _as_frame(pairs: pd.DataFrame | Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    frame = pairs if isinstance(pairs, pd.DataFrame) else pd.DataFrame(list(pairs))
    missing = {"emotion", "polarity", "text"} - set(frame.columns)
    if missing:
        raise ValueError(f"pairs need columns emotion, polarity and text (missing {sorted(missing)})")
    frame = frame[["emotion", "polarity", "text"]].astype(str).reset_index(drop=True)
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
) -> SteeringVectors:
    """Per-emotion, per-layer unit diff-of-means directions (CAA) from (emotion, polarity, text) pairs.

    `pairs`: a DataFrame or records with `emotion`, `polarity` ("positive"/"negative") and `text`.
    `layers`: residual-stream indices (see the module docstring); default `default_layers(L)`.
    The vector uses every pair; the held-out AUC scores a direction computed without the held-out
    rows (a deterministic `heldout_fraction` per emotion and polarity, capped) on those rows.
    `on_zero_norm`: "raise" (ZeroNormError naming concept and layer) or "drop" (the concept is left
    out and listed in `dropped`).
    """
    if on_zero_norm not in ("raise", "drop"):
        raise ValueError("on_zero_norm must be 'raise' or 'drop'")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    frame = _as_frame(pairs)
    if frame.empty:
        raise ValueError("no training pairs")
    blocks = find_decoder_blocks(model)
    layers = default_layers(len(blocks)) if layers is None or len(layers) == 0 else sorted(int(x) for x in layers)
    reader = ResidualReader(model, layers, reduction)

    concepts = sorted(frame["emotion"].unique())
    counts = frame.groupby(["emotion", "polarity"]).size()
    for concept in concepts:
        for polarity in POLARITIES:
            if counts.get((concept, polarity), 0) == 0:
                raise ValueError(f"emotion {concept!r} has no {polarity} pairs: a difference of means needs both")
    held = heldout_mask(frame, heldout_fraction, max_heldout_per_polarity, seed)

    # Each unique text runs once; its activation is added to the sums of every group it belongs to.
    # Groups: (concept, polarity, split) with split 0 = train, 1 = held out.
    unique_texts, text_index = np.unique(frame["text"].to_numpy(dtype=object), return_inverse=True)
    concept_index = {c: k for k, c in enumerate(concepts)}
    group = (frame["emotion"].map(concept_index).to_numpy() * 4
             + (frame["polarity"] == "negative").to_numpy().astype(int) * 2 + held.astype(int))
    n_groups = len(concepts) * 4
    # Sparse membership (one entry per pair row, grouped by text), not a dense groups x texts matrix.
    by_text = np.argsort(text_index, kind="stable")
    row_start = np.searchsorted(text_index[by_text], np.arange(len(unique_texts) + 1))
    group_of_row = torch.as_tensor(group[by_text])
    held_rows = sorted(set(text_index[held].tolist()))
    held_slot = {t: k for k, t in enumerate(held_rows)}

    encoded = tokenizer(list(unique_texts), add_special_tokens=True, truncation=max_length is not None,
                        max_length=max_length)["input_ids"]
    order = sorted(range(len(unique_texts)), key=lambda i: len(encoded[i]))  # little padding per batch
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_layers = len(layers)
    hidden = int(getattr(model.config, "hidden_size", 0) or model.get_input_embeddings().weight.shape[1])
    sums = torch.zeros(n_groups, n_layers, hidden, dtype=torch.float64)
    held_acts = torch.zeros(len(held_rows), n_layers, hidden, dtype=torch.float32)

    for start in range(0, len(order), batch_size):
        batch = order[start: start + batch_size]
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # right padding; the reader handles either side
            ids[row, : len(encoded[i])] = torch.as_tensor(encoded[i])
            mask[row, : len(encoded[i])] = 1
        acts = reader(ids, mask).to("cpu", torch.float64)  # [b, n_layers, hidden]
        slices = [(row, row_start[i], row_start[i + 1]) for row, i in enumerate(batch)]
        groups_b = torch.cat([group_of_row[a:b] for _, a, b in slices])
        rows_b = torch.as_tensor(np.concatenate([np.full(b - a, row) for row, a, b in slices]))
        sums.view(n_groups, -1).index_add_(0, groups_b, acts.view(len(batch), -1)[rows_b])
        for row, i in enumerate(batch):
            slot = held_slot.get(i)
            if slot is not None:
                held_acts[slot] = acts[row].float()
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))

    n = torch.as_tensor(np.bincount(group, minlength=n_groups), dtype=torch.float64)
    n = n.view(len(concepts), 2, 2)  # [concept, polarity, split]
    sums = sums.view(len(concepts), 2, 2, n_layers, hidden)
    mean_all = sums.sum(dim=2) / n.sum(dim=2)[..., None, None]  # [concept, polarity, layer, hidden]
    diff = mean_all[:, 0] - mean_all[:, 1]  # [concept, layer, hidden]
    raw_norm = diff.norm(dim=-1)  # [concept, layer]
    scale = torch.maximum(mean_all[:, 0].norm(dim=-1), mean_all[:, 1].norm(dim=-1)).clamp_min(1e-30)
    zero = raw_norm <= 1e-6 * scale

    train_n = n[:, :, 0].clamp_min(1)
    train_diff = sums[:, 0, 0] / train_n[:, 0, None, None] - sums[:, 1, 0] / train_n[:, 1, None, None]
    records, dropped = [], {}
    for k, concept in enumerate(concepts):
        texts_of = {p: frame.index[(frame["emotion"] == concept) & (frame["polarity"] == p)] for p in POLARITIES}
        held_of = {p: [held_slot[text_index[r]] for r in texts_of[p] if held[r]] for p in POLARITIES}
        for j, layer in enumerate(layers):
            direction = train_diff[k, j]
            norm = float(direction.norm())
            if held_of["positive"] and held_of["negative"] and norm > 0:
                d = (direction / norm).float()
                separation = auc((held_acts[held_of["positive"], j] @ d).numpy(),
                                 (held_acts[held_of["negative"], j] @ d).numpy())
            else:
                separation = float("nan")
            records.append({
                "emotion": concept, "layer": int(layer),
                "n_positive": int(n[k, 0].sum()), "n_negative": int(n[k, 1].sum()),
                "n_heldout_positive": int(n[k, 0, 1]), "n_heldout_negative": int(n[k, 1, 1]),
                "raw_norm": float(raw_norm[k, j]), "heldout_auc": separation, "zero_norm": bool(zero[k, j]),
            })
        if bool(zero[k].any()):
            bad_layers = [layers[j] for j in range(n_layers) if bool(zero[k, j])]
            why = f"mean(positive) equals mean(negative) at layers {bad_layers}: zero-norm direction"
            if on_zero_norm == "raise":
                raise ZeroNormError(f"emotion {concept!r}: {why}")
            dropped[concept] = why
    stats = pd.DataFrame.from_records(records)
    keep = [k for k, c in enumerate(concepts) if c not in dropped]
    unit = diff[keep] / raw_norm[keep][..., None]
    vectors = {layer: unit[:, j].to(torch.float32).contiguous() for j, layer in enumerate(layers)}
    kept = [concepts[k] for k in keep]
    pair_counts = {c: {"positive": int(counts[(c, "positive")]), "negative": int(counts[(c, "negative")])}
                   for c in kept}
    return SteeringVectors(kept, list(layers), vectors, pair_counts=pair_counts,
                           model=model_name if model_name is not None else _model_name(model),
                           reduction=reduction, stats=stats, dropped=dropped)


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
    atomic_write_bytes(directory / VECTORS_FILE, safetensors_save(tensors, metadata={"format": FORMAT}))
    atomic_write_json(directory / MANIFEST_FILE, manifest)
    return directory


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


def load_readout(directory: str | os.PathLike[str]) -> SteeringVectors:
    """Read a readout written by `save_readout`; a clear error if files and manifest disagree."""
    directory = Path(directory)
    problems = readout_problems(directory)
    if problems:
        raise ValueError(f"invalid readout in {directory}: " + "; ".join(problems))
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    tensors = safetensors_load((directory / VECTORS_FILE).read_bytes())
    layers = [int(x) for x in manifest["layers"]]
    return SteeringVectors(
        concepts=list(manifest["concepts"]),
        layers=layers,
        vectors={layer: tensors[tensor_key(layer)] for layer in layers},
        pair_counts={c: {k: int(v) for k, v in d.items()} for c, d in manifest.get("pair_counts", {}).items()},
        model=manifest.get("model", ""),
        reduction=manifest.get("token_reduction", "last"),
        index_convention=manifest.get("index_convention", INDEX_CONVENTION),
        dropped=dict(manifest.get("dropped", {})),
    )
