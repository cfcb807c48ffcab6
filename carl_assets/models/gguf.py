"""GGUF model files (llama.cpp's format) read through transformers and saved as a safetensors folder.

transformers reads a GGUF file when the `gguf` package is installed
(`from_pretrained(folder, gguf_file=name)`), dequantizing every tensor to float. The model it returns
still carries the GGUF quantization entry (`config.quantization_config`, `model.hf_quantizer`), with
which it cannot be saved as an ordinary checkpoint, so it is rebuilt from its config without that entry
and given the dequantized weights (`load_state_dict(strict=True)`, tied embeddings re-tied). The result
is a plain Hugging Face model whose logits equal the GGUF-loaded one's exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel


def _split(path: str | os.PathLike[str]) -> tuple[Path, str]:
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"{str(path)!r} is not a .gguf file")
    return path.parent, path.name


def without_quantizer(model: PreTrainedModel, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The same weights in a model rebuilt from `model.config` minus its quantization entry, in `dtype`.

    Raises RuntimeError (from `load_state_dict(strict=True)`) if the rebuilt architecture's parameter
    names differ from the loaded ones."""
    values = model.config.to_dict()
    values.pop("quantization_config", None)
    values.pop("_name_or_path", None)
    config = AutoConfig.for_model(**values)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    if model.generation_config is not None:
        plain.generation_config = model.generation_config
    return plain.to(dtype).eval()


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer stored in a GGUF file (vocabulary, merges, special tokens, chat template), converted
    by transformers. Raises FileNotFoundError / ValueError for a missing or non-.gguf path, ImportError
    when the `gguf` package is missing."""
    folder, name = _split(path)
    _require_gguf()
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def load_gguf_model(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The causal LM of a GGUF file, dequantized, rebuilt without the quantizer (`without_quantizer`),
    in `dtype` and eval mode. Errors as `load_gguf_tokenizer`."""
    folder, name = _split(path)
    _require_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return without_quantizer(loaded, dtype)


def load_gguf(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, Any]:
    """(`load_gguf_model`, `load_gguf_tokenizer`) of one file."""
    return load_gguf_model(path, dtype), load_gguf_tokenizer(path)


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as exc:
        raise ImportError("reading a GGUF file needs the gguf package: pip install gguf") from exc
