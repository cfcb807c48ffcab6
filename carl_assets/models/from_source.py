"""Loading a causal LM and its tokenizer from a resolved source (a local folder, a hub id, a `.gguf` file or
a packaged model), with the project's one tokenizer policy (chat template, pad token) applied."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from carl_assets.models.chat_template import ensure_chat_template, ensure_pad_token
from carl_assets.models.device import resolve_device, resolve_dtype
from carl_assets.models.gguf import load_gguf_model, load_gguf_tokenizer
from carl_assets.models.sizes import model_max_positions
from carl_assets.models.sources import (
    ModelSource,
    check_weight_format,
    gguf_source_file,
    resolve_model_source,
)

MODEL_INFO_FILE = "carl_model.json"  # where the model came from and whether it needs remote code


def load_model_and_tokenizer(
    path_or_id: str | os.PathLike[str],
    trust_remote_code: bool | None = None,
    dtype: torch.dtype | str | None = None,
    allow_pickle: bool = False,
    device: str | torch.device | None = None,
    missing_chat_template: str = "install",
) -> tuple[PreTrainedModel, Any]:
    """A causal LM and its tokenizer from a local folder, a hub id, a `.gguf` file or a packaged model
    name, in eval mode, with a pad token and a chat template.

    `device`: None keeps the model on the CPU (as before); "auto", "cpu", "cuda[:N]" or "mps" places it
    (`carl_assets.models.device.resolve_device`). `dtype`: None is fp32; "auto" is bf16 on a CUDA device
    that supports it, else fp32; "bf16"/"fp16"/"fp32" or a torch dtype as asked.

    `trust_remote_code=None` means: what the folder's `carl_model.json` records (the `base_model`
    asset writes it, so downstream assets load a remote-code model the way it was configured), else off.
    Weights must be safetensors: a folder (or hub repository) with only pickle weights
    (`pytorch_model.bin`, `*.pt`, `*.pkl`, ...) is refused with a clear error unless `allow_pickle=True`.
    A tokenizer without a chat template gets the transcript template (`missing_chat_template="install"`,
    logged as a warning) or is refused (`"fail"`); one without a pad token pads with eos (else unk).
    A GGUF source is dequantized on every call: `base_model` converts it once to safetensors.
    """
    source = resolve_model_source(str(path_or_id))
    if source.kind == "offline":
        raise ValueError("load_model_and_tokenizer needs a path or hub id; build the offline model first")
    # Resolve the device before any file is read: a bad name fails fast and says what is available.
    target = resolve_device(device) if device is not None else torch.device("cpu")
    model, tokenizer, _ = load_source(
        source, trust_remote_code, dtype, allow_pickle, target, missing_chat_template
    )
    if target.type != "cpu":
        model = model.to(target)
    return model, tokenizer


def load_source(
    source: ModelSource,
    trust_remote_code: bool | None,
    dtype: torch.dtype | str | None,
    allow_pickle: bool,
    target: torch.device,
    missing_chat_template: str,
) -> tuple[PreTrainedModel, Any, dict[str, Any]]:
    """Model, tokenizer (policy applied, before the weights are read) and what the policy changed."""
    dtype = torch.float32 if dtype is None else resolve_dtype(dtype, target)
    if source.kind in ("gguf", "packaged"):
        gguf_file = gguf_source_file(source)
        tokenizer = load_gguf_tokenizer(gguf_file)
        notes = apply_tokenizer_policy(tokenizer, source.value, missing_chat_template)
        model = load_gguf_model(gguf_file, dtype)
        limit = model_max_positions(model)
        if limit is not None and tokenizer.model_max_length > limit:  # GGUF gives no limit (1e30)
            tokenizer.model_max_length = limit
        _set_pad_ids(model, tokenizer)
        return model.eval(), tokenizer, notes
    if source.kind == "local":
        check_weight_format(source.value, allow_pickle)
    if trust_remote_code is None:
        marker = Path(source.value) / MODEL_INFO_FILE if source.kind == "local" else None
        recorded = json.loads(marker.read_text()) if marker is not None and marker.is_file() else {}
        trust_remote_code = bool(recorded.get("trust_remote_code", False))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.value, trust_remote_code=trust_remote_code)
        notes = apply_tokenizer_policy(tokenizer, source.value, missing_chat_template)
        # use_safetensors=True: never fall back to a pickle (for a hub id, where no folder was checked)
        model = AutoModelForCausalLM.from_pretrained(
            source.value,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            use_safetensors=None if allow_pickle else True,
        )
    except OSError as exc:
        where = "folder" if source.kind == "local" else "hub id (is it cached? the hub may be offline)"
        hint = "" if allow_pickle else " (only safetensors weights are loaded unless allow_pickle=True)"
        raise OSError(f"could not load model from {where} {source.value!r}{hint}: {exc}") from exc
    _set_pad_ids(model, tokenizer)
    return model.eval(), tokenizer, notes


def apply_tokenizer_policy(
    tokenizer: Any, name: str, missing_chat_template: str = "install"
) -> dict[str, Any]:
    """The project's one policy for a loaded tokenizer (`carl_assets.models.chat_template`): install the
    transcript template when there is no chat template (or raise, `"fail"`), pad with eos (else unk)
    when there is no pad token. Returns `chat_template_installed`, `chat_template_reason`, `pad_token`
    and `pad_token_set` (what was changed, "" if nothing)."""
    reason = ensure_chat_template(tokenizer, missing_chat_template, name=f"model {name!r}")
    pad_set = ensure_pad_token(tokenizer, name=f"model {name!r}")
    return {
        "chat_template_installed": reason is not None,
        "chat_template_reason": reason or "",
        "pad_token": str(tokenizer.pad_token),
        "pad_token_set": pad_set or "",
    }


def _set_pad_ids(model: PreTrainedModel, tokenizer: Any) -> None:
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def sample_generation(
    model: PreTrainedModel, tokenizer: Any, prompt: str, max_new_tokens: int = 40, chat: bool = True
) -> str:
    """Greedy continuation of `prompt` (through the chat template when it has one): a quick look at the
    model."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        input_ids, mask = ids["input_ids"], ids["attention_mask"]
    else:
        enc = tokenizer(prompt, return_tensors="pt")
        input_ids, mask = enc["input_ids"], enc["attention_mask"]
    device = next(model.parameters()).device
    input_ids, mask = input_ids.to(device), mask.to(device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)
