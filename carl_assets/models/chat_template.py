"""One policy for tokenizers without a chat template (base models such as GPT-2 or Llama-3.1 base).

Dreams, SFT, GRPO and the agent all format conversations through `tokenizer.apply_chat_template`; TRL
requires `tokenizer.chat_template`. A base model has none, so `base_model` (and every loader) installs the
project's *transcript template* into the tokenizer, logs a warning and records it in the metadata:

    system: <content>\\n
    user: <content>\\n
    assistant: <content><eos>\\n
    assistant:                       <- the generation prompt

Every turn is `role: content` on its own line (what a base model has seen in web text); an assistant
turn ends with the eos token, so training teaches the model to stop and generation stops there. The
`{% generation %}` block marks the assistant's tokens for TRL's `assistant_only_loss`. A bos token is
prepended when the tokenizer adds one to plain text, so the template encodes a prompt exactly as
`tokenizer(transcript)` would. The alternative policy, `"fail"`, refuses such a model at once, naming
the fix (an instruct model, or a template set on the tokenizer).
"""

from __future__ import annotations

import logging
from typing import Any, Literal, get_args

logger = logging.getLogger(__name__)

# What to do with a tokenizer that has no chat template (a base model).
Policy = Literal["install", "fail"]
POLICIES: tuple[str, ...] = get_args(Policy)
GENERATION_PROMPT = "assistant:"  # what the transcript's generation prompt ends with


def transcript_template(add_bos: bool = False) -> str:
    """The transcript chat template (Jinja) described in the module docstring; `add_bos` prepends bos."""
    return (
        ("{{ bos_token }}" if add_bos else "") + "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}"
        "{{ 'assistant: ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
        "{% else %}"
        "{{ message['role'] + ': ' + message['content'] + '\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + GENERATION_PROMPT + "' }}{% endif %}"
    )


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts bos in front of plain text (Llama-style) or not (GPT-2 style)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def chat_template_for(tokenizer: Any) -> str:
    """The tokenizer's own chat template, or the transcript template fitted to it (bos or not).

    Use it as `apply_chat_template(..., chat_template=chat_template_for(tokenizer))` where a tokenizer
    may come from outside the project's loaders; loaded tokenizers already carry their template."""
    own = getattr(tokenizer, "chat_template", None)
    if own:
        return own
    return transcript_template(_adds_bos(tokenizer))


def ensure_chat_template(tokenizer: Any, policy: str = "install", name: str = "the model") -> str | None:
    """Apply the policy to a tokenizer: returns None when it has a chat template already, else installs
    the transcript template (`policy="install"`, with a logged warning) and returns the reason.

    Raises ValueError for `policy="fail"` (naming the fix) or an unknown policy."""
    if policy not in POLICIES:
        raise ValueError(f"chat-template policy must be one of {POLICIES}, got {policy!r}")
    if getattr(tokenizer, "chat_template", None):
        return None
    if policy == "fail":
        raise ValueError(
            f"{name} has no chat template: pass an instruct model (one with a chat template), set "
            "tokenizer.chat_template in its folder, or set missing_chat_template='install' to use "
            "the project's 'role: content' transcript template"
        )
    tokenizer.chat_template = chat_template_for(tokenizer)
    reason = (
        f"{name} has no chat template (a base model): installed the transcript template "
        f"('role: content' lines, assistant turns end with eos, generation prompt {GENERATION_PROMPT!r})"
    )
    logger.warning(reason)
    return reason


def ensure_pad_token(tokenizer: Any, name: str = "the model") -> str | None:
    """Give a tokenizer without a pad token one: its eos token, else its unk token (as GPT-2 is padded).

    Padding is always masked out (attention mask, label -100), so reusing eos changes no computation;
    a trained completion still ends with a real eos. Returns what was set (None when a pad token was
    there already). Raises ValueError when there is no eos or unk token to pad with."""
    if tokenizer.pad_token is not None:
        return None
    tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ValueError(f"tokenizer of {name} has no pad, eos or unk token to pad with")
    return f"pad token set to {tokenizer.pad_token!r} (the {'eos' if tokenizer.eos_token else 'unk'} token)"
