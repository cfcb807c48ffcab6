"""The model tagger: the policy model rates each (node, emotion) under a rating prompt.

For each (text, emotion) the model reads a prompt asking how strongly the text expresses the emotion
on a 0..10 scale (through the tokenizer's chat template when it has one, as plain text otherwise),
and the probability of each answer "0".."10" is read from its log-probabilities at the answer
position (G-Eval style: Liu et al. 2023, "G-Eval: NLG Evaluation using GPT-4 with Better Human
Alignment"), renormalised over the eleven answers. The score is the expected value of that
distribution (`reduction="expected"`, the default: it keeps the model's uncertainty, and ranks texts
more finely than the argmax) or its argmax (`reduction="argmax"`), rounded half up.

An answer may be two tokens ("10" is "1" then "0" for tokenizers that split digits): its probability
is P(first) * P(second | first), read from a second one-token step on the first pass's KV cache, and
the one-token answer that is its prefix keeps only the rest of its mass, P("1") * (1 - P("0" | "1")).
Longer answers are refused with an error naming the tokenizer.

Batches are left-padded (the last position is then the answer position for every row) with explicit
position ids from the attention mask, so padding changes no row's numbers.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from carl_assets.memory.graph import MAX_SCORE, MIN_SCORE
from carl_assets.models.loading import model_max_positions
from carl_assets.runtime import torch_threads

SCORES = list(range(MIN_SCORE, MAX_SCORE + 1))
REDUCTIONS = ("expected", "argmax")
RATING_INSTRUCTION = (
    "Rate how strongly the following memory expresses the emotion '{emotion}', from 0 (not at all) "
    "to 10 (very strongly).\n\nMemory: {text}\n\nAnswer with one number from 0 to 10."
)
PLAIN_SUFFIX = "\nRating (0-10):"  # plain-text prompts end here; answers then start with a space


@dataclass(frozen=True)
class ScoreTokens:
    """The token ids of each answer 0..10 as it follows the prompt (one or two tokens each), after
    `prefix`: tokens every answer starts with (a byte-level space), which are appended to the prompt."""

    ids: list[tuple[int, ...]]
    prefix: tuple[int, ...] = ()

    @property
    def firsts_of_pairs(self) -> list[int]:
        """Distinct first tokens of the two-token answers (each needs one more step)."""
        return sorted({ids[0] for ids in self.ids if len(ids) == 2})


def uses_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def rating_prompt(tokenizer: Any, text: str, emotion: str) -> str:
    """The prompt string for one (text, emotion): chat template with a generation prompt if the
    tokenizer has one, else the instruction followed by `PLAIN_SUFFIX`."""
    message = RATING_INSTRUCTION.format(emotion=emotion, text=text)
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
    return message + PLAIN_SUFFIX


def _encode(tokenizer: Any, prompt: str) -> list[int]:
    # A chat template writes its own special tokens; a plain prompt gets the tokenizer's usual ones (BOS).
    return list(tokenizer(prompt, add_special_tokens=not uses_chat_template(tokenizer))["input_ids"])


def score_tokens(tokenizer: Any) -> ScoreTokens:
    """Token ids of the answers "0".."10" after a prompt (" 0".." 10" after a plain one), found by
    encoding prompt + answer and removing the prompt's ids, so merges across the boundary are seen.

    Raises ValueError if an answer takes more than two tokens, or two answers share their ids."""
    probe = rating_prompt(tokenizer, "A day.", "calm")
    base = _encode(tokenizer, probe)
    space = "" if uses_chat_template(tokenizer) else " "
    tails = []
    for score in SCORES:
        full = _encode(tokenizer, probe + space + str(score))
        tails.append(tuple(full[len(base):] if full[:len(base)] == base else
                           tokenizer(space + str(score), add_special_tokens=False)["input_ids"]))
    shared = 0  # tokens every answer starts with: they belong to the prompt
    while all(len(t) > shared + 1 and t[shared] == tails[0][shared] for t in tails):
        shared += 1
    ids = [t[shared:] for t in tails]
    for score, tail in zip(SCORES, ids, strict=True):
        if not 1 <= len(tail) <= 2:
            raise ValueError(f"the tokenizer {type(tokenizer).__name__} writes the answer {score!r} as "
                             f"{len(tail)} tokens {list(tail)} (after {shared} shared); the model tagger reads "
                             "answers of one or two tokens")
    if len(set(ids)) != len(ids):
        raise ValueError(f"the tokenizer gives two answers the same tokens: {ids}")
    return ScoreTokens(ids, tuple(tails[0][:shared]))


def answer_probabilities(first: torch.Tensor, second: dict[int, torch.Tensor], tokens: ScoreTokens) -> np.ndarray:
    """P(answer) for 0..10, `[B, 11]` float64, each row summing to 1.

    `first`: `[B, V]` log-probabilities at the answer position; `second[t]`: `[B, V]` log-probabilities
    after the answer's first token `t` (only for the first tokens of two-token answers)."""
    p1 = first.double().exp()
    p2 = {t: lp.double().exp() for t, lp in second.items()}
    columns = []
    for ids in tokens.ids:
        if len(ids) == 2:
            columns.append(p1[:, ids[0]] * p2[ids[0]][:, ids[1]])
            continue
        (t,) = ids
        continued = [other[1] for other in tokens.ids if len(other) == 2 and other[0] == t]
        rest = 1.0 - p2[t][:, continued].sum(dim=1) if continued else torch.ones_like(p1[:, t])
        columns.append(p1[:, t] * rest.clamp(min=0.0))
    mass = torch.stack(columns, dim=1)
    total = mass.sum(dim=1, keepdim=True)
    # All mass elsewhere (underflow): a uniform answer rather than a division by zero.
    probs = torch.where(total > 0, mass / total.clamp(min=1e-300), torch.full_like(mass, 1.0 / mass.shape[1]))
    return probs.numpy()


