"""bench/real_model.py's arithmetic: this machine's matrix-multiply limit and the FLOPs a Llama-style
model spends per token (counted, not measured)."""

from __future__ import annotations

import time

import torch


def matmul_gflops(
    dtype: torch.dtype, size: int = 2048, repeats: int = 3, per_timing: int = 4
) -> tuple[float, float]:
    """Best (GFLOP per wall second, GFLOP per CPU second of this process) of `size`^2 matmuls (2 size^3
    FLOPs each) on torch's current threads."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.matmul(a, b)  # warm-up (packing, thread pool)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(per_timing):
            torch.matmul(a, b)
        best, best_cpu = (
            min(best, time.perf_counter() - start),
            min(best_cpu, time.process_time() - start_cpu),
        )
    flops = 2 * size**3 * per_timing / 1e9
    return flops / best, flops / best_cpu


def model_shape(model: torch.nn.Module) -> dict[str, int]:
    config = model.config
    unique = {id(p): p for p in model.parameters()}.values()
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() for p in unique)
    return {
        "parameters": total,
        "non_embedding": total - embed.numel(),
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "vocab": embed.shape[0],
    }


def forward_flops_per_token(shape: dict[str, int], context: float, logits_share: float) -> float:
    """Forward FLOPs per token: dense layers, attention over `context` positions, and the LM head on the
    share of tokens whose logits are computed."""
    dense = 2 * shape["non_embedding"]
    attention = 4 * shape["layers"] * context * shape["hidden"]
    head = 2 * shape["vocab"] * shape["hidden"] * logits_share
    return dense + attention + head


def mean_causal_context(lengths: list[int]) -> float:
    """Average number of positions a token attends to, over every token of sequences of these lengths."""
    total = sum(n * (n + 1) / 2 for n in lengths)
    return total / sum(lengths)
