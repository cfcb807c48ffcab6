"""Decoding dreams: the model's own responses to scenario prompts, batched.

`generate_responses` left-pads a batch of chat prompts and draws `k` samples of each in one
`generate` call (`num_return_sequences=k`); `generate_one_at_a_time` is the naive path (one prompt,
one sample per call) kept as the benchmark's baseline and the tests' reference. Both return the exact
token ids of prompt and completion, which the scorers re-use (no re-tokenisation of decoded text).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from carl_assets.models.chat_template import chat_template_for
from carl_assets.models.loading import fit_prompt


@dataclass(frozen=True)
class Sampling:
    """Truncation of each next-token distribution before a token is drawn (after the temperature, as
    Hugging Face `generate` applies them): `top_k` keeps the k likeliest tokens (0: off), `top_p` the
    smallest set whose probability reaches p (nucleus sampling, Holtzman et al. 2020; 1.0: off), `min_p`
    the tokens at least `min_p` times as likely as the likeliest (Nguyen et al. 2024; 0.0: off).

    The default truncates nothing (plain temperature sampling, what the offline model is tuned to). Over
    a real model's ~50k-token vocabulary an untruncated tail at temperature >= 1 is word salad; top-p 0.9
    with min-p 0.05 keeps it readable (see `carl_assets.models.defaults.dream_sampling_defaults`).
    Raises ``ValueError`` on values outside those ranges.
    """

    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1] (1.0: off), got {self.top_p!r}")
        if not 0.0 <= float(self.min_p) < 1.0:
            raise ValueError(f"min_p must lie in [0, 1) (0.0: off), got {self.min_p!r}")

    def generate_kwargs(self) -> dict[str, Any]:
        """`generate` keywords that set every truncation explicitly (the model's generation_config may
        carry its own top-k/top-p defaults, which must not leak in)."""
        kwargs: dict[str, Any] = {"top_k": int(self.top_k), "top_p": float(self.top_p)}
        if self.min_p > 0:
            kwargs["min_p"] = float(self.min_p)
        return kwargs


NO_TRUNCATION = Sampling()


@dataclass
class GeneratedResponse:
    """One sampled response: which prompt and sample it is, its text, and its token ids (the completion
    ends at EOS when the model produced one, and holds no padding)."""

    prompt_index: int
    sample_index: int
    text: str
    prompt_ids: list[int]
    completion_ids: list[int]
    finished: bool = False  # the completion ended with an EOS token


def pad_and_eos_ids(model: Any, tokenizer: Any) -> tuple[int, set[int]]:
    """(pad id, EOS ids). Tokenizers without a pad token (GPT-2 style) pad with EOS: padding is masked
    out, and a completion is cut at its first EOS anyway."""
    eos: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, (list, tuple)):
            eos.update(int(v) for v in value)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = min(eos) if eos else 0
    return int(pad), eos


def encode_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a chat prompt with the generation prompt appended, through the tokenizer's chat
    template; a tokenizer without one (not loaded by the project's loaders, which install it) gets the
    transcript template (`carl_assets.models.chat_template`), as SFT and GRPO will."""
    encoded = tokenizer.apply_chat_template(list(messages), chat_template=chat_template_for(tokenizer),
                                            add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = encoded["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    ids = [int(i) for i in ids]
    if not ids:  # generation needs at least one token of context
        start = getattr(tokenizer, "bos_token_id", None)
        if start is None:
            start = getattr(tokenizer, "eos_token_id", None)
        if start is None:
            raise ValueError("the prompt encodes to no tokens and the tokenizer has no bos/eos to start from")
        ids = [int(start)]
    return ids


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def _cut(tokens: Sequence[int], eos: set[int]) -> tuple[list[int], bool]:
    """The completion up to and including its first EOS (what follows is padding)."""
    out = []
    for token in tokens:
        out.append(int(token))
        if token in eos:
            return out, True
    return out, False


def _sampling_kwargs(temperature: float, k: int, sampling: Sampling = NO_TRUNCATION) -> dict[str, Any]:
    if temperature <= 0:  # greedy: k > 1 repeats the rows, and the duplicates are expected
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(temperature), **sampling.generate_kwargs()}


def _run_generate(model: Any, tokenizer: Any, prompt_rows: Sequence[Sequence[int]], k: int,
                  temperature: float, max_new_tokens: int, min_new_tokens: int | None, seed: int,
                  sampling: Sampling = NO_TRUNCATION) -> list[list[list[int]]]:
    """Completions (cut at EOS) of each prompt row, `k` each, from one `generate` call."""
    pad_id, eos = pad_and_eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    rows = [list(r) for r in prompt_rows]
    kwargs = _sampling_kwargs(temperature, k, sampling)
    input_ids, mask = _left_pad(rows, pad_id, device)
    extra: dict[str, Any] = {}
    if min_new_tokens:
        extra["min_new_tokens"] = int(min_new_tokens)
    if eos:
        extra["eos_token_id"] = sorted(eos)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.no_grad():
        torch.manual_seed(seed)  # a seeded, private RNG stream: the caller's global state is untouched
        cache = _shared_prompt_cache(model, input_ids, mask, k) if k > 1 else None
        if cache is not None:
            # The k samples of a prompt share its prefilled cache: the prompt runs once, not k times.
            extra[_cache_keyword(model)] = cache
        if cache is not None or temperature <= 0:  # greedy cannot return k sequences: repeat the rows
            input_ids, mask = input_ids.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0)
        elif k > 1:
            kwargs["num_return_sequences"] = k
        output = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=int(max_new_tokens),
                                pad_token_id=pad_id, **kwargs, **extra)
    new_tokens = output[:, input_ids.shape[1]:].tolist()
    return [[_cut(new_tokens[i * k + j], eos)[0] for j in range(k)] for i in range(len(prompt_rows))]


