"""Where a model runs and in which precision: `resolve_device` and `resolve_dtype`.

"auto" picks CUDA, then Apple's MPS, then the CPU; `resolve_dtype`'s "auto" is bf16 on a CUDA device
with bf16 support, else fp32 (what a model folder is stored in). `fast_dtype` is the precision a model
*runs* fastest in: bf16 on a CUDA GPU with bf16, and on a CPU with native bf16 instructions
(`cpu_bf16_supported`: AVX512-BF16 or AMX-BF16) *where a quick measurement says bf16 matrix products are
faster there* (`cpu_bf16_faster`): the flags alone are not enough. On this project's 2-core AVX512-BF16
Xeon, one measurement gave bf16 2.2x fp32 (205 vs 92 GFLOP/s, 2048^2), another, with this torch build on
the busy machine, 0.6x (20 vs 33 GFLOP/s), and a SmolLM2-135M forward was slower in bf16. MPS stays
fp32 unless asked: its bf16/fp16 kernels are incomplete and the CARL statistics already run in float32
there. Asking for a device that is not there is an
error that names it, never a silent fall back to the CPU.

`available_cores` is the number of CPU cores this process may use (its affinity mask, capped by a
cgroup CPU quota): the default for torch's intra-op threads on a real model.
"""

from __future__ import annotations

import functools
import math
import os
import time
from pathlib import Path

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:<index>", "mps")
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    """The devices this machine offers, e.g. ['cuda:0', 'cuda:1', 'cpu']."""
    found = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if _mps_available():
        found.append("mps")
    return [*found, "cpu"]


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device `spec` names: "auto" (or None/"") → CUDA if available, then MPS, then CPU; "cpu",
    "cuda", "cuda:N", "mps" as asked.

    Raises ValueError naming the value when it is unknown, or when the device is not on this machine
    (with the devices that are)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {spec!r}: use one of {', '.join(DEVICE_CHOICES)}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {spec!r} asked for, but CUDA is not available here "
                f"(available: {', '.join(available_devices())})"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {spec!r} asked for, but there are only {torch.cuda.device_count()} CUDA "
                f"devices (available: {', '.join(available_devices())})"
            )
        return device
    if device.type == "mps":
        if not _mps_available():
            raise ValueError(
                f"device {spec!r} asked for, but MPS is not available here "
                f"(available: {', '.join(available_devices())})"
            )
        return device
    raise ValueError(f"unsupported device {spec!r}: use one of {', '.join(DEVICE_CHOICES)}")


def _bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products (x86)
CPU_BF16_ENV = "CARL_CPU_BF16"  # "1"/"0": say whether the CPU has native bf16 (overrides the detection)


@functools.lru_cache(maxsize=1)
def _cpuinfo_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_bf16_supported() -> bool:
    """Whether this CPU multiplies bf16 natively: x86 flags avx512_bf16 or amx_bf16 in /proc/cpuinfo (Linux),
    or ARM's bf16 feature. Elsewhere (macOS, Windows) False, unless CARL_CPU_BF16=1 says so.

    torch still computes bf16 without these instructions, but by converting to fp32, slower than fp32."""
    override = os.environ.get(CPU_BF16_ENV, "").strip()
    if override in ("0", "1"):
        return override == "1"
    flags = _cpuinfo_flags()
    return any(f in flags for f in CPU_BF16_FLAGS) or "bf16" in flags


BF16_SPEEDUP_NEEDED = 1.3  # bf16 must beat fp32 by this factor to be the default (its logits are coarser)


# A small model's MLP layer over a batch of tokens, and a square product (where fp32 kernels are at their
# best).
BF16_PROBE_SHAPES = ((256, 576, 1536), (1024, 1024, 1024))


def _matmul_seconds(dtype: torch.dtype, shape: tuple[int, int, int], rounds: int = 2, reps: int = 2) -> float:
    """Best time of `reps` products of an [m, k] x [k, n] matrix pair in `dtype`, over `rounds` rounds."""
    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(dtype)
    b = torch.randn(k, n, generator=generator).to(dtype)
    a @ b  # warm-up: kernel selection
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - start) / reps)
    return best


