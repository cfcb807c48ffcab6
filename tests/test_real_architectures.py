"""The whole chain through the Dagster assets on tiny random models of three real architectures, given as
a local folder (`base_model.model = <folder>`): Llama, Qwen2 and GPT-2 (no pad token in its tokenizer,
absolute position embeddings), all with tied input/output embeddings; and a GPT-2 *base* model as users
bring them (case models/09: bos = eos = unk, no pad, no chat template), which base_model gives the
transcript template that dreams, SFT, GRPO and the agent then share. Real-model defaults apply (they
are not the offline model), so the configs shrink every size; gradient checkpointing stays on."""

import json

import dagster as dg
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from carl_assets import storage
from carl_assets.defs import agent, crystallization, dreams, grpo, memory, models, sft, sft_training, steering
from carl_assets.defs.resources import build_resources
from carl_assets.memory_graph import load_graph
from carl_assets.models.chat_template import transcript_template
from carl_assets.models.loading import train_tokenizer
from tests.data.gpt2_like import save_gpt2_like
from tests.upstreams import with_upstreams

CHAIN = [
    memory.memory_graph,
    memory.emotion_training_pairs,
    models.base_model,
    steering.steering_vectors,
    dreams.dream_scenarios,
    sft.sft_dataset,
    sft_training.sft_checkpoint,
    crystallization.crystallization_events,
    grpo.grpo_checkpoint,
    agent.agent_evaluation,
]
HIDDEN, LAYERS = 32, 2


def _config(kind: str, tokenizer) -> object:
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if kind == "llama":
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            **ids,
        )
    if kind == "qwen2":
        return Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            **ids,
        )
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=2,
        n_positions=1024,
        tie_word_embeddings=True,
        **ids,
    )


CLASSES = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "gpt2_base": GPT2LMHeadModel,
}


def _save_model(kind: str, folder) -> torch.nn.Module:
    if kind == "gpt2_base":
        return save_gpt2_like(folder, hidden=HIDDEN, layers=LAYERS, positions=1024)
    texts = [t for t in load_graph("sample").nodes["text"].astype(str) if t.strip()]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    if kind == "gpt2":  # as the real GPT-2: no pad token (it must be padded with eos downstream)
        tokenizer.pad_token = None
        assert tokenizer.pad_token_id is None
    torch.manual_seed(0)
    model = CLASSES[kind](_config(kind, tokenizer)).eval()
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return model


def _run_config(model_dir) -> dict:
    tiny = {
        "base_model": {"model": str(model_dir)},
        "steering_vectors": {"batch_size": 64, "max_length": 64, "min_pairs_per_polarity": 5},
        "dream_scenarios": {
            "n_scenarios": 2,
            "responses_per_scenario": 2,
            "max_new_tokens": 4,
            "heldout_scenarios": 1,
            "excerpt_chars": 40,
        },
        "sft_dataset": {"holdout_tasks": 2},
        "sft_checkpoint": {
            "max_steps": 2,
            "batch_size": 2,
            "gradient_accumulation_steps": 1,
            "max_length": 256,
        },
        "crystallization_events": {"require_crystallization": False},
        "grpo_checkpoint": {
            "max_steps": 1,
            "batch_size": 2,
            "num_generations": 2,
            "max_completion_length": 4,
            "gradient_accumulation_steps": 1,
            "max_frac_reward_zero_std": 1.01,
        },
        "agent_evaluation": {"max_new_tokens": 4, "max_tasks": 2},
    }
    return {"ops": {name: {"config": values} for name, values in tiny.items()}}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "gpt2_base"])
def test_the_chain_runs_on_a_real_architecture(tmp_path, kind):
    original = _save_model(kind, tmp_path / "model")
    reloaded = load_file(str(tmp_path / "model" / "model.safetensors"))
    for name, tensor in original.state_dict().items():  # the saved weights round-trip (tied: stored once)
        key = name if name in reloaded else next((k for k in reloaded if k.endswith(name)), None)
        if key is not None:
            torch.testing.assert_close(reloaded[key], tensor)
    home = tmp_path / "home"
    result = dg.materialize(
        with_upstreams(*CHAIN), resources=build_resources(home), run_config=_run_config(tmp_path / "model")
    )
    assert result.success

    art = home / storage.ARTIFACTS_DIR
    base = (art / "base_model" / "current").resolve()
    info = json.loads((base / "carl_model.json").read_text())
    assert info["source"].startswith("local:")
    assert info["chat_template_installed"] is (kind == "gpt2_base")
    if kind == "gpt2_base":  # every later asset read this one template from the saved tokenizer
        saved = json.loads((base / "tokenizer_config.json").read_text())
        template = saved.get("chat_template") or (base / "chat_template.jinja").read_text()
        assert template == transcript_template(add_bos=False) and saved["pad_token"] == "<|endoftext|>"
    readout = load_file(str(art / "steering_vectors" / "current" / "vectors.safetensors"))
    manifest = json.loads((art / "steering_vectors" / "current" / "manifest.json").read_text())
    assert readout, "no readout vectors"
    for vectors in readout.values():
        assert (
            vectors.ndim == 2 and vectors.shape[1] == HIDDEN and vectors.shape[0] == len(manifest["concepts"])
        )
        norms = vectors.norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-4, atol=1e-4)

    db = home / storage.DATABASE_NAME
    sft_meta = result.asset_materializations_for_node("sft_checkpoint")[0].metadata
    # Real-model defaults where the config left 0/auto: cosine schedule, warm-up, checkpointing, fp32 on CPU.
    assert sft_meta["run/lr_scheduler_type"].value == "cosine"
    assert sft_meta["run/gradient_checkpointing"].value is True
    assert sft_meta["run/dtype"].value == "fp32" and sft_meta["run/device"].value == "cpu"
    grpo_meta = result.asset_materializations_for_node("grpo_checkpoint")[0].metadata
    assert grpo_meta["run/learning_rate"].value == pytest.approx(1e-6)
    for asset in ("sft_checkpoint", "grpo_checkpoint"):
        folder = (art / asset / "current").resolve()
        weights = load_file(str(folder / "model.safetensors"))
        assert all(bool(t.isfinite().all()) for t in weights.values() if t.is_floating_point())
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert type(model) is CLASSES[kind] and model.config.tie_word_embeddings
    evaluation = storage.read_table(db, "agent_evaluation")
    assert set(evaluation["checkpoint"]) == {"sft_checkpoint", "grpo_checkpoint"} and len(evaluation) == 4
    assert evaluation["phi_mean"].between(0, 1).all()
    agent_readout = storage.read_table(db, "agent_readout")
    assert len(agent_readout) > 0 and agent_readout["projection"].notna().all()
