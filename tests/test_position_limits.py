"""Texts longer than a GPT-2-style model's position table (absolute positions: past it, an IndexError):
the agent, the dreams' generation and SFT cut to fit instead of crashing."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from carl_assets.carl.agent import agent_step
from carl_assets.carl.training import SFTRunConfig, train_sft
from carl_assets.dreams.generation import generate_responses
from carl_assets.models.loading import fit_prompt, model_max_positions

POSITIONS = 48
LONG = " ".join(["The long meeting ran over and I kept writing notes about the broken build."] * 8)


@pytest.fixture()
def short_gpt2(tiny_model_and_tokenizer):
    _, llama_tok = tiny_model_and_tokenizer
    backend = copy.deepcopy(llama_tok.backend_tokenizer)
    backend.no_padding()  # another test's batch may have left padding on the shared tokenizer
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|eos|>")
    tok.chat_template = llama_tok.chat_template
    assert tok.pad_token_id is None
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(llama_tok), n_embd=32, n_layer=2, n_head=2,
                                       n_positions=POSITIONS)).eval()
    return model, tok


def test_fit_prompt_keeps_the_end_and_room_for_the_answer(short_gpt2):
    model, _ = short_gpt2
    assert model_max_positions(model) == POSITIONS
    prompt = list(range(100))
    assert fit_prompt(prompt, model, 8) == prompt[-(POSITIONS - 8):]
    assert fit_prompt(prompt[:10], model, 8) == prompt[:10]


def test_agent_and_dream_generation_fit_the_position_table(short_gpt2):
    model, tok = short_gpt2
    assert len(tok(LONG)["input_ids"]) > POSITIONS
    step = agent_step(model, tok, LONG, "Which feelings does this memory carry?", max_new_tokens=16)
    assert step.raw_response is not None  # generated, no IndexError
    messages = [{"role": "system", "content": "Dream."}, {"role": "user", "content": LONG}]
    responses = generate_responses(model, tok, [messages], k=2, temperature=1.0, max_new_tokens=8)
    assert len(responses) == 2
    assert all(len(r.prompt_ids) + len(r.completion_ids) <= POSITIONS for r in responses)


@pytest.mark.slow
def test_sft_max_length_is_cut_to_the_position_table(short_gpt2):
    model, tok = short_gpt2
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Say it."}]] * 4,
                              "completion": [[{"role": "assistant", "content": LONG}]] * 4})
    outcome = train_sft(model, tok, data, None, SFTRunConfig(max_steps=1, batch_size=2, max_length=512))
    assert outcome.steps == 1