def _shared_prompt_cache(model: Any, input_ids: torch.Tensor, mask: torch.Tensor, k: int) -> Any:
    """The KV cache of every prompt but its last token, computed once per prompt and repeated k times, or
    None when the model cannot take a prefilled cache (then `generate` prefills each copy itself).

    `generate` then runs only the last prompt token and the new ones. Positions follow the attention
    mask (left padding), as `generate` numbers them.
    """
    if input_ids.shape[1] < 2 or not getattr(model, "_supports_cache_class", True):
        return None
    try:
        cache = DynamicCache(config=model.config)
        head, head_mask = input_ids[:, :-1], mask[:, :-1]
        positions = (head_mask.long().cumsum(dim=-1) - 1).masked_fill(head_mask == 0, 1)
        model(input_ids=head, attention_mask=head_mask, position_ids=positions, use_cache=True,
              logits_to_keep=1, **{_cache_keyword(model): cache})
        cache.batch_repeat_interleave(k)
    except (TypeError, ValueError, AttributeError, NotImplementedError):
        return None
    return cache


def _cache_keyword(model: Any) -> str:
    """transformers renamed `past_key_values` to `cache` (5.x); use whichever this version's model takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class BatchCache:
    """Generated batches kept on disk as they are made (`batch-<n>.json`, each written whole), so a run
    killed part-way reuses them when started again and generates only the rest.

    A file is reused only when it was made from the same prompt token ids with the same seed and
    sampling settings (else it is generated again and overwritten): each batch draws from its own RNG
    stream, so a reused batch is exactly what generating it again would give. `reused` and `generated`
    count the batches of this process.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.reused = 0
        self.generated = 0

    def _file(self, batch: int) -> Path:
        return self.folder / f"batch-{batch:05d}.json"

    def load(self, batch: int, key: dict[str, Any]) -> list[GeneratedResponse] | None:
        try:
            stored = json.loads(self._file(batch).read_text())
        except (OSError, ValueError):
            return None
        if stored.get("key") != key:
            return None
        self.reused += 1
        return [GeneratedResponse(**r) for r in stored["responses"]]

    def save(self, batch: int, key: dict[str, Any], responses: Sequence[GeneratedResponse]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{self._file(batch).name}.tmp"
        tmp.write_text(json.dumps({"key": key, "responses": [asdict(r) for r in responses]}))
        os.replace(tmp, self._file(batch))  # a kill mid-write leaves no half batch behind
        self.generated += 1


def _check(prompts: Sequence[Any], k: int, max_new_tokens: int, batch_size: int) -> None:
    if k < 1:
        raise ValueError(f"k (responses per prompt) must be >= 1, got {k}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _responses(tokenizer: Any, prompt_index: int, prompt_ids: list[int], completions: list[list[int]],
               eos: set[int]) -> list[GeneratedResponse]:
    out = []
    for j, completion in enumerate(completions):
        text = tokenizer.decode(completion, skip_special_tokens=True).strip()
        out.append(GeneratedResponse(prompt_index, j, text, list(prompt_ids), completion,
                                     finished=bool(completion) and completion[-1] in eos))
    return out


def generate_responses(model: Any, tokenizer: Any, prompts: Sequence[Sequence[dict[str, str]]], k: int,
                       temperature: float, max_new_tokens: int, batch_size: int = 8, seed: int = 0,
                       min_new_tokens: int | None = None,
                       progress: Callable[[int, int], None] | None = None,
                       cache: BatchCache | None = None,
                       sampling: Sampling = NO_TRUNCATION) -> list[GeneratedResponse]:
    """`k` responses to each chat prompt, `batch_size` prompts (so `batch_size * k` sequences) per
    `generate` call, left-padded, ordered by (prompt_index, sample_index). With a `cache`, batches it
    already holds are reused and new ones are stored as soon as they are made.

    Sampling draws at `temperature` from each distribution truncated by `sampling` (default: no
    truncation, plain temperature sampling); `temperature <= 0` decodes greedily (then the `k` samples
    are identical). Each batch draws from its own seeded RNG stream (`seed`, batch
    number), so results are deterministic and the global torch RNG is left as it was. `min_new_tokens`
    suppresses EOS until that many tokens exist (the benchmark fixes token counts with it). The model
    runs in eval mode under no_grad; its train/eval mode is restored. `progress(done, total)` counts
    prompts.
    """
    _check(prompts, k, max_new_tokens, batch_size)
    encoded = [fit_prompt(encode_prompt(tokenizer, p), model, max_new_tokens) for p in prompts]
    _, eos = pad_and_eos_ids(model, tokenizer)
    out: list[GeneratedResponse] = []
    was_training = model.training
    model.eval()
    try:
        for b, start in enumerate(range(0, len(encoded), batch_size)):
            rows = encoded[start: start + batch_size]
            key = {"rows": rows, "start": start, "k": k, "temperature": float(temperature),
                   "max_new_tokens": int(max_new_tokens), "min_new_tokens": min_new_tokens,
                   "seed": _stream_seed(seed, b)}
            if sampling != NO_TRUNCATION:  # (kept out when off, so earlier caches stay valid)
                key["sampling"] = asdict(sampling)
            batch = cache.load(b, key) if cache is not None else None
            if batch is None:
                completions = _run_generate(model, tokenizer, rows, k, temperature, max_new_tokens,
                                            min_new_tokens, seed=_stream_seed(seed, b), sampling=sampling)
                batch = []
                for offset, (ids, comps) in enumerate(zip(rows, completions, strict=True)):
                    batch.extend(_responses(tokenizer, start + offset, ids, comps, eos))
                if cache is not None:
                    cache.save(b, key, batch)
            out.extend(batch)
            if progress is not None:
                progress(min(start + batch_size, len(encoded)), len(encoded))
    finally:
        model.train(was_training)
    return out


def generate_one_at_a_time(model: Any, tokenizer: Any, prompts: Sequence[Sequence[dict[str, str]]], k: int,
                           temperature: float, max_new_tokens: int, batch_size: int = 8, seed: int = 0,
                           min_new_tokens: int | None = None,
                           progress: Callable[[int, int], None] | None = None,
                           sampling: Sampling = NO_TRUNCATION) -> list[GeneratedResponse]:
    """The naive path: one prompt and one sample per `generate` call (`batch_size` is ignored). Same
    output layout as `generate_responses`; under greedy decoding, the same tokens."""
    _check(prompts, k, max_new_tokens, batch_size)
    _, eos = pad_and_eos_ids(model, tokenizer)
    out: list[GeneratedResponse] = []
    was_training = model.training
    model.eval()
    try:
        for i, prompt in enumerate(prompts):
            ids = fit_prompt(encode_prompt(tokenizer, prompt), model, max_new_tokens)
            for j in range(k):
                [[completion]] = _run_generate(model, tokenizer, [ids], 1, temperature, max_new_tokens,
                                               min_new_tokens, seed=_stream_seed(seed, i * k + j),
                                               sampling=sampling)
                response = _responses(tokenizer, i, ids, [completion], eos)[0]
                response.sample_index = j
                out.append(response)
            if progress is not None:
                progress(i + 1, len(prompts))
    finally:
        model.train(was_training)
    return out


def _stream_seed(seed: int, index: int) -> int:
    """A distinct 63-bit seed per (seed, batch) pair."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(2, np.uint64)
    return int(state[0] >> 1)
