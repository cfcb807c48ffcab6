"""The base model: tokenizer, tiny/offline builders, loading from a folder, source resolution, the asset."""

from __future__ import annotations

import json

import dagster as dg
import pytest
import torch

from carl_assets.models.loading import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    ModelSource,
    OfflineModelConfig,
    build_offline_model,
    build_tiny_model,
    count_parameters,
    load_model_and_tokenizer,
    resolve_model_source,
    train_tokenizer,
)


def test_tokenizer_special_tokens_roundtrip_and_chat_template(tiny_texts):
    tok = train_tokenizer(tiny_texts, vocab_size=400)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert 256 < len(tok) <= 400
    text = "Unseen wörds: ünïcode & 42 — still encodes."  # byte-level: nothing is unknown
    assert tok.decode(tok(text)["input_ids"]) == text

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How was the day?"},
        {"role": "assistant", "content": "Quiet and good."},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|system|>\nBe brief.<|eos|><|user|>\nHow was the day?<|eos|><|assistant|>\nQuiet and good.<|eos|>"
    )
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n") and rendered.startswith(prompt)
    out = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    # Only the assistant's content and its closing eos are marked as assistant tokens.
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "Quiet and good." + EOS_TOKEN
    assert ids[-1] == tok.eos_token_id and mask[-1] == 1
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_tiny_model_is_small_seeded_and_runs(tiny_texts):
    m1, tok = build_tiny_model(tiny_texts, seed=3)
    m2, _ = build_tiny_model(tiny_texts, seed=3)
    assert count_parameters(m1) < 60_000
    assert all(
        torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True)
    )
    enc = tok(tiny_texts[:3], return_tensors="pt", padding=True)
    logits = m1(**enc).logits
    assert logits.shape == (3, enc["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_resolve_model_source(tmp_path):
    assert resolve_model_source("").kind == "offline"
    assert resolve_model_source("offline").kind == "offline"
    assert resolve_model_source("Qwen/Qwen2.5-0.5B") == ModelSource("hub", "Qwen/Qwen2.5-0.5B")
    assert resolve_model_source("gpt2") == ModelSource("hub", "gpt2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_source(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_source("./models/missing/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_source(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        load_model_and_tokenizer(tmp_path / "nowhere")


def test_resolve_model_source_follows_an_asset_folders_current_version(tmp_path):
    # `carl agent --model .carl/artifacts/grpo_checkpoint` (README): the asset folder holds versions and
    # a `current` link, not the model itself.
    version = tmp_path / "grpo_checkpoint" / "20260101T000000Z-abc"
    version.mkdir(parents=True)
    (version / "config.json").write_text("{}")
    (tmp_path / "grpo_checkpoint" / "current").symlink_to(version.name)
    expected = ModelSource("local", str(version.resolve()))
    assert resolve_model_source(str(tmp_path / "grpo_checkpoint")) == expected
    assert resolve_model_source(str(version)) == ModelSource("local", str(version.resolve()))


def test_is_offline_model_asks_an_asset_folders_current_version(tmp_path):
    # `carl train --model .carl/artifacts/base_model` must take the offline model's defaults, as the version
    # folder does (it loads that version).
    from carl_assets.models.defaults import is_offline_model
    from carl_assets.models.loading import MODEL_INFO_FILE

    version = tmp_path / "base_model" / "v1"
    version.mkdir(parents=True)
    (version / "config.json").write_text("{}")
    (tmp_path / "base_model" / "current").symlink_to("v1")
    assert not is_offline_model(tmp_path / "base_model")
    (version / MODEL_INFO_FILE).write_text('{"source": "offline"}')
    assert is_offline_model(version) and is_offline_model(tmp_path / "base_model")
    (version / MODEL_INFO_FILE).write_text('{"source": "local"}')
    assert not is_offline_model(tmp_path / "base_model")


def test_saved_tiny_model_loads_back_identically(tiny_model_and_tokenizer, tmp_path):
    model, tok = tiny_model_and_tokenizer
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded, tok2 = load_model_and_tokenizer(tmp_path)
    assert tok2.pad_token == PAD_TOKEN and tok2.chat_template == tok.chat_template
    enc = tok(["a quiet morning", "the deadline and it was good."], return_tensors="pt", padding=True)
    with torch.inference_mode():
        assert torch.allclose(model(**enc).logits, loaded(**enc).logits, atol=1e-6)


def test_load_sets_missing_pad_token(tiny_model_and_tokenizer, tmp_path):
    model, tok = tiny_model_and_tokenizer
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    _, loaded = load_model_and_tokenizer(tmp_path)
    assert loaded.pad_token is not None and loaded.pad_token_id is not None


def test_offline_model_pretraining_lowers_the_loss(tiny_texts, tmp_path):
    cfg = OfflineModelConfig(
        vocab_size=512,
        hidden_size=48,
        num_layers=2,
        num_heads=2,
        intermediate_size=96,
        steps=40,
        seq_len=64,
        batch_size=8,
        learning_rate=5e-3,
        warmup_steps=5,
    )
    stats = build_offline_model(tiny_texts, tmp_path, cfg)
    losses = stats["losses"]
    assert len(losses) == 40
    assert stats["final_loss"] < 0.6 * stats["initial_loss"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()
    again = build_offline_model(tiny_texts, tmp_path / "again", cfg)  # seeded: the same run twice
    assert again["losses"] == losses
    model, _ = load_model_and_tokenizer(tmp_path)
    assert model.config.num_hidden_layers == 2 and count_parameters(model) == stats["parameters"]


@pytest.mark.slow
def test_base_model_asset_offline_default_shape(tmp_path):
    """The asset on the sample graph with a shortened pretraining (the default shape, fewer steps)."""
    from carl_assets.defs.memory import memory_graph
    from carl_assets.defs.models import base_model
    from carl_assets.defs.resources import build_resources

    run_config = {"ops": {"base_model": {"config": {"steps": 20}}}}
    result = dg.materialize(
        [memory_graph, base_model], resources=build_resources(tmp_path), run_config=run_config
    )
    assert result.success
    meta = result.asset_materializations_for_node("base_model")[0].metadata
    assert 500_000 < meta["parameters"].value < 5_000_000
    assert meta["num_layers"].value == 4 and meta["hidden_size"].value == 128
    assert meta["final_loss"].value < meta["initial_loss"].value
    assert "pretraining_loss" in meta and "sample_generation" in meta
    folder = tmp_path / "artifacts" / "base_model" / "current"
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    model, tok = load_model_and_tokenizer(folder)
    assert len(tok) == model.config.vocab_size


def test_base_model_asset_from_local_folder(tiny_model_and_tokenizer, tmp_path):
    """A local model folder is copied into the artifact (no memory graph needed) and the data version
    follows the weights."""
    from carl_assets.defs.models import base_model
    from carl_assets.defs.resources import build_resources
    from tests.upstreams import with_upstreams

    model, tok = tiny_model_and_tokenizer
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    home = tmp_path / "home"
    run_config = {"ops": {"base_model": {"config": {"model": str(src)}}}}
    result = dg.materialize(
        with_upstreams(base_model),
        resources=build_resources(home),
        run_config=run_config,
        selection=["base_model"],
    )
    meta = result.asset_materializations_for_node("base_model")[0].metadata
    assert meta["source"].value == f"local:{src.resolve()}"
    assert meta["num_layers"].value == 2 and meta["hidden_size"].value == 32
    copied, _ = load_model_and_tokenizer(home / "artifacts" / "base_model" / "current")
    info = json.loads((home / "artifacts" / "base_model" / "current" / "carl_model.json").read_text())
    assert info == {
        "source": f"local:{src.resolve()}",
        "trust_remote_code": False,
        "chat_template_installed": False,
    }
    assert torch.equal(copied.model.embed_tokens.weight, model.model.embed_tokens.weight)
    bad = {"ops": {"base_model": {"config": {"model": str(tmp_path / "missing")}}}}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dg.materialize(
            with_upstreams(base_model),
            resources=build_resources(home),
            run_config=bad,
            selection=["base_model"],
        )
