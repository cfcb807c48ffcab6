"""The offline default model, built here: no model hub is reachable at run time, so a byte-level BPE
tokenizer is trained on the memory-graph text and a small Llama pretrained briefly on the same text with
a causal-LM loss. It is tiny (about 1M parameters) but its activations and generations carry real signal,
which the steering vectors and the CARL reward need. `build_tiny_model` is its randomly initialised
miniature for tests.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from carl_assets.models.sizes import count_parameters
from carl_assets.settings import Settings

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS.values()]

# Each turn is `<|role|>\n content <|eos|>`; an assistant turn therefore ends with eos, so generation
# stops there. The `{% generation %}` block lets TRL train on assistant tokens only
# (`return_assistant_tokens_mask`). No automatic bos: like Qwen, text is encoded as is.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts: Sequence[str], *, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with pad/bos/eos, role markers and a chat template.

    Byte-level: every string encodes (no unknown token). The vocabulary may come out smaller than
    `vocab_size` when the texts are few; use `len(tokenizer)` for the model's embedding size.
    """
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer needs at least one non-empty text")
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (256 bytes + special tokens)")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS.values()),
        padding_side="right",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _llama_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_positions: int,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _new_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    return model.eval()


def build_tiny_model(
    texts: Sequence[str],
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised tiny Llama and a tokenizer trained on `texts` (for tests; well under 2 s)."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    config = _llama_config(
        tokenizer, hidden_size, num_layers, num_heads, intermediate_size=2 * hidden_size, max_positions=512
    )
    return _new_model(config, seed), tokenizer


class OfflineModelConfig(Settings):
    """The offline default model and its brief pretraining (about 20 s CPU time, 45 s wall on a busy
    2-core box). The base_model asset's config inherits these fields (each is defined here once)."""

    vocab_size: int = Field(
        default=2048, ge=8, description="offline model: BPE vocabulary size (upper bound)"
    )
    hidden_size: int = Field(default=128, ge=1, description="offline model: residual width")
    num_layers: int = Field(default=4, ge=1, description="offline model: decoder blocks")
    num_heads: int = Field(default=4, ge=1, description="offline model: attention heads")
    intermediate_size: int = Field(default=344, ge=1, description="offline model: MLP width")
    max_positions: int = Field(default=512, ge=1, description="offline model: longest sequence, in tokens")
    steps: int = Field(default=150, ge=1, description="offline model: pretraining steps")
    seq_len: int = Field(default=128, ge=2, description="offline model: tokens per training window")
    batch_size: int = Field(default=8, ge=1, description="offline model: windows per step")
    learning_rate: float = Field(default=3e-3, gt=0, description="offline model: peak AdamW learning rate")
    warmup_steps: int = Field(default=10, ge=0, description="offline model: linear warm-up steps")
    weight_decay: float = Field(default=0.01, ge=0, description="offline model: AdamW weight decay")
    seed: int = Field(default=0, description="offline model: seed of initialisation and window sampling")


def new_offline_model(
    texts: Sequence[str], config: OfflineModelConfig | None = None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The offline model's tokenizer and architecture, randomly initialised (no pretraining): for
    benchmarks that need the default size but not its training."""
    config = config or OfflineModelConfig()
    tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size)
    model = _new_model(
        _llama_config(
            tokenizer,
            config.hidden_size,
            config.num_layers,
            config.num_heads,
            config.intermediate_size,
            config.max_positions,
        ),
        config.seed,
    )
    return model, tokenizer


def _token_stream(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> torch.Tensor:
    """All texts as one stream, each document `bos text eos`, for packed causal-LM blocks."""
    ids: list[int] = []
    for enc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.append(tokenizer.bos_token_id)
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def pretrain(
    model: LlamaForCausalLM,
    stream: torch.Tensor,
    config: OfflineModelConfig,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Causal-LM training on random windows of the token stream (seeded); returns the loss per step."""
    seq_len = min(config.seq_len, len(stream) - 1)
    if seq_len < 8:
        raise ValueError(f"too little text to pretrain on: {len(stream)} tokens")
    generator = torch.Generator().manual_seed(config.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
    )

    def lr_factor(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    offsets = torch.arange(seq_len + 1)
    losses: list[float] = []
    model.train()
    for step in range(config.steps):
        starts = torch.randint(0, len(stream) - seq_len, (config.batch_size,), generator=generator)
        batch = stream[starts[:, None] + offsets[None, :]]
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    model.eval()
    return losses


def build_offline_model(
    texts: Sequence[str],
    output_dir: str | os.PathLike[str],
    config: OfflineModelConfig | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train the tokenizer, build and pretrain the small Llama, save both to `output_dir` (safetensors).
    It runs in the caller's torch threads: the base_model asset sets `models.defaults.default_threads`, one
    for this model (on an oversubscribed machine two OpenMP threads spin and cost ~10x the CPU time per step
    for no gain in wall time).

    Returns stats: parameter count, shape, the loss per step, the final loss and the time taken.
    """
    config = config or OfflineModelConfig()
    started, cpu_started = time.perf_counter(), time.process_time()
    model, tokenizer = new_offline_model(texts, config)
    stream = _token_stream(tokenizer, texts)
    losses = pretrain(model, stream, config, progress)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    tail = losses[-10:]
    stats = {
        "source": "offline",
        "parameters": count_parameters(model),
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": len(tokenizer),
        "train_tokens": int(len(stream)),
        "losses": losses,
        "initial_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "config": config.model_dump(),
    }
    (output_dir / "pretraining.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
