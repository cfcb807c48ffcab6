"""`SteeringScorer`: how strongly a response's residual stream points along an emotion's readout vector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from carl_assets.dreams.forward import ResponseForward, batches, score_with_shared_forward
from carl_assets.dreams.generation import GeneratedResponse, pad_and_eos_ids
from carl_assets.steering.manifest import SteeringVectors
from carl_assets.steering.residual import find_decoder_blocks


class _StopForward(Exception):
    """Raised by the reading hook: the blocks above the read layer are not needed."""


class SteeringScorer:
    """Projection of the response's residual stream on an emotion's unit readout vector.

    The residual stream at `layer` (the readout convention: index i = output of decoder block i-1,
    0 = the input of block 0; default the readout's deepest layer) is averaged over the response's
    tokens only (prompt excluded; a trailing EOS excluded too, as it is the same token in every
    finished response and carries nothing of the response) and dotted with the emotion's vector.
    `batch_size` responses per forward; responses to the same prompt share one run of it
    (`carl_assets.dreams.forward`), else prompt + response run right-padded up to the read layer. A
    response with no tokens to read scores 0.0.
    """

    needs_predicting = False

    def __init__(
        self, vectors: SteeringVectors, emotion: str, layer: int | None = None, batch_size: int = 16
    ):
        if emotion not in vectors.concepts:
            raise ValueError(
                f"unknown emotion {emotion!r}: the steering vectors know {sorted(vectors.concepts)}"
            )
        self.layer = int(max(vectors.layers) if layer is None else layer)
        if self.layer not in vectors.vectors:
            raise ValueError(f"layer {self.layer} has no steering vectors (layers: {sorted(vectors.layers)})")
        self.emotion = emotion
        self.vector = vectors.vectors[self.layer][vectors.concepts.index(emotion)].detach().to(torch.float32)
        self.batch_size = batch_size
        self.primary = f"steering:{emotion}"

    @property
    def layers_needed(self) -> tuple[int, ...]:
        return (self.layer,)

    def __call__(
        self, model: Any, tokenizer: Any, responses: Sequence[GeneratedResponse]
    ) -> dict[str, np.ndarray]:
        shared = score_with_shared_forward([self], model, tokenizer, responses, self.batch_size)
        return shared if shared is not None else self._score_separately(model, tokenizer, responses)

    def empty(self, n: int) -> dict[str, np.ndarray]:
        return {self.primary: np.zeros(n)}

    def fill(self, out: dict[str, np.ndarray], forward: ResponseForward, model: Any, eos: set[int]) -> None:
        mask = forward.completion_mask.clone()
        lengths = mask.sum(dim=1)
        last = forward.completion_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        drop_eos = (lengths > 1) & torch.as_tensor([int(t) in eos for t in last.tolist()], dtype=torch.bool)
        rows = drop_eos.nonzero().squeeze(1)
        mask[rows, lengths[rows] - 1] = 0
        out[self.primary][forward.rows] = self._mean_projection(forward.residual[self.layer], mask)

    def finish(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return out

    def _mean_projection(self, hidden: torch.Tensor, read: torch.Tensor) -> np.ndarray:
        weights = read.unsqueeze(-1).to(hidden.device)
        # where(), not a product: padded positions may hold NaN in some attention kernels
        summed = (
            torch.where(weights > 0, hidden.float(), torch.zeros((), device=hidden.device)).sum(dim=1).cpu()
        )
        counts = read.sum(dim=1).to(torch.float32)
        mean = summed / counts.clamp(min=1.0).unsqueeze(-1)
        projection = (mean.double() @ self.vector.double()).numpy()
        projection[counts.numpy() == 0] = 0.0
        return projection

    def _score_separately(
        self, model: Any, tokenizer: Any, responses: Sequence[GeneratedResponse]
    ) -> dict[str, np.ndarray]:
        pad_id, eos = pad_and_eos_ids(model, tokenizer)
        out = np.zeros(len(responses))
        for rows in batches(len(responses), self.batch_size):
            sequences, spans = [], []
            for i in rows:
                completion = list(responses[i].completion_ids)
                if len(completion) > 1 and completion[-1] in eos:
                    completion = completion[:-1]
                spans.append((len(responses[i].prompt_ids), len(completion)))
                sequences.append(list(responses[i].prompt_ids) + completion)
            out[list(rows)] = self.project(model, sequences, spans, pad_id)
        return {self.primary: out}

    def project(
        self, model: Any, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]], pad_id: int
    ) -> np.ndarray:
        """Mean residual-stream projection over positions `[start, start + length)` of each sequence."""
        width = max(len(s) for s in sequences)
        device = next(model.parameters()).device
        ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        read = torch.zeros((len(sequences), width), dtype=torch.float32)
        for r, (seq, (start, length)) in enumerate(zip(sequences, spans, strict=True)):
            ids[r, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            attention[r, : len(seq)] = 1
            read[r, start : start + length] = 1.0
        captured: dict[str, torch.Tensor] = {}
        blocks = find_decoder_blocks(model)
        if not 0 <= self.layer <= len(blocks):
            raise ValueError(f"layer {self.layer} is outside 0..{len(blocks)} for this model")

        def capture(hidden: torch.Tensor) -> None:
            captured["hidden"] = hidden
            raise _StopForward

        if self.layer == 0:  # what enters block 0
            handle = blocks[0].register_forward_pre_hook(
                lambda _m, args, kwargs: capture(args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True,
            )
        else:
            handle = blocks[self.layer - 1].register_forward_hook(
                lambda _m, _i, output: capture(output[0] if isinstance(output, (tuple, list)) else output)
            )
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
            model.train(was_training)
        return self._mean_projection(captured["hidden"], read)
