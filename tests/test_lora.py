"""LoRA through peft: target modules, config validation, and a LoRA SFT/GRPO step whose adapters, and only
they, train and are merged into a plain saved checkpoint that computes what the adapted model computed."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback

from carl_assets.carl.lora import default_target_modules, is_peft_model, lora_config, merge_adapters
from carl_assets.carl.sft_data import chat_prompt
from carl_assets.carl.training import GRPORunConfig, SFTRunConfig, train_grpo, train_sft
from tests.data.gpt2_like import save_gpt2_like

LLAMA_PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _dataset(n: int = 8) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [
                chat_prompt(f"Memory number {i} about the garden.", "Is this a memory?") for i in range(n)
            ],
            "completion": [[{"role": "assistant", "content": "Yes, it is."}] for _ in range(n)],
        }
    )


@pytest.fixture()
def fresh_tiny(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    return copy.deepcopy(model), tokenizer


def test_default_targets_are_the_block_projections(fresh_tiny, tmp_path):
    model, _ = fresh_tiny
    assert default_target_modules(model) == LLAMA_PROJECTIONS  # not lm_head, not the embeddings
    gpt2 = save_gpt2_like(tmp_path / "gpt2")
    assert default_target_modules(gpt2) == ["c_attn", "c_fc", "c_proj"]  # GPT-2's Conv1D layers


def test_lora_config_values_and_errors(fresh_tiny):
    model, _ = fresh_tiny
    assert lora_config(model, 0) is None  # full fine-tune
    config = lora_config(model, 4)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8.0, 0.0)  # alpha defaults to 2r
    assert sorted(config.target_modules) == LLAMA_PROJECTIONS
    assert sorted(lora_config(model, 2, 4, 0.1, ["q_proj", "self_attn.v_proj"]).target_modules) == [
        "q_proj",
        "self_attn.v_proj",
    ]
    with pytest.raises(ValueError, match=r"lora_target_modules \['c_attn'\] are not modules.*q_proj"):
        lora_config(model, 4, target_modules=["c_attn"])
    with pytest.raises(ValueError, match="lora_r must be 0"):
        lora_config(model, -1)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        lora_config(model, 4, dropout=1.0)


class _Snapshot(TrainerCallback):
    """At the end of training (before the merge): the peft model's base weights, adapter weights and its
    logits on a fixed input."""

    def __init__(self, input_ids: torch.Tensor):
        self.input_ids, self.base, self.adapters, self.logits, self.was_peft = input_ids, {}, {}, None, False

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.was_peft = is_peft_model(model)
        for name, param in model.named_parameters():
            target = self.adapters if "lora_" in name else self.base
            target[name] = param.detach().clone()
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=self.input_ids).logits.detach().clone()


def test_lora_sft_step_trains_only_adapters_and_merges_into_a_plain_checkpoint(fresh_tiny, tmp_path):
    model, tokenizer = fresh_tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = torch.tensor([tokenizer("I remembered the garden after rain.")["input_ids"]])
    snapshot = _Snapshot(probe)
    config = SFTRunConfig(max_steps=2, learning_rate=5e-2, batch_size=4, lora_r=4, gate_threshold=1.01)
    outcome = train_sft(model, tokenizer, _dataset(), tmp_path / "sft", config, extra_callbacks=[snapshot])

    assert outcome.steps == 2 and snapshot.was_peft
    # base weights untouched by the step (peft names them ...base_model.model.<name> or <name>.base_layer)
    for name, value in snapshot.base.items():
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
        torch.testing.assert_close(value, before[plain], rtol=0, atol=0)
    lora_b = [v for n, v in snapshot.adapters.items() if "lora_B" in n]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # B starts at zero: the adapters did train
    # the returned model is merged (no peft layers) and differs from the start where adapters were
    assert not is_peft_model(model) and not any("lora_" in n for n, _ in model.named_parameters())
    assert not torch.equal(
        model.model.layers[0].self_attn.q_proj.weight, before["model.layers.0.self_attn.q_proj.weight"]
    )
    # the saved folder is a plain HF checkpoint whose forward equals the adapted model's
    out = tmp_path / "sft"
    assert (out / "model.safetensors").exists()
    assert not list(out.glob("adapter_*"))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, snapshot.logits, rtol=1e-4, atol=1e-5)


def test_merge_adapters_leaves_a_plain_model_alone(fresh_tiny):
    model, _ = fresh_tiny
    assert merge_adapters(model) is model


def test_lora_grpo_step_saves_a_merged_checkpoint(fresh_tiny, tmp_path):
    model, tokenizer = fresh_tiny
    config = GRPORunConfig(
        max_steps=1, batch_size=4, num_generations=2, max_completion_length=6, lora_r=2, learning_rate=1e-2
    )
    outcome = train_grpo(model, tokenizer, _dataset(4), tmp_path / "grpo", config)
    assert outcome.steps == 1 and len(outcome.completions) == 4
    assert not is_peft_model(model)
    assert (tmp_path / "grpo" / "model.safetensors").exists() and not list(
        (tmp_path / "grpo").glob("adapter_*")
    )
    names = set(AutoModelForCausalLM.from_pretrained(tmp_path / "grpo").state_dict())
    assert not any("lora_" in n for n in names)
