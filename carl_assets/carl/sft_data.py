"""Chat-format SFT examples and held-out agent tasks, built from the memory graph.

For now the SFT source is the memory graph itself (the dream loop will later supply its own
behavioural-cloning data; `build_sft_examples` is the default source, `sft_examples_from_records`
accepts any prompt/completion records). Each example asks a short question about one memory and
answers it with a short, templated, deterministic sentence derived from the node's emotion tags or its
kind. Short deterministic answers are what a 1M-parameter model can learn to reproduce exactly, which
is what lets SFT *crystallize* (token accuracy >= 0.99 on the answer tokens) within a CPU budget.

Examples are TRL "conversational prompt-completion" records: ``prompt`` is a list of messages
(system + user), ``completion`` one assistant message. With ``completion_only_loss`` the loss and
``mean_token_accuracy`` cover the answer tokens only.

Held-out agent tasks use nodes that are NOT in the SFT set: an observation (the memory excerpt) and an
instruction (the same kinds of question), with the expected answer for reference.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
from pydantic import Field, field_validator

from carl_assets.settings import Settings

SYSTEM_PROMPT = "You are a precise agent. Follow the instruction exactly."
FEELINGS_QUESTION = "Which feelings does this memory carry?"
KIND_QUESTION = "What kind of memory is this?"
TASKS = ("feelings", "kind")

KIND_ANSWERS = {
    "journal": "A journal entry.",
    "reflection": "A reflection.",
    "pattern": "A pattern I noticed.",
    "lesson": "A lesson I learned.",
    "digest": "A digest of entries.",
}

SFT_COLUMNS = [
    "example_id",
    "node_id",
    "task",
    "system",
    "user",
    "assistant",
    "prompt_json",
    "completion_json",
    "split",
]
TASK_COLUMNS = ["task_id", "node_id", "task", "observation", "instruction", "expected"]


class SFTDataConfig(Settings):
    """How templated examples are drawn from the graph (all deterministic given `seed`): the settings of
    the sft_dataset asset, whose config inherits this class (each is defined here only). Raises
    ValueError (pydantic's ValidationError) for an unknown task."""

    max_examples: int = Field(
        default=48,
        description="templates source: SFT examples (small: a tiny model must memorise them to crystallize)",
    )
    holdout_tasks: int = Field(default=12, description="agent tasks from memory nodes kept out of SFT")
    tasks: list[str] = Field(
        default=["feelings"], description="templated question kinds: 'feelings' and/or 'kind'"
    )
    excerpt_chars: int = Field(default=120, description="memory excerpt length in each templated prompt")
    seed: int = Field(default=0, description="which nodes go to templated SFT and which are held out")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        # A list of choices, not a Literal: Dagster config cannot hold a list of Literals.
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown SFT task(s) {sorted(unknown)}: choose from {', '.join(TASKS)}")
        return tasks


def excerpt(text: str, max_chars: int) -> str:
    """The start of `text`, at most `max_chars`, cut at a word boundary, on one line."""
    flat = " ".join(str(text).split())
    if len(flat) <= max_chars:
        return flat
    cut = flat[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip(" ,;:") + " ..."


def feelings_answer(tags: Mapping[str, int]) -> str | None:
    """ "Mostly warmth, then love." from the two strongest tags (ties broken by name); None without tags."""
    ranked = sorted(tags.items(), key=lambda kv: (-int(kv[1]), kv[0]))
    if not ranked:
        return None
    if len(ranked) == 1:
        return f"Only {ranked[0][0]}."
    return f"Mostly {ranked[0][0]}, then {ranked[1][0]}."


def kind_answer(kind: str) -> str | None:
    """The sample graph's kinds have their own sentence; any other kind (a user's `project`, `paper`...)
    is named as it is: "A project."."""
    kind = str(kind).strip().lower()
    return KIND_ANSWERS.get(kind) or (f"A {kind}." if kind else None)


def _answer(task: str, node: Mapping[str, Any]) -> str | None:
    if task == "feelings":
        tags = node.get("tags_json") or "{}"
        return feelings_answer(json.loads(tags) if isinstance(tags, str) else dict(tags))
    if task == "kind":
        return kind_answer(node.get("kind", ""))
    raise ValueError(f"unknown SFT task {task!r}: choose from {', '.join(TASKS)}")


def _question(task: str) -> str:
    return FEELINGS_QUESTION if task == "feelings" else KIND_QUESTION


def user_message(observation: str, instruction: str) -> str:
    """The reference agent's user turn: the observation, a blank line, then the instruction."""
    return f"{observation}\n\nInstruction: {instruction}"


def chat_prompt(observation: str, instruction: str) -> list[dict[str, str]]:
    """System + user messages, exactly as the agent step builds them (so SFT trains what the agent sees)."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user_message(observation, instruction)},
    ]


def _candidates(nodes: pd.DataFrame, tasks: Sequence[str], excerpt_chars: int) -> list[dict[str, Any]]:
    rows = []
    for node in nodes.to_dict("records"):
        observation = excerpt(node.get("text", ""), excerpt_chars)
        if not observation or node.get("is_stub") is True:  # a stub's text is only its name
            continue
        for task in tasks:
            answer = _answer(task, node)
            if answer:
                rows.append(
                    {
                        "node_id": str(node["node_id"]),
                        "task": task,
                        "observation": observation,
                        "instruction": _question(task),
                        "expected": answer,
                    }
                )
    return rows


def _split_nodes(candidates: list[dict[str, Any]], config: SFTDataConfig) -> tuple[list[dict], list[dict]]:
    """Shuffle nodes (seeded); the first ones give SFT examples, the next ones held-out tasks."""
    by_node: dict[str, list[dict[str, Any]]] = {}
    for row in candidates:
        by_node.setdefault(row["node_id"], []).append(row)
    node_ids = sorted(by_node)
    random.Random(config.seed).shuffle(node_ids)
    cap = config.max_examples
    if config.holdout_tasks > 0 and 2 <= len(candidates) < config.max_examples + config.holdout_tasks:
        # A small graph would give SFT every node and the agent no task: keep up to a quarter out
        # (at least 1).
        cap = min(cap, len(candidates) - max(1, min(config.holdout_tasks, len(candidates) // 4)))
    train: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    for node_id in node_ids:
        rows = by_node[node_id]
        if len(train) + len(rows) <= cap:
            train.extend(rows)
        elif len(held) < config.holdout_tasks:
            held.extend(rows[: config.holdout_tasks - len(held)])
        if len(train) >= cap and len(held) >= config.holdout_tasks:
            break
    return train, held


def _records_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    out = []
    for i, row in enumerate(rows):
        prompt = chat_prompt(row["observation"], row["instruction"])
        completion = [{"role": "assistant", "content": row["expected"]}]
        out.append(
            {
                "example_id": i,
                "node_id": row.get("node_id", ""),
                "task": row.get("task", "custom"),
                "system": prompt[0]["content"],
                "user": prompt[1]["content"],
                "assistant": row["expected"],
                "prompt_json": json.dumps(prompt),
                "completion_json": json.dumps(completion),
                "split": "train",
            }
        )
    return pd.DataFrame(out, columns=SFT_COLUMNS)


def build_sft_examples(
    nodes: pd.DataFrame, config: SFTDataConfig | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(SFT examples, held-out agent tasks) from memory nodes (`memory_nodes` columns). Stub nodes are
    left out; when the configured tasks give nothing (an untagged graph asked only about feelings), the
    `kind` task is used instead.

    SFT rows hold the messages both as text columns and as JSON (`prompt_json`, `completion_json`),
    which `to_hf_dataset` turns into TRL's conversational prompt-completion format.
    """
    config = config or SFTDataConfig()
    if config.max_examples < 1:
        raise ValueError("max_examples must be at least 1")
    candidates = _candidates(nodes, config.tasks, config.excerpt_chars)
    if not candidates and "kind" not in config.tasks:
        # An untagged graph: no node has feelings to ask about, every node has a kind (issue 13: the
        # agent evaluation goes on).
        candidates = _candidates(nodes, ("kind",), config.excerpt_chars)
    train, held = _split_nodes(candidates, config)
    tasks = pd.DataFrame(
        [{"task_id": i, **{k: row[k] for k in TASK_COLUMNS if k != "task_id"}} for i, row in enumerate(held)],
        columns=TASK_COLUMNS,
    )
    return _records_frame(train), tasks


def sft_examples_from_records(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """SFT rows from any records with `observation`, `instruction` and `expected` (e.g. a later dream
    loop)."""
    rows = [dict(r) for r in records]
    for row in rows:
        missing = {"observation", "instruction", "expected"} - set(row)
        if missing:
            raise ValueError(f"SFT record lacks {sorted(missing)}: {row}")
    return _records_frame(rows)


def to_hf_dataset(examples: pd.DataFrame):
    """A `datasets.Dataset` in TRL's conversational prompt-completion format (plus ids for reference)."""
    from datasets import Dataset  # 0.4 s to import; only the SFT step needs it

    return Dataset.from_dict(
        {
            "prompt": [json.loads(p) for p in examples["prompt_json"]],
            "completion": [json.loads(c) for c in examples["completion_json"]],
            "example_id": [int(i) for i in examples["example_id"]],
            "node_id": [str(n) for n in examples["node_id"]],
        }
    )


def is_chat_formatted(examples: pd.DataFrame) -> tuple[bool, str]:
    """Every row has a system+user prompt and one non-empty assistant completion; (ok, reason)."""
    if examples.empty:
        return False, "no SFT examples"
    for row in examples.itertuples(index=False):
        prompt = json.loads(row.prompt_json)
        completion = json.loads(row.completion_json)
        if [m.get("role") for m in prompt][-1:] != ["user"]:
            return False, f"example {row.example_id}: the prompt does not end with a user message"
        if (
            len(completion) != 1
            or completion[0].get("role") != "assistant"
            or not completion[0].get("content")
        ):
            return False, f"example {row.example_id}: the completion is not one non-empty assistant message"
    return True, f"{len(examples)} chat-formatted examples"