def reduce_scores(probs: np.ndarray, reduction: str = "expected") -> tuple[np.ndarray, np.ndarray]:
    """(integer scores `[B]`, raw scores `[B]` float) from `[B, 11]` answer probabilities: the expected
    value (raw) rounded half up, or the argmax (raw = the expected value still, for ranking)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, not {reduction!r}")
    expected = probs @ np.asarray(SCORES, dtype=np.float64)
    if reduction == "argmax":
        return np.asarray(SCORES)[probs.argmax(axis=1)].astype(int), expected
    return np.floor(expected + 0.5).astype(int), expected


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _forward_keywords(model: Any, cache: Any) -> dict[str, Any]:
    """The cache under the name this transformers version takes (`cache` in 5.x, else
    `past_key_values`), and `logits_to_keep=1` where supported (only the last position is read)."""
    params = inspect.signature(model.forward).parameters
    out = {"cache" if "cache" in params else "past_key_values": cache} if cache is not None else {}
    if "logits_to_keep" in params:
        out["logits_to_keep"] = 1
    return out


def _new_cache(model: Any) -> Any:
    try:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    except (ImportError, TypeError):  # an older transformers: the model makes its own
        return None


@torch.no_grad()
def _batch_probabilities(model: Any, rows: list[list[int]], tokens: ScoreTokens, pad_id: int) -> np.ndarray:
    device = next(model.parameters()).device
    ids, mask, positions = _left_pad(rows, pad_id, device)
    firsts = tokens.firsts_of_pairs
    cache = _new_cache(model) if firsts else None
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=bool(firsts),
                **_forward_keywords(model, cache))
    first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1).cpu()
    cache = cache if cache is not None else getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    second = {}
    for k, t in enumerate(firsts):
        # One more step on the prompt's cache; a copy when another first token still needs the original.
        step_cache = copy.deepcopy(cache) if k < len(firsts) - 1 else cache
        step = model(input_ids=torch.full((len(rows), 1), t, dtype=torch.long, device=device),
                     attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1),
                     position_ids=positions[:, -1:] + 1, use_cache=True, **_forward_keywords(model, step_cache))
        second[t] = torch.log_softmax(step.logits[:, -1, :].float(), dim=-1).cpu()
    return answer_probabilities(first, second, tokens)


def _fit_text(tokenizer: Any, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


def _prompt_ids(model: Any, tokenizer: Any, texts: Sequence[str], emotions: Sequence[str],
                max_text_tokens: int) -> list[list[int]]:
    """Encoded prompts, text-major (row i * len(emotions) + j = text i, emotion j), each text cut so
    that prompt + a two-token answer fits the model's position table."""
    limit = model_max_positions(model)
    overhead = max(len(_encode(tokenizer, rating_prompt(tokenizer, "", e))) for e in emotions) + 4
    budget = max_text_tokens if limit is None else min(max_text_tokens, limit - overhead)
    if budget < 1:
        raise ValueError(f"the rating prompt alone takes {overhead} tokens; the model holds {limit} positions")
    rows = []
    for text in texts:
        fitted = _fit_text(tokenizer, text, budget)
        rows += [_encode(tokenizer, rating_prompt(tokenizer, fitted, e)) for e in emotions]
    return rows


def model_probabilities(model: Any, tokenizer: Any, texts: Sequence[str], emotions: Sequence[str],
                        batch_size: int = 16, max_text_tokens: int = 256, threads: int | None = None,
                        progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """P(answer = s) for every text, emotion and score s in 0..10: `[len(texts), len(emotions), 11]`
    float64, each `[i, j, :]` summing to 1. Texts longer than `max_text_tokens` tokens are cut.

    `threads`: torch intra-op threads for the forward passes (None: leave torch's setting).
    Raises ValueError for an empty `emotions`, a bad batch size, or answers the tokenizer writes in
    more than two tokens."""
    if not emotions:
        raise ValueError("model_probabilities needs at least one emotion")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if not texts:
        return np.zeros((0, len(emotions), len(SCORES)))
    tokens = score_tokens(tokenizer)
    rows = [row + list(tokens.prefix) for row in _prompt_ids(model, tokenizer, texts, emotions, max_text_tokens)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths batch with less padding
    probs = np.zeros((len(rows), len(SCORES)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch_threads(threads):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            probs[chunk] = _batch_probabilities(model, [rows[i] for i in chunk], tokens, pad_id)
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    return probs.reshape(len(texts), len(emotions), len(SCORES))


def expected_score(probs: np.ndarray) -> float:
    """Σ s · P(s) over s = 0..10 for one distribution (a convenience for tests and reports)."""
    return float(math.fsum(s * p for s, p in zip(SCORES, probs, strict=True)))
