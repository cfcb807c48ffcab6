"""The emotion_tags asset: the user's tag lines, and a tagger's tags for nodes without one."""

from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource
from pydantic import Field

from carl_assets.carl.run_config import Placement
from carl_assets.defs.common import library_config, materialized, table_preview
from carl_assets.defs.resources import write_tables
from carl_assets.handles import AssetHandle, Checkpoint
from carl_assets.memory.taggers.lexicon import lexicon_categories
from carl_assets.memory.tagging import (
    Tagger,
    TaggerSettings,
    emotion_vocabulary,
    node_status,
    tag_counts,
    tag_nodes,
    taggable,
)
from carl_assets.models.defaults import resolve_placement, resolve_threads
from carl_assets.models.loading import load_model_and_tokenizer

TAGS_TABLE = "emotion_tags"
STATUS_TABLE = "emotion_tag_nodes"


class EmotionTagsConfig(dg.Config, TaggerSettings, Placement):
    """emotion_tags: which tagger and which emotions; `TaggerSettings`: the score cut, and how the model
    tagger reads and scores; `Placement`: where and how precisely the model tagger runs the base model."""

    tagger: Tagger = Field(
        default="lexicon",
        description="who tags nodes without a user tag line: 'lexicon' (default: Empath word counts, fast, "
        "no model), 'model' (the base model rates each emotion 0..10 from its answer log-probabilities: use "
        "a real instruct model; the offline 1M-parameter model cannot rate), or 'off' (user tags only). "
        "User tags always win: a tagger never touches a node that has a tag line.")
    emotions: list[str] = Field(
        default=[], description="emotions a tagger scores; empty = those the graph's user tags use, else the "
        "default list (carl_assets.memory.tagging.DEFAULT_EMOTIONS)")
    lexicon_categories: dict[str, list[str]] = Field(
        default={}, description="lexicon tagger: extra emotion -> Empath categories (e.g. "
        "{'curiosity': ['anticipation']}); the built-in map covers the common emotions")


def _load_policy(base_model: Checkpoint, config: EmotionTagsConfig) -> tuple[Any, Any]:
    """The base model and tokenizer of this run's base_model version, placed as the config says."""
    model_dir = base_model.file()
    device, dtype = resolve_placement(config.device, config.dtype, base_model.is_offline)
    return load_model_and_tokenizer(model_dir, device=device, dtype=dtype)


@dg.asset(
    group_name="memory",
    ins={"memory_graph": dg.AssetIn(), "base_model": dg.AssetIn()},
    kinds={"duckdb"},
    description="Emotion tags for every node (table emotion_tags: node_id, emotion, score 0..10, source "
    "user/model/lexicon, raw_score): the user's tag lines, and for nodes without one (not stubs, not empty) "
    "the tags of the configured tagger, the reference's 'subconscious agents'. User tags always win. Table "
    "emotion_tag_nodes says per node whether it was user-tagged, tagged, read with nothing found, or "
    "skipped. base_model is an input for the 'model' tagger (which reads it); the other taggers never open "
    "it, and their tags, hence the data version, do not change with it.",
)
def emotion_tags(context: dg.AssetExecutionContext, config: EmotionTagsConfig, duckdb: DuckDBResource,
                 memory_graph: AssetHandle, base_model: Checkpoint) -> dg.MaterializeResult:
    nodes = memory_graph.read("memory_nodes")
    emotions = emotion_vocabulary(nodes, config.emotions)
    model = tokenizer = None
    extra: dict[str, object] = {}
    if config.tagger == "model" and taggable(nodes).any():
        model, tokenizer = _load_policy(base_model, config)
        extra["model"] = str(base_model.path)
        extra["base_model_version"] = str(base_model.version)
    if config.tagger == "lexicon":
        covered = lexicon_categories(emotions, config.lexicon_categories)
        extra["lexicon_categories"] = dg.MetadataValue.json({k: list(v) for k, v in covered.items()})
        extra["uncovered_emotions"] = dg.MetadataValue.json([e for e in emotions if e not in covered])

    def progress(done: int, total: int) -> None:
        if done == total or done % (config.batch_size * 20) == 0:
            context.log.info(f"model tagger: {done}/{total} prompts")

    threads = None if model is None else resolve_threads(config.threads, base_model.is_offline)
    tags = tag_nodes(nodes, config.tagger, emotions, library_config(config, TaggerSettings),
                     lexicon_map=config.lexicon_categories, model=model, tokenizer=tokenizer,
                     threads=threads, progress=progress)
    # The tagger beside each node's status: emotion_training_pairs reads it from here (this run's tables),
    # not from the latest materialization's metadata (which may be another run's).
    status = node_status(nodes, tags, config.tagger).assign(tagger=config.tagger)
    write_tables(duckdb, {TAGS_TABLE: tags, STATUS_TABLE: status})
    counts = tag_counts(tags)
    by_source = {s: int(n) for s, n in tags["source"].value_counts().items()}
    by_status = {s: int(n) for s, n in status["status"].value_counts().items()}
    context.log.info(f"{len(tags)} tags ({by_source}); nodes: {by_status}")
    return materialized(
        tags,
        config=config,
        tables={TAGS_TABLE: tags, STATUS_TABLE: status},
        metadata={
            "tagger": config.tagger,
            "emotions": dg.MetadataValue.json(emotions),
            "rows_by_source": dg.MetadataValue.json(by_source),
            "nodes_by_status": dg.MetadataValue.json(by_status),
            "rows_by_emotion": table_preview(counts, rows=len(counts) or 1),
            "preview": table_preview(tagged if len(tagged := tags[tags["source"] != "user"]) else tags),
            **extra,
        },
    )
