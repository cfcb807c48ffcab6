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

A prompt is the memory first, the question last, so a node's prompts share their head: each batch of
texts runs its heads once (left-padded, explicit position ids from the attention mask, so padding
changes no row's numbers) into a KV cache, then each emotion's question (the same tokens for every
text) runs on a copy of that cache. Head and question are tokenized separately (`prompt_ids`).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from transformers import DynamicCache

from carl_assets.memory.graph import MAX_SCORE, MIN_SCORE
from carl_assets.models.loading import model_max_positions
from carl_assets.runtime import torch_threads

SCORES = list(range(MIN_SCORE, MAX_SCORE + 1))
# The score from the answer distribution over 0..10: its expected value (rounded) or its most likely answer.
Reduction = Literal["expected", "argmax"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
# The memory first, the question last: the question is fresh when the model answers, and a node's
# prompts share their head (one KV cache for all its emotions).
MEMORY_PART = "Memory: {text}\n\n"
QUESTION = (
    "On a scale from 0 (not at all) to 10 (very strongly), how strongly does this memory express "
    "{emotion}? Answer with one number from 0 to 10."
)
PLAIN_SUFFIX = "\nRating (0-10):"  # plain-text prompts end here; answers then start with a space
_SPLIT = "\u241eCARL-SPLIT\u241e"  # marks where the head ends in a rendered chat template


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


def _render(tokenizer: Any, message: str) -> str:
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    return message + PLAIN_SUFFIX


def prompt_pieces(tokenizer: Any, text: str, emotion: str) -> tuple[str, str]:
    """(head, question) strings of the rating prompt for one (text, emotion): the head holds the text
    and depends on it alone, the question (with the chat template's closing and generation prompt, or
    `PLAIN_SUFFIX`) on the emotion alone."""
    rendered = _render(tokenizer, MEMORY_PART.format(text=text) + _SPLIT + QUESTION.format(emotion=emotion))
    if rendered.count(_SPLIT) != 1:
        raise ValueError(
            f"the chat template of {type(tokenizer).__name__} does not keep the message as written"
        )
    head, question = rendered.split(_SPLIT)
    return head, question


def head_ids(tokenizer: Any, text: str) -> list[int]:
    # A chat template writes its own special tokens; a plain prompt gets the tokenizer's usual ones (BOS).
    head, _ = prompt_pieces(tokenizer, text, "calm")
    return list(tokenizer(head, add_special_tokens=not uses_chat_template(tokenizer))["input_ids"])


def question_ids(tokenizer: Any, emotion: str) -> list[int]:
    _, question = prompt_pieces(tokenizer, "", emotion)
    return list(tokenizer(question, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer: Any, text: str, emotion: str) -> list[int]:
    """The token ids the model reads for one (text, emotion), up to the answer: head, question, and
    the tokens every answer starts with (`ScoreTokens.prefix`)."""
    return head_ids(tokenizer, text) + question_ids(tokenizer, emotion) + list(score_tokens(tokenizer).prefix)


def score_tokens(tokenizer: Any) -> ScoreTokens:
    """Token ids of the answers "0".."10" after a prompt (" 0".." 10" after a plain one), found by
    encoding question + answer and removing the question's ids, so merges across the boundary are seen.

    Raises ValueError if an answer takes more than two tokens, or two answers share their ids."""
    _, probe = prompt_pieces(tokenizer, "A day.", "calm")
    base = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    space = "" if uses_chat_template(tokenizer) else " "
    tails = []
    for score in SCORES:
        full = list(tokenizer(probe + space + str(score), add_special_tokens=False)["input_ids"])
        tails.append(
            tuple(
                full[len(base) :]
                if full[: len(base)] == base
                else tokenizer(space + str(score), add_special_tokens=False)["input_ids"]
            )
        )
    shared = 0  # tokens every answer starts with: they belong to the prompt
    while all(len(t) > shared + 1 and t[shared] == tails[0][shared] for t in tails):
        shared += 1
    ids = [t[shared:] for t in tails]
    for score, tail in zip(SCORES, ids, strict=True):
        if not 1 <= len(tail) <= 2:
            raise ValueError(
                f"the tokenizer {type(tokenizer).__name__} writes the answer {score!r} as "
                f"{len(tail)} tokens {list(tail)} (after {shared} shared); the model tagger reads "
                "answers of one or two tokens"
            )
    if len(set(ids)) != len(ids):
        raise ValueError(f"the tokenizer gives two answers the same tokens: {ids}")
    return ScoreTokens(ids, tuple(tails[0][:shared]))


def answer_probabilities(
    first: torch.Tensor, second: dict[int, torch.Tensor], tokens: ScoreTokens
) -> np.ndarray:
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


def reduce_scores(probs: np.ndarray, reduction: str) -> tuple[np.ndarray, np.ndarray]:
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
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
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
        return DynamicCache(config=model.config)
    except TypeError:  # transformers before 4.56 builds it without the config
        return DynamicCache()


def _answer_step(
    model: Any, cache: Any, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Log-probabilities `[B, V]` (float32, CPU) at the last of `input_ids`, run on `cache` (which grows)."""
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        **_forward_keywords(model, cache),
    )
    return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1).cpu()


@torch.no_grad()
def _text_batch(
    model: Any, heads: list[list[int]], questions: list[list[int]], tokens: ScoreTokens, pad_id: int
) -> np.ndarray:
    """`[len(heads), len(questions), 11]` answer probabilities: the heads run once into a KV cache; each
    question runs on a copy of it, then one more step per first token of a two-token answer."""
    device = next(model.parameters()).device
    ids, mask, positions = _left_pad(heads, pad_id, device)
    cache = _new_cache(model)
    model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        **_forward_keywords(model, cache),
    )
    b, out = len(heads), np.zeros((len(heads), len(questions), len(SCORES)))
    for j, question in enumerate(questions):
        q = torch.tensor(question, dtype=torch.long, device=device).expand(b, -1)
        q_mask = torch.cat([mask, torch.ones_like(q)], dim=1)
        q_positions = positions[:, -1:] + 1 + torch.arange(q.shape[1], device=device)
        q_cache = copy.deepcopy(cache)
        first = _answer_step(model, q_cache, q, q_mask, q_positions)
        second, firsts = {}, tokens.firsts_of_pairs
        for k, t in enumerate(firsts):
            step_cache = copy.deepcopy(q_cache) if k < len(firsts) - 1 else q_cache
            second[t] = _answer_step(
                model,
                step_cache,
                torch.full((b, 1), t, dtype=torch.long, device=device),
                torch.cat([q_mask, torch.ones_like(q_mask[:, :1])], dim=1),
                q_positions[:, -1:] + 1,
            )
        out[:, j] = answer_probabilities(first, second, tokens)
    return out


def _fit_text(tokenizer: Any, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


def _text_budget(model: Any, tokenizer: Any, questions: list[list[int]], max_text_tokens: int) -> int:
    """Tokens a text may take so that head + the longest question + a two-token answer fit the model."""
    limit = model_max_positions(model)
    if limit is None:
        return max_text_tokens
    overhead = len(head_ids(tokenizer, "")) + max(len(q) for q in questions) + 4
    if limit - overhead < 1:
        raise ValueError(
            f"the rating prompt alone takes {overhead} tokens; the model holds {limit} positions"
        )
    return min(max_text_tokens, limit - overhead)


def model_probabilities(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    emotions: Sequence[str],
    *,
    batch_size: int,
    max_text_tokens: int,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """P(answer = s) for every text, emotion and score s in 0..10: `[len(texts), len(emotions), 11]`
    float64, each `[i, j, :]` summing to 1. `batch_size` texts share a forward pass (each with all its
    emotions); texts longer than `max_text_tokens` tokens (or than the model's positions allow) are cut.

    `threads`: torch intra-op threads for the forward passes (None: leave torch's setting).
    `progress(done, total)` counts texts. Raises ValueError for an empty `emotions`, a bad batch size,
    or answers the tokenizer writes in more than two tokens."""
    if not emotions:
        raise ValueError("model_probabilities needs at least one emotion")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if not texts:
        return np.zeros((0, len(emotions), len(SCORES)))
    tokens = score_tokens(tokenizer)
    questions = [question_ids(tokenizer, e) + list(tokens.prefix) for e in emotions]
    budget = _text_budget(model, tokenizer, questions, max_text_tokens)
    heads = [head_ids(tokenizer, _fit_text(tokenizer, t, budget)) for t in texts]
    order = sorted(range(len(heads)), key=lambda i: len(heads[i]))  # similar lengths batch with less padding
    probs = np.zeros((len(texts), len(emotions), len(SCORES)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch_threads(threads):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            probs[chunk] = _text_batch(model, [heads[i] for i in chunk], questions, tokens, pad_id)
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    return probs
