"""The coherence-gated agent: observe → generate → measure Phi → act or abstain (the reference's agent
step).

`agent_step` builds the reference's two messages (a system instruction, then the observation and the
instruction), generates (greedily, as the reference; or sampled with temperature and top-p / top-k /
min-p truncation: `carl_assets.carl.run_config.AgentSampling`, resolved for the model), and scores the
new tokens with the CARL maths. Alignment: the logits at position ``prompt_len - 1 + t`` are the
distribution that *predicted* new token t, so the scored slice is ``logits[prompt_len - 1 : -1]`` of one
forward pass over prompt + response (the reference's agent step does exactly this; its GRPO reward
function was one position off). The end-of-sequence token, when generated, is scored too, like in the
reference. If ``phi_mean`` is below the gate threshold (sigma = 3/16 by default) the agent abstains:
``response`` is None.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from carl_assets.carl.coherence import SIGMA, carl_reward, coherence_gate
from carl_assets.carl.run_config import GREEDY, AgentSampling
from carl_assets.carl.sft_data import SYSTEM_PROMPT, user_message
from carl_assets.models.chat_template import chat_template_for  # the one policy for template-less models
from carl_assets.models.loading import fit_prompt, model_max_positions

EVALUATION_COLUMNS = [
    "task_id",
    "node_id",
    "instruction",
    "expected",
    "response",
    "raw_response",
    "acted",
    "confidence",
    "phi_mean",
    "reward",
    "multiscale",
    "cloud_quality",
    "discontinuity",
    "n_tokens",
    "exact_match",
]


@dataclass
class AgentStep:
    response: str | None  # None when the agent abstained
    phi_mean: float
    confidence: str  # "high", "medium", "low" or "abstain"
    components: dict[str, float] = field(
        default_factory=dict
    )  # carl_reward's components ({} if nothing generated)
    reward: float = 0.0  # the CARL composite of the generated tokens
    raw_response: str = ""  # what was generated, even when the agent abstained
    n_tokens: int = 0

    @property
    def acted(self) -> bool:
        return self.response is not None


def _prompt_ids(tokenizer: Any, observation: str, instruction: str) -> list[int]:
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user_message(observation, instruction)},
    ]
    text = tokenizer.apply_chat_template(
        messages, chat_template=chat_template_for(tokenizer), tokenize=False, add_generation_prompt=True
    )
    # The template already holds any special tokens it wants; don't add a second bos.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def completion_logits(model: Any, full_ids: Any, prompt_len: int) -> np.ndarray:
    """Logits ``[n_new, V]`` (float64) at the positions that predict tokens ``prompt_len..`` of
    ``full_ids [1, T]``."""
    with torch.no_grad():
        logits = model(input_ids=full_ids, use_cache=False).logits[0, prompt_len - 1 : -1]
    return logits.detach().cpu().double().numpy()


def _generate(
    model: Any, input_ids: Any, max_new_tokens: int, pad_token_id: Any, sampling: AgentSampling
) -> Any:
    """`model.generate` as `sampling` says; a sampled answer draws from a seeded RNG that leaves the
    caller's torch RNG state as it was."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int(sampling.seed))
        return model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            **sampling.generate_kwargs(),
        )


def agent_step(
    model: Any,
    tokenizer: Any,
    observation: str,
    instruction: str,
    gate_threshold: float = SIGMA,
    *,
    max_new_tokens: int,
    sampling: AgentSampling = GREEDY,
) -> AgentStep:
    """One agent step: generate at most `max_new_tokens` (the caller's budget: the agent_evaluation asset's
    config, `carl agent --max-new-tokens`), greedy by default (`sampling` for temperature and top-p / top-k
    / min-p), measure its Phi on the model's own (untempered) logits, and act only when coherent."""
    device = next(model.parameters()).device
    limit = model_max_positions(model)
    if limit is not None:
        max_new_tokens = min(max_new_tokens, max(1, limit // 2))
    prompt = _prompt_ids(tokenizer, observation, instruction)
    if not prompt:
        raise ValueError("the prompt encodes to no tokens")
    prompt = fit_prompt(prompt, model, max_new_tokens)
    input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        output_ids = _generate(model, input_ids, max_new_tokens, tokenizer.pad_token_id, sampling)
        new_tokens = output_ids[0, len(prompt) :]
        raw = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        if len(new_tokens) > 0:
            logits = completion_logits(model, output_ids, len(prompt))
            n = min(logits.shape[0], len(new_tokens))
            reward, components = carl_reward(logits[:n], new_tokens[:n].cpu().numpy())
            phi_mean = float(components["phi_mean"])
        else:
            reward, components, phi_mean = 0.0, {}, 0.0
    finally:
        model.train(was_training)
    should_act, confidence = coherence_gate(phi_mean, gate_threshold)
    return AgentStep(
        response=raw if should_act else None,
        phi_mean=phi_mean,
        confidence=confidence,
        components={k: float(v) for k, v in components.items()},
        reward=float(reward),
        raw_response=raw,
        n_tokens=int(len(new_tokens)),
    )


def evaluate_agent(
    model: Any,
    tokenizer: Any,
    tasks: pd.DataFrame | Iterable[Mapping[str, Any]],
    gate_threshold: float = SIGMA,
    *,
    max_new_tokens: int,
    sampling: AgentSampling = GREEDY,
) -> pd.DataFrame:
    """`agent_step` on each task (`observation`, `instruction`, optional `task_id`, `node_id`, `expected`),
    task i sampled with seed ``sampling.seed + i`` when `sampling` samples.

    One row per task: the response (None when abstaining), what was generated, whether it acted, the
    confidence level, phi mean, the CARL reward and components, and whether the raw response equals
    the expected answer.
    """
    records = tasks.to_dict("records") if isinstance(tasks, pd.DataFrame) else [dict(t) for t in tasks]
    rows = []
    for i, task in enumerate(records):
        step = agent_step(
            model,
            tokenizer,
            str(task["observation"]),
            str(task["instruction"]),
            gate_threshold=gate_threshold,
            max_new_tokens=max_new_tokens,
            sampling=sampling.model_copy(update={"seed": sampling.seed + i}),
        )
        expected = task.get("expected")
        rows.append(
            {
                "task_id": task.get("task_id", i),
                "node_id": task.get("node_id", ""),
                "instruction": task["instruction"],
                "expected": expected,
                "response": step.response,
                "raw_response": step.raw_response,
                "acted": step.acted,
                "confidence": step.confidence,
                "phi_mean": step.phi_mean,
                "reward": step.reward,
                "multiscale": step.components.get("multiscale"),
                "cloud_quality": step.components.get("cloud_quality"),
                "discontinuity": step.components.get("discontinuity"),
                "n_tokens": step.n_tokens,
                "exact_match": bool(expected is not None and step.raw_response == str(expected).strip()),
            }
        )
    return pd.DataFrame(rows, columns=EVALUATION_COLUMNS)


def summarise_evaluation(evaluation: pd.DataFrame) -> dict[str, float]:
    """Act rate, mean reward and mean phi (over all tasks), and exact-match rate."""
    if evaluation.empty:
        return {"tasks": 0, "act_rate": 0.0, "mean_reward": 0.0, "mean_phi": 0.0, "exact_match_rate": 0.0}
    return {
        "tasks": int(len(evaluation)),
        "act_rate": float(evaluation["acted"].mean()),
        "mean_reward": float(evaluation["reward"].mean()),
        "mean_phi": float(evaluation["phi_mean"].mean()),
        "exact_match_rate": float(evaluation["exact_match"].mean()),
    }
