"""One policy for models without a chat template (case models/09): `base_model` installs the transcript
template (or fails at once), and dreams, SFT and the agent then all use that one format."""

from __future__ import annotations

import json

import dagster as dg
import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from carl_assets.carl.sft_data import chat_prompt
from carl_assets.carl.training import SFTRunConfig, train_sft
from carl_assets.defs.models import base_model
from carl_assets.defs.resources import build_resources
from carl_assets.dreams.generation import encode_prompt
from carl_assets.models.chat_template import (
    chat_template_for,
    ensure_chat_template,
    ensure_pad_token,
    transcript_template,
)
from carl_assets.models.loading import load_model_and_tokenizer
from tests.data.gpt2_like import END, gpt2_like_tokenizer, save_gpt2_like
from tests.upstreams import with_upstreams

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How was the day?"}]
ANSWER = {"role": "assistant", "content": "Quiet and good."}


# The transcript dreams used to build by hand for template-less tokenizers, for MESSAGES (written out).
OLD_TRANSCRIPT = "system: Be brief.\nuser: How was the day?\nassistant:"


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return gpt2_like_tokenizer()


def test_transcript_template_renders_the_dream_transcript_and_marks_the_answer(gpt2_tokenizer):
    tok = gpt2_tokenizer
    template = chat_template_for(tok)
    assert template == transcript_template(add_bos=False)  # GPT-2 adds no bos to plain text
    prompt = tok.apply_chat_template(
        MESSAGES, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert prompt == OLD_TRANSCRIPT
    full = tok.apply_chat_template([*MESSAGES, ANSWER], chat_template=template, tokenize=False)
    assert full == OLD_TRANSCRIPT + " Quiet and good." + END + "\n"
    # Token level: the prompt is a prefix of prompt + answer (TRL's completion mask relies on it) ...
    prompt_ids = tok.apply_chat_template(
        MESSAGES, chat_template=template, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    out = tok.apply_chat_template(
        [*MESSAGES, ANSWER], chat_template=template, return_dict=True, return_assistant_tokens_mask=True
    )
    assert out["input_ids"][: len(prompt_ids)] == prompt_ids
    # ... and the assistant mask covers exactly the answer and its eos (assistant_only_loss).
    marked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.decode(marked) == "Quiet and good." + END
    assert prompt_ids == tok(OLD_TRANSCRIPT)["input_ids"]


def test_transcript_template_starts_with_bos_when_the_tokenizer_adds_one():
    bpe = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2, "a": 3}, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert tok("a")["input_ids"] == [0, 3]  # Llama-style: bos in front of plain text
    assert chat_template_for(tok) == transcript_template(add_bos=True)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "a"}],
        chat_template=chat_template_for(tok),
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == "<s>user: a\nassistant:"


def test_policy_install_fail_and_pad(caplog):
    fresh = gpt2_like_tokenizer()
    with pytest.raises(ValueError, match="has no chat template: pass an instruct model"):
        ensure_chat_template(fresh, "fail", name="model 'gpt2_like'")
    with pytest.raises(ValueError, match="must be one of"):
        ensure_chat_template(fresh, "guess")
    with caplog.at_level("WARNING"):
        reason = ensure_chat_template(fresh, "install", name="model 'gpt2_like'")
    assert "no chat template" in reason and "transcript template" in caplog.text
    assert fresh.chat_template == transcript_template(False)
    assert ensure_chat_template(fresh, "fail") is None  # it has one now: nothing to do, nothing raised
    assert ensure_pad_token(fresh) == "pad token set to '<|endoftext|>' (the eos token)"
    assert fresh.pad_token_id == fresh.eos_token_id and ensure_pad_token(fresh) is None
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, unk_token=None)))
    with pytest.raises(ValueError, match="no pad, eos or unk token"):
        ensure_pad_token(bare)


@pytest.fixture(scope="module")
def base_model_run(tmp_path_factory):
    """The case's GPT-2-like base model through the base_model asset (default policy: install)."""
    root = tmp_path_factory.mktemp("gpt2_like")
    save_gpt2_like(root / "model")
    home = root / "home"
    result = dg.materialize(
        with_upstreams(base_model),
        resources=build_resources(home),
        selection=["base_model"],
        run_config={"ops": {"base_model": {"config": {"model": str(root / "model")}}}},
    )
    return root, home, result


def test_base_model_installs_the_template_into_the_saved_tokenizer(base_model_run):
    root, home, result = base_model_run
    meta = result.asset_materializations_for_node("base_model")[0].metadata
    assert meta["chat_template_installed"].value is True
    assert "no chat template" in meta["chat_template_reason"].value
    assert meta["pad_token"].value == END
    folder = home / "artifacts" / "base_model" / "current"
    saved = AutoTokenizer.from_pretrained(folder)  # a plain reader, not the project's loader
    assert saved.chat_template == transcript_template(False) and saved.pad_token == END
    assert json.loads((folder / "carl_model.json").read_text())["chat_template_installed"] is True
    original = AutoTokenizer.from_pretrained(root / "model")
    assert not original.chat_template  # the user's folder is left as it was


def test_dream_prompt_and_one_sft_step_on_the_base_model(base_model_run):
    """base_model → a dream-format prompt (the same ids as the old hand-built transcript) → one SFT step
    (TRL needs tokenizer.chat_template: it failed with 'chat_template is not set' before)."""
    _, home, _ = base_model_run
    model, tok = load_model_and_tokenizer(home / "artifacts" / "base_model" / "current")
    assert encode_prompt(tok, MESSAGES) == tok(OLD_TRANSCRIPT)["input_ids"]
    prompts = [
        chat_prompt(f"Memory {i}: the garden after rain.", "Which feelings does this memory carry?")
        for i in range(4)
    ]
    data = Dataset.from_dict(
        {"prompt": prompts, "completion": [[{"role": "assistant", "content": "Mostly calm."}]] * 4}
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outcome = train_sft(
        model, tok, data, None, SFTRunConfig(max_steps=1, batch_size=2, learning_rate=1e-3, threads=1)
    )
    assert outcome.steps == 1
    losses = [r["loss"] for r in outcome.log_history if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "transformer.wte.weight" in changed  # it trained


def test_fail_policy_stops_at_base_model(tmp_path):
    save_gpt2_like(tmp_path / "model")
    config = {"model": str(tmp_path / "model"), "missing_chat_template": "fail"}
    with pytest.raises(ValueError, match="has no chat template: pass an instruct model"):
        dg.materialize(
            with_upstreams(base_model),
            resources=build_resources(tmp_path / "home"),
            selection=["base_model"],
            run_config={"ops": {"base_model": {"config": config}}},
        )
    # A choice outside the policies is refused by Dagster's config check, before the run starts.
    with pytest.raises(dg.DagsterInvalidConfigError, match="missing_chat_template not in enum"):
        dg.materialize(
            with_upstreams(base_model),
            resources=build_resources(tmp_path / "home"),
            selection=["base_model"],
            run_config={"ops": {"base_model": {"config": {**config, "missing_chat_template": "x"}}}},
        )
