"""A tiny GPT-2-like *base* model folder, as users bring them (case models/09): random weights, a byte-level
BPE tokenizer whose only special token `<|endoftext|>` is bos = eos = unk, no pad token, no chat template."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from carl_assets.memory_graph import load_graph

END = "<|endoftext|>"


def gpt2_like_tokenizer(vocab_size: int = 600) -> GPT2TokenizerFast:
    """Byte-level BPE trained on the sample memory graph's text, GPT-2's special-token layout."""
    texts = [t for t in load_graph("sample").nodes["text"].astype(str) if t.strip()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, bos_token=END, eos_token=END, unk_token=END)
    assert tokenizer.pad_token is None and not tokenizer.chat_template
    return tokenizer


def save_gpt2_like(
    folder: str | Path, hidden: int = 32, layers: int = 2, positions: int = 256
) -> GPT2LMHeadModel:
    """Write the model and tokenizer to `folder` (safetensors); returns the model (seed 0, eval mode)."""
    tokenizer = gpt2_like_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=hidden,
        n_layer=layers,
        n_head=2,
        n_positions=positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return model
