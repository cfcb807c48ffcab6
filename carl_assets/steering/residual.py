"""Reading the residual stream: the decoder blocks, the layer indices, and `ResidualReader`.

Layer index `i` is the residual stream after decoder block `i-1`; index 0 is the input of block 0 (the
embeddings, with position embeddings where the model adds them). All are before the final norm, which
is what a vLLM readout sees (`hidden_states + residual`). Captured with forward hooks on the blocks,
not from `output_hidden_states` (whose last entry is after the final norm).

Token reduction `last`: the last real token of each text, found from the attention mask (so left and
right padding both work); `mean`: the mask-weighted mean over real tokens, leaving out a leading BOS
token (on real models its activations are huge and the same in every text, so averaging it in adds a
direction that depends only on the text's length).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from carl_assets.steering.manifest import REDUCTIONS

DEPTH_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
_BLOCK_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
    "layers",
)


def default_layers(num_blocks: int, fractions: Sequence[float] = DEPTH_FRACTIONS) -> list[int]:
    """Four layers spread by depth: round(L * f) for f in 0.25, 0.5, 0.75, 1.0 (half rounds up),
    at least 1, deduplicated. For L=4: [1, 2, 3, 4]; L=32: [8, 16, 24, 32]; L=64: [16, 32, 48, 64]."""
    if num_blocks < 1:
        raise ValueError("the model has no decoder blocks")
    return sorted({min(num_blocks, max(1, int(math.floor(num_blocks * f + 0.5)))) for f in fractions})


def find_decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder blocks (Llama/Qwen/Mistral `model.layers`, GPT-2 `transformer.h`, ...).

    Raises ValueError when the model has no non-empty `ModuleList`."""
    for path in _BLOCK_PATHS:
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

    def __init__(
        self,
        model: torch.nn.Module,
        layers: Sequence[int],
        reduction: str,
        skip_leading_token_id: int | None = None,
    ):
        """`reduction`: 'last' or 'mean' (`manifest.REDUCTIONS`; no default here: the one default is
        `ReadoutConfig.reduction`'s). `skip_leading_token_id`: with the `mean` reduction, a text whose
        first real token is this id (the BOS) is averaged without it. Raises ValueError for an unknown
        reduction or a layer outside 0..L or repeated."""
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
        total = torch.where(
            keep[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        )
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
        """`[B, T]` ids and mask -> `[B, n_layers, H]` float32 reduced activations."""
        if bool((attention_mask.sum(dim=1) == 0).any()):
            raise ValueError("a text encodes to zero tokens: empty texts have no activation to read")
        device = next(self.model.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        self._mask, self._out = attention_mask, {}
        self._mean_mask = self._mean_positions(input_ids, attention_mask)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "use_cache": False,
        }
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
