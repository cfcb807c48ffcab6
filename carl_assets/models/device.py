"""Where a model runs and in which precision: `resolve_device` and `resolve_dtype`.

"auto" picks CUDA, then Apple's MPS, then the CPU; its dtype is bf16 where the device computes it
natively (CUDA with bf16 support), else fp32. MPS stays fp32 unless asked: its bf16/fp16 kernels are
incomplete and the CARL statistics already run in float32 there. Asking for a device that is not
there is an error that names it, never a silent fall back to the CPU.
"""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:<index>", "mps")
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
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
    """"auto" (or None/"") → CUDA if available, then MPS, then CPU; "cpu", "cuda", "cuda:N", "mps" as asked.

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
            raise ValueError(f"device {spec!r} asked for, but CUDA is not available here "
                             f"(available: {', '.join(available_devices())})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} asked for, but there are only {torch.cuda.device_count()} CUDA "
                             f"devices (available: {', '.join(available_devices())})")
        return device
    if device.type == "mps":
        if not _mps_available():
            raise ValueError(f"device {spec!r} asked for, but MPS is not available here "
                             f"(available: {', '.join(available_devices())})")
        return device
    raise ValueError(f"unsupported device {spec!r}: use one of {', '.join(DEVICE_CHOICES)}")


def _bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(spec: str | torch.dtype | None, device: str | torch.device | None = "cpu") -> torch.dtype:
    """"auto" (or None/"") → bf16 on a CUDA device that supports it, fp32 otherwise (CPU and MPS);
    "bf16"/"fp16"/"fp32" (or the torch names) as asked. Raises ValueError naming an unknown value."""
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
    """The dtype to load weights in for training at `dtype`: fp16 trains as mixed precision on fp32 master
    weights (the loss scaler refuses fp16 gradients); bf16 and fp32 train in their own dtype."""
    return torch.float32 if dtype == torch.float16 else dtype
