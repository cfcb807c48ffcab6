"""bench/real_model.py's SFT step: ours (`train_sft`) and a plain `transformers.Trainer` on the same
pre-tokenized batch, each timed per optimizer step by a callback."""

from __future__ import annotations

import tempfile
import time

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from carl_assets.carl.training import SFTRunConfig, train_sft
from carl_assets.dreams.generation import encode_prompt


def sft_batch(
    tokenizer, prompts, texts: list[str], length: int, completion_tokens: int
) -> dict[str, list[list[int]]]:
    """Fixed-length examples (no padding, so every token counted is computed): the last
    `length - completion_tokens` prompt ids and `completion_tokens` ids of a memory text."""
    rows, masks = [], []
    for prompt, text in zip(prompts, texts, strict=True):
        prompt_ids = encode_prompt(tokenizer, prompt)[-(length - completion_tokens) :]
        completion = tokenizer(text, add_special_tokens=False)["input_ids"][:completion_tokens]
        while len(prompt_ids) + len(completion) < length:  # a short prompt: a longer completion
            completion = completion + completion[: length - len(prompt_ids) - len(completion)]
        rows.append(prompt_ids + completion)
        masks.append([0] * len(prompt_ids) + [1] * len(completion))
    return {"input_ids": rows, "completion_mask": masks}


class StepTimer(TrainerCallback):
    """Wall and CPU seconds of each optimizer step (step begin to step end)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.cpu: list[float] = []
        self._start = self._start_cpu = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start, self._start_cpu = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)
        self.cpu.append(time.process_time() - self._start_cpu)


def first_loss(history: list[dict]) -> float:
    return float(next(r["loss"] for r in history if r.get("loss") is not None))


def sft_ours(model, tokenizer, batch, dtype_name: str, steps: int, lr: float, threads: int):
    timer = StepTimer()
    # every setting the baseline's Trainer gets, given explicitly (none left to a model default)
    config = SFTRunConfig(
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        batch_size=len(batch["input_ids"]),
        gradient_accumulation_steps=1,
        gradient_checkpointing=False,
        max_length=len(batch["input_ids"][0]),
        dtype=dtype_name,
        device="cpu",
        threads=threads,
        gate_threshold=2.0,  # the gate never fires: every step runs
        completion_only_loss=True,
    )  # TRL infers it only for prompt/completion columns
    outcome = train_sft(model, tokenizer, Dataset.from_dict(batch), None, config, extra_callbacks=[timer])
    return timer, first_loss(outcome.log_history)


def sft_baseline(model, tokenizer, batch, dtype_name: str, steps: int, lr: float):
    labels = [
        [t if m else -100 for t, m in zip(ids, mask, strict=True)]
        for ids, mask in zip(batch["input_ids"], batch["completion_mask"], strict=True)
    ]
    data = Dataset.from_dict({"input_ids": batch["input_ids"], "labels": labels})

    def collate(rows):
        return {
            "input_ids": torch.tensor([r["input_ids"] for r in rows]),
            "labels": torch.tensor([r["labels"] for r in rows]),
        }

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=steps,
            learning_rate=lr,
            lr_scheduler_type="constant",
            per_device_train_batch_size=len(data),
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=dtype_name == "bf16",
            disable_tqdm=True,
            seed=0,
            optim="adamw_torch",
            weight_decay=0.0,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[timer]
        )
        trainer.train()
    return timer, first_loss(trainer.state.log_history)
