"""Training the readout: per-emotion, per-layer unit CAA diff-of-means directions from (emotion, polarity,
text) pairs, composed of small stages (as the `steering-vectors` package composes extraction,
aggregation and training):

1. `group_texts`: each unique text once, linked to every (concept, polarity, split) group it belongs to;
2. `stream_activations`: read the texts through the model (`ResidualReader`) in length-sorted batches
   and fold each batch into per-group running sums (`GroupSums`);
3. `aggregate`: class means -> unit directions, norms, calibration means (`stats.Directions`);
4. `score_concepts`: held-out and transfer AUC per (emotion, layer), the zero-norm rule;
5. `assemble`: the `SteeringVectors` a readout saves.

Why it is fast: the same node text appears in many emotions' pairs (as a positive for one emotion and
a negative for most others), so each unique text is run once; texts are sorted by length so batches
carry little padding; the forward pass stops after the deepest requested layer; and activations are
folded into per-(emotion, polarity, split) running sums as batches stream, so activation memory does
not grow with the number of texts: what is kept is the sums, one batch of activations, and a capped
held-out sample for the separation score (plus the pairs themselves and their token ids).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator

from carl_assets.settings import Settings
from carl_assets.steering.manifest import Reduction, SteeringVectors
from carl_assets.steering.pairs import POLARITIES, capped_rows, heldout_mask, pairs_frame
from carl_assets.steering.residual import ResidualReader, default_layers, find_decoder_blocks
from carl_assets.steering.stats import Directions, concept_records
from carl_assets.steering.tokens import bos_to_skip, encode_texts, pad_token_id, padded_batch, token_limit

PRECOMPUTED_BATCH = 256  # cached activations folded per step (no forward pass: only memory bounds it)


class ZeroNormError(ValueError):
    """mean(positive) == mean(negative) for a concept and layer: there is no direction to normalise."""


class ReadoutConfig(Settings):
    """How `train_steering_vectors` reads and splits the pairs: the settings a user picks (the
    steering_vectors asset's config inherits this class, so each is defined here only). The held-out AUC
    scores a direction computed without the held-out rows (a deterministic `heldout_fraction` per emotion
    and polarity, at most `max_heldout_per_polarity`, drawn with the random `seed`) on those rows.
    Raises ValueError (pydantic's ValidationError) for a `batch_size` below 1 or an unknown `reduction`.
    """

    layers: list[int] = Field(
        default=[],
        description="residual-stream indices (i = after decoder block i-1, 0 = embeddings, before the final "
        "norm); empty = four layers spread by depth, round(L * [0.25, 0.5, 0.75, 1.0])",
    )
    reduction: Reduction = Field(
        default="mean",
        description="'mean' (mask-weighted mean over real tokens) or 'last' (last real token). Mean is the "
        "default: a readout projects every token, and on the small offline model the last token (mostly "
        "'.') carries no emotion signal (held-out AUC ~0.47 vs ~0.74 for mean on the sample graph).",
    )
    batch_size: int = Field(default=32, description="texts per forward pass")
    heldout_fraction: float = Field(
        default=0.2, description="share of each emotion's pairs held out for the AUC")
    max_heldout_per_polarity: int = Field(
        default=64, description="cap on held-out texts per emotion and polarity")
    seed: int = Field(default=0, description="seed of the deterministic held-out split")
    max_length: int | None = Field(
        default=512, description="texts are truncated to this many tokens (and to the model's position "
        "table; None: to the position table only); the number cut is reported as truncated_texts")
    exclude_bos: bool = Field(
        default=True, description="leave a leading BOS token out of the 'mean' reduction (its large "
        "activation adds a length-dependent direction on real models)")

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, value: int) -> int:
        if value < 1:
            raise ValueError("batch_size must be at least 1")
        return value


class ReadoutOptions(ReadoutConfig):
    """A `ReadoutConfig` and what the caller decides per call (not a user's setting of the asset).

    `on_zero_norm`: "raise" (ZeroNormError naming concept and layer) or "drop" (the concept is left out
    and listed in `dropped`). `transfer=(train_kind, test_kind)`: pairs need a `kind` column; the stats
    gain `transfer_auc`, the AUC on `test_kind` rows (at most `max_transfer_texts` texts) of a direction
    computed from `train_kind` rows only. `keep_activations`: return every text's activations in
    `.activations`. Raises ValueError for an unknown `on_zero_norm`.
    """

    on_zero_norm: Literal["raise", "drop"] = Field(
        default="raise", description="a zero-norm direction raises ZeroNormError, or its concept is dropped")
    transfer: tuple[str, str] | None = Field(
        default=None, description="(train kind, test kind) of the transfer check; None: no check")
    max_transfer_texts: int = Field(default=512, description="transfer check: at most this many test texts")
    keep_activations: bool = Field(default=False, description="return every text's activations")

    @field_validator("on_zero_norm", mode="before")
    @classmethod
    def _known_rule(cls, value: Any) -> Any:
        if value not in ("raise", "drop"):
            raise ValueError("on_zero_norm must be 'raise' or 'drop'")
        return value


@dataclass
class TextGroups:
    """The sparse membership of unique texts in groups. Groups 0..4C-1: (concept, polarity, split) with
    split 0 = train, 1 = held out; with a transfer check, groups 4C..6C-1: (concept, polarity) over the
    rows of the training kind. `member_group` lists one group per (text, group) link; `row_start[t]`
    indexes text t's links in `group_of_member` (sorted by text). `slot_of`: text -> row of the kept
    activations (held-out rows, transfer test rows, or all when asked)."""

    texts: np.ndarray
    text_index: np.ndarray
    member_group: np.ndarray
    row_start: np.ndarray
    group_of_member: torch.Tensor
    n_groups: int
    test_rows: np.ndarray
    slot_of: dict[int, int]


def group_texts(
    frame: pd.DataFrame, concepts: list[str], held: np.ndarray, config: ReadoutOptions
) -> TextGroups:
    """Stage 1: unique texts and the groups each one's activation adds to (see `TextGroups`)."""
    texts, text_index = np.unique(frame["text"].to_numpy(dtype=object), return_inverse=True)
    n_concepts = len(concepts)
    concept_of_row = frame["emotion"].map({c: k for k, c in enumerate(concepts)}).to_numpy()
    negative_row = (frame["polarity"] == "negative").to_numpy().astype(int)
    member_text = [text_index]
    member_group = [concept_of_row * 4 + negative_row * 2 + held.astype(int)]
    test_rows = np.zeros(len(frame), dtype=bool)
    if config.transfer is not None:
        train_kind, test_kind = (str(k) for k in config.transfer)
        if train_kind == test_kind:
            raise ValueError(f"transfer needs two different kinds, got {train_kind!r} twice")
        train_rows = (frame["kind"] == train_kind).to_numpy()
        member_text.append(text_index[train_rows])
        member_group.append(4 * n_concepts + concept_of_row[train_rows] * 2 + negative_row[train_rows])
        test_rows = capped_rows(
            (frame["kind"] == test_kind).to_numpy(), text_index, config.max_transfer_texts, config.seed
        )
    links_text, links_group = np.concatenate(member_text), np.concatenate(member_group)
    by_text = np.argsort(links_text, kind="stable")
    kept = (
        range(len(texts)) if config.keep_activations else sorted(set(text_index[held | test_rows].tolist()))
    )
    return TextGroups(
        texts=texts,
        text_index=text_index,
        member_group=links_group,
        row_start=np.searchsorted(links_text[by_text], np.arange(len(texts) + 1)),
        group_of_member=torch.as_tensor(links_group[by_text]),
        n_groups=n_concepts * (6 if config.transfer is not None else 4),
        test_rows=test_rows,
        slot_of={t: k for k, t in enumerate(kept)},
    )


class GroupSums:
    """Stage 2's accumulator: float64 per-group activation sums `[n_groups, n_layers, H]` and the kept
    activations `[len(slot_of), n_layers, H]` float32."""

    def __init__(self, groups: TextGroups, n_layers: int, hidden: int):
        self.groups, self.n_layers, self.hidden = groups, n_layers, hidden
        self.sums = torch.zeros(groups.n_groups, n_layers, hidden, dtype=torch.float64)
        self.kept = torch.zeros(len(groups.slot_of), n_layers, hidden, dtype=torch.float32)

    def fold(self, batch: Sequence[int], acts: torch.Tensor) -> None:
        """Add a batch's activations `[b, n_layers, hidden]` (texts `batch`) to their groups' sums."""
        g = self.groups
        acts = acts.to("cpu", torch.float64)
        spans = [(row, g.row_start[i], g.row_start[i + 1]) for row, i in enumerate(batch)]
        groups_b = torch.cat([g.group_of_member[a:b] for _, a, b in spans])
        rows_b = torch.as_tensor(np.concatenate([np.full(b - a, row) for row, a, b in spans]))
        self.sums.view(g.n_groups, -1).index_add_(0, groups_b, acts.reshape(len(batch), -1)[rows_b])
        for row, i in enumerate(batch):
            slot = g.slot_of.get(i)
            if slot is not None:
                self.kept[slot] = acts[row].float()


def stream_activations(
    reader: ResidualReader,
    encoded: list[list[int]],
    sums: GroupSums,
    batch_size: int,
    pad_id: int,
    precomputed: Mapping[str, torch.Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Stage 2: fold every unique text's activations into `sums`: cached ones from `precomputed` (text ->
    `[n_layers, H]`, read with the same settings), the rest through `reader` in length-sorted batches.
    `progress(done, total)` after each batch run. Raises ValueError for cached activations of another
    shape."""
    texts, cached = sums.groups.texts, precomputed or {}
    ready = [i for i in range(len(texts)) if texts[i] in cached]
    to_run = sorted(
        (i for i in range(len(texts)) if texts[i] not in cached), key=lambda i: len(encoded[i])
    )  # length-sorted: little padding per batch
    for start in range(0, len(ready), PRECOMPUTED_BATCH):
        batch = ready[start : start + PRECOMPUTED_BATCH]
        acts = torch.stack([cached[texts[i]] for i in batch])
        if acts.shape[1:] != (sums.n_layers, sums.hidden):
            raise ValueError(
                f"precomputed activations are {tuple(acts.shape[1:])}, "
                f"expected ({sums.n_layers}, {sums.hidden})"
            )
        sums.fold(batch, acts)
    for start in range(0, len(to_run), batch_size):
        batch = to_run[start : start + batch_size]
        sums.fold(batch, reader(*padded_batch([encoded[i] for i in batch], pad_id)))
        if progress is not None:
            progress(len(ready) + min(start + batch_size, len(to_run)), len(texts))


def aggregate(sums: GroupSums, n_concepts: int, with_transfer: bool) -> Directions:
    """Stage 3: class means -> unit diff-of-means directions, raw norms, the zero-norm flags (raw norm
    at most 1e-6 of the larger class mean's), class-mean projections and the split directions."""
    n_layers, hidden = sums.n_layers, sums.hidden
    n = torch.as_tensor(
        np.bincount(sums.groups.member_group, minlength=sums.groups.n_groups), dtype=torch.float64
    )
    base_n = n[: 4 * n_concepts].view(n_concepts, 2, 2)  # [concept, polarity, split]
    base = sums.sums[: 4 * n_concepts].view(n_concepts, 2, 2, n_layers, hidden)
    mean_all = base.sum(dim=2) / base_n.sum(dim=2)[..., None, None]  # [concept, polarity, layer, hidden]
    diff = mean_all[:, 0] - mean_all[:, 1]  # [concept, layer, hidden]
    raw_norm = diff.norm(dim=-1)  # [concept, layer]
    scale = torch.maximum(mean_all[:, 0].norm(dim=-1), mean_all[:, 1].norm(dim=-1)).clamp_min(1e-30)
    unit = diff / raw_norm.clamp_min(1e-30)[..., None]
    train_n = base_n[:, :, 0].clamp_min(1)
    directions = Directions(
        base_n=base_n,
        raw_norm=raw_norm,
        zero=raw_norm <= 1e-6 * scale,
        unit=unit,
        # Where the class means sit along the vector: calibrates projections of new text (0 = a typical
        # negative, 1 = a typical positive).
        mean_projection=torch.einsum("cplh,clh->cpl", mean_all, unit),
        train_diff=base[:, 0, 0] / train_n[:, 0, None, None] - base[:, 1, 0] / train_n[:, 1, None, None],
    )
    if with_transfer:
        directions.transfer_n = n[4 * n_concepts :].view(n_concepts, 2)
        t_sums = sums.sums[4 * n_concepts :].view(n_concepts, 2, n_layers, hidden)
        t_means = t_sums / directions.transfer_n.clamp_min(1)[..., None, None]
        directions.transfer_diff = t_means[:, 0] - t_means[:, 1]
    return directions


def score_concepts(
    frame: pd.DataFrame,
    concepts: list[str],
    layers: list[int],
    held: np.ndarray,
    sums: GroupSums,
    d: Directions,
    on_zero_norm: str,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Stage 4: the stats table (see `stats.concept_records`) and the concepts dropped for a zero norm.
    Raises ZeroNormError for one when `on_zero_norm == "raise"`."""
    g, records, dropped = sums.groups, [], {}
    for k, concept in enumerate(concepts):
        rows_of = {
            p: np.flatnonzero((frame["emotion"] == concept).to_numpy() & (frame["polarity"] == p).to_numpy())
            for p in POLARITIES
        }
        held_of = {p: [g.slot_of[g.text_index[r]] for r in rows_of[p] if held[r]] for p in POLARITIES}
        test_of = {p: [g.slot_of[g.text_index[r]] for r in rows_of[p] if g.test_rows[r]] for p in POLARITIES}
        records += concept_records(concept, k, layers, d, sums.kept, held_of, test_of)
        if bool(d.zero[k].any()):
            bad_layers = [layers[j] for j in range(len(layers)) if bool(d.zero[k, j])]
            why = f"mean(positive) equals mean(negative) at layers {bad_layers}: zero-norm direction"
            if on_zero_norm == "raise":
                raise ZeroNormError(f"emotion {concept!r}: {why}")
            dropped[concept] = why
    return pd.DataFrame.from_records(records), dropped


def _concepts(frame: pd.DataFrame) -> tuple[list[str], pd.Series]:
    """The sorted emotions and the (emotion, polarity) row counts; ValueError if one lacks a polarity."""
    concepts = sorted(frame["emotion"].unique())
    counts = frame.groupby(["emotion", "polarity"]).size()
    for concept in concepts:
        for polarity in POLARITIES:
            if counts.get((concept, polarity), 0) == 0:
                raise ValueError(
                    f"emotion {concept!r} has no {polarity} pairs: a difference of means needs both"
                )
    return concepts, counts


def _model_name(model: torch.nn.Module) -> str:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return str(name) or type(model).__name__


def _hidden_size(model: torch.nn.Module) -> int:
    return int(getattr(model.config, "hidden_size", 0) or model.get_input_embeddings().weight.shape[1])


def train_steering_vectors(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: pd.DataFrame | Iterable[Mapping[str, Any]],
    config: ReadoutConfig | None = None,
    *,
    model_name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    precomputed: Mapping[str, torch.Tensor] | None = None,
    **settings: Any,
) -> SteeringVectors:
    """Per-emotion, per-layer unit diff-of-means directions (CAA) from (emotion, polarity, text) pairs.

    `pairs`: a DataFrame or records with `emotion`, `polarity` ("positive"/"negative") and `text` (and
    `kind` for a transfer check). `config` (default `ReadoutConfig()`, or a `ReadoutOptions`), with any
    field of `ReadoutOptions` overridden by keyword in `settings` (TypeError for an unknown name).
    `model_name`: the manifest's model (default the model's `_name_or_path`). `progress(done, total)`:
    unique texts read. `precomputed`: reduced activations `[len(layers), hidden]` per text, read with the
    same settings (the layer sweep's); those texts are not run again. Every pair contributes to the
    vector; see `ReadoutConfig` for the splits. Raises ValueError for no pairs, an emotion lacking a
    polarity, or a bad setting; ZeroNormError (a ValueError) as `on_zero_norm` says.
    """
    unknown = set(settings) - set(ReadoutOptions.model_fields)
    if unknown:
        raise TypeError(
            f"unknown readout setting(s) {sorted(unknown)}: choose from {list(ReadoutOptions.model_fields)}"
        )
    config = ReadoutOptions.overridden(config, **settings)
    frame = pairs_frame(pairs, with_kind=config.transfer is not None)
    if frame.empty:
        raise ValueError("no training pairs")
    blocks = find_decoder_blocks(model)
    layers = (
        sorted(int(x) for x in config.layers) if config.layers else default_layers(len(blocks))
    )
    bos_id = bos_to_skip(tokenizer, config.exclude_bos)
    reader = ResidualReader(model, layers, config.reduction, skip_leading_token_id=bos_id)
    max_tokens = token_limit(model, config.max_length)
    concepts, counts = _concepts(frame)
    held = heldout_mask(frame, config.heldout_fraction, config.max_heldout_per_polarity, config.seed)
    groups = group_texts(frame, concepts, held, config)
    encoded, truncated = encode_texts(tokenizer, list(groups.texts), max_tokens)
    sums = GroupSums(groups, len(layers), _hidden_size(model))
    stream_activations(
        reader, encoded, sums, config.batch_size, pad_token_id(tokenizer), precomputed, progress
    )
    directions = aggregate(sums, len(concepts), config.transfer is not None)
    stats, dropped = score_concepts(frame, concepts, layers, held, sums, directions, config.on_zero_norm)
    vectors = assemble(
        concepts, layers, directions, counts, dropped, sums if config.keep_activations else None
    )
    vectors.model = model_name if model_name is not None else _model_name(model)
    vectors.reduction, vectors.stats, vectors.truncated_texts = config.reduction, stats, truncated
    vectors.max_tokens, vectors.bos_excluded = max_tokens, bos_id is not None
    return vectors


def assemble(
    concepts: list[str],
    layers: list[int],
    d: Directions,
    counts: pd.Series,
    dropped: dict[str, str],
    kept_sums: GroupSums | None,
) -> SteeringVectors:
    """Stage 5: the kept concepts' float32 unit vectors per layer, their pair counts, and (from
    `kept_sums`, when activations are kept) every text's activations."""
    keep = [k for k, c in enumerate(concepts) if c not in dropped]
    vectors = {layer: d.unit[keep][:, j].to(torch.float32).contiguous() for j, layer in enumerate(layers)}
    kept = [concepts[k] for k in keep]
    pair_counts = {
        c: {"positive": int(counts[(c, "positive")]), "negative": int(counts[(c, "negative")])} for c in kept
    }
    activations = None
    if kept_sums is not None:
        g = kept_sums.groups
        activations = {str(g.texts[t]): kept_sums.kept[slot] for t, slot in g.slot_of.items()}
    return SteeringVectors(
        kept, list(layers), vectors, pair_counts=pair_counts, dropped=dropped, activations=activations
    )