@functools.lru_cache(maxsize=1)
def _measured_bf16_speedup() -> float:
    """fp32 time / bf16 time of the same matrix products (`BF16_PROBE_SHAPES`, summed) on this CPU,
    interleaved so a burst of load hits both (once per process)."""
    fp32 = {shape: float("inf") for shape in BF16_PROBE_SHAPES}
    bf16 = dict(fp32)
    for _ in range(2):
        for shape in BF16_PROBE_SHAPES:
            fp32[shape] = min(fp32[shape], _matmul_seconds(torch.float32, shape))
            bf16[shape] = min(bf16[shape], _matmul_seconds(torch.bfloat16, shape))
    return sum(fp32.values()) / sum(bf16.values())


def cpu_bf16_faster() -> bool:
    """Whether a real model should run in bf16 on this CPU: it has native bf16 (`cpu_bf16_supported`) and a
    quick interleaved measurement of two matrix products (about 0.3 s on an idle 2-core CPU, a few seconds
    on a busy one; once per process) finds bf16 at least
    `BF16_SPEEDUP_NEEDED` times as fast as fp32. CARL_CPU_BF16=1/0 decides without measuring."""
    override = os.environ.get(CPU_BF16_ENV, "").strip()
    if override in ("0", "1"):
        return override == "1"
    return cpu_bf16_supported() and _measured_bf16_speedup() >= BF16_SPEEDUP_NEEDED


def native_bf16(device: str | torch.device | None) -> bool:
    """Whether `device` (resolved) computes bf16 natively: CUDA with bf16 support, or such a CPU."""
    where = resolve_device(device)
    return _bf16_supported(where) or (where.type == "cpu" and cpu_bf16_supported())


def fast_dtype(device: str | torch.device | None) -> torch.dtype:
    """What a real model's inference runs in by default: bf16 on a CUDA GPU with bf16, or on a CPU where
    `cpu_bf16_faster`; fp32 elsewhere."""
    where = resolve_device(device)
    if _bf16_supported(where) or (where.type == "cpu" and cpu_bf16_faster()):
        return torch.bfloat16
    return torch.float32


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup v2 quota (`cpu.max`: "<quota> <period>"), or None when unlimited/unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1.0, int(quota) / int(period))
    except (ValueError, ZeroDivisionError):
        return None


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask (`os.sched_getaffinity`, where the OS has it;
    else `os.cpu_count()`), capped by a cgroup v2 CPU quota rounded up (a container limited to 1.5
    CPUs gets 2). At least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


def resolve_dtype(spec: str | torch.dtype | None, device: str | torch.device | None = "cpu") -> torch.dtype:
    """The dtype `spec` names: "auto" (or None/"") → bf16 on a CUDA device that supports it, fp32
    otherwise (CPU and MPS); "bf16"/"fp16"/"fp32" (or the torch names) as asked. Raises ValueError
    naming an unknown value."""
    if isinstance(spec, torch.dtype):
        if spec not in DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {spec}: use one of {', '.join(DTYPE_CHOICES)}")
        return spec
    text = (spec or "auto").strip().lower().removeprefix("torch.")
    if text == "auto":
        return torch.bfloat16 if _bf16_supported(resolve_device(device)) else torch.float32
    if text not in DTYPES:
        raise ValueError(f"unknown dtype {spec!r}: use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[text]


def dtype_name(dtype: torch.dtype) -> str:
    """'bf16', 'fp16' or 'fp32' (what configs and metadata say)."""
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def training_weights_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to load weights in for training at `dtype`: always fp32. bf16 and fp16 train as mixed
    precision (autocast) on fp32 master weights: the loss scaler refuses fp16 gradients, and bf16 weights
    would lose every update smaller than their rounding step (2^-8 of the weight: a 2e-5 learning rate
    times a unit Adam step is lost on any weight above ~0.005)."""
    return torch.float32
