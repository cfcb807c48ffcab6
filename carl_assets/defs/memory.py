"""The memory group: the memory graph from its source, and the (emotion, polarity, text) pairs."""

import json
from typing import Any

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource
from pydantic import Field

from carl_assets.defs.common import materialized, table_preview
from carl_assets.defs.resources import MemorySource, read_table, write_tables
from carl_assets.memory.fingerprint import SourceFingerprint, source_fingerprint
from carl_assets.memory.graph import (
    EMOTION_NAME,
    MAX_SCORE,
    MIN_SCORE,
    extract_training_pairs,
    graph_from_tables,
    load_graph,
    pair_counts,
    parse_tags,
)
from carl_assets.plotting import figure_png, plt


class MemoryGraphConfig(dg.Config):
    source: str = Field(
        default="",
        description="Override the memory source for this run only. Empty (default): the project's source, "
        "$CARL_MEMORY_SOURCE (the memory_source resource). Else 'sample' (built in), 'jsonl:PATH' (MCP "
        "memory-server file), 'mcp+stdio:COMMAND' or 'mcp+http://HOST:PORT/PATH' (live MCP memory server).",
    )


@dg.observable_source_asset(
    name="memory_source",
    group_name="memory",
    description="The memory source the project reads ($CARL_MEMORY_SOURCE): its data version is the "
    "source's fingerprint (a file: size, mtime and a hash of its tail; a live MCP server: counts and a hash of "
    "the graph). Observed by the memory_graph_changed sensor, or by 'Observe sources' in the UI.",
)
def memory_source(memory_source: MemorySource) -> dg.ObserveResult:
    fingerprint = source_fingerprint(memory_source.source)
    return dg.ObserveResult(data_version=dg.DataVersion(fingerprint.version),
                            metadata=fingerprint_metadata(fingerprint))


def fingerprint_metadata(fingerprint: SourceFingerprint) -> dict[str, Any]:
    return {"source": fingerprint.source, "source_kind": fingerprint.kind, "fingerprint": fingerprint.version,
            **{f"source_{k}": v for k, v in fingerprint.details.items()}}


class PairsConfig(dg.Config):
    min_positive_score: int = Field(default=8, description="a positive example scored the emotion at least this")
    max_negative_mentions: int = Field(
        default=0, description="a negative example names the emotion at most this many times in its text"
    )
    min_content_chars: int = Field(default=40, description="shorter texts (tag line stripped) are skipped")
    max_examples_per_emotion: int = Field(default=500, description="cap per polarity per emotion")
    seed: int = Field(default=0, description="seed of the deterministic sampling under the cap")
    max_negative_score: int | None = Field(
        default=None, description="negatives are nodes without the emotion (None, the default) or also nodes "
        "that scored it at most this (the seed's 'absent or low'); must be below min_positive_score"
    )


def _md_counts(counts: dict[str, int], header: tuple[str, str]) -> dg.MetadataValue:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"] + [f"| {k} | {v} |" for k, v in counts.items()]
    return dg.MetadataValue.md("\n".join(lines))


def _bar_png(frame: pd.DataFrame, index: str, columns: list[str], title: str) -> bytes:
    fig, ax = plt.subplots(figsize=(7.0, 3.4))
    frame.set_index(index)[columns].plot.bar(ax=ax, width=0.8)
    ax.set_title(title)
    ax.set_xlabel("")
    ax.tick_params(axis="x", labelrotation=60)
    fig.tight_layout()
    return figure_png(fig)


@dg.asset(
    group_name="memory",
    deps=[memory_source],
    kinds={"duckdb"},
    description="The memory graph (nodes with text and emotion tags, links, rejected records) from the "
    "project's memory source ($CARL_MEMORY_SOURCE, or this run's config override): the built-in sample, an "
    "MCP memory-server JSONL file, or a live MCP server. Tables memory_nodes, memory_edges, memory_rejects.",
)
def memory_graph(
    context: dg.AssetExecutionContext, config: MemoryGraphConfig, duckdb: DuckDBResource,
    memory_source: MemorySource,
) -> dg.MaterializeResult:
    source = config.source.strip() or memory_source.source
    fingerprint = source_fingerprint(source) if not source.startswith("mcp") else None
    graph = load_graph(source)
    summary = graph.summary()
    context.log.info(
        f"{source}: {summary['nodes']} nodes, {summary['edges']} edges, {summary['rejects']} rejects"
    )
    tables = {"memory_nodes": graph.nodes, "memory_edges": graph.edges, "memory_rejects": graph.rejects}
    write_tables(duckdb, tables)
    emotions = pd.DataFrame({"emotion": list(summary["emotions"]), "nodes": list(summary["emotions"].values())})
    plots = {"emotion_histogram": _bar_png(emotions, "emotion", ["nodes"], "nodes tagged with each emotion")} if len(
        emotions
    ) else {}
    return materialized(
        graph.nodes, graph.edges, graph.rejects,
        config=config,
        tables=tables,
        metadata={
            **(fingerprint_metadata(fingerprint) if fingerprint else {}),
            "source": source,
            "nodes": summary["nodes"],
            "edges": summary["edges"],
            "rejects": summary["rejects"],
            "tagged_nodes": summary["tagged_nodes"],
            "emotions": len(summary["emotions"]),
            "kinds": _md_counts(summary["kinds"], ("kind", "nodes")),
            "emotion_counts": dg.MetadataValue.json(summary["emotions"]),
            "nodes_preview": table_preview(graph.nodes),
            "rejects_preview": table_preview(graph.rejects),
        },
        plots=plots,
    )


@dg.asset_check(asset=memory_graph, blocking=True, description="Node names unique, every edge between "
                "existing nodes, tags plain-word emotions with scores 0..10, at least one node.")
def memory_graph_is_consistent(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    nodes, edges = read_table(duckdb, "memory_nodes"), read_table(duckdb, "memory_edges")
    names = set(nodes["node_id"])
    dangling = int((~edges["src"].isin(names) | ~edges["dst"].isin(names)).sum())
    bad_tags = 0
    for tags_json in nodes["tags_json"]:
        tags = json.loads(tags_json)
        bad_tags += sum(1 for k, v in tags.items() if not EMOTION_NAME.match(k) or not MIN_SCORE <= v <= MAX_SCORE)
    duplicates = int(nodes["node_id"].duplicated().sum())
    return dg.AssetCheckResult(
        passed=len(nodes) > 0 and dangling == 0 and bad_tags == 0 and duplicates == 0,
        metadata={"nodes": len(nodes), "dangling_edges": dangling, "bad_tags": bad_tags, "duplicate_names": duplicates},
    )


@dg.asset(
    group_name="memory",
    deps=[memory_graph],
    kinds={"duckdb"},
    description="The amygdala training examples (seed step 1): per emotion, positive nodes (scored >= "
    "min_positive_score) and negative nodes (tagged, without the emotion, naming it at most "
    "max_negative_mentions times), text >= min_content_chars with the tag line stripped, at most "
    "max_examples_per_emotion per polarity, sampled deterministically from seed.",
)
def emotion_training_pairs(
    context: dg.AssetExecutionContext, config: PairsConfig, duckdb: DuckDBResource
) -> dg.MaterializeResult:
    graph = graph_from_tables(read_table(duckdb, "memory_nodes"), read_table(duckdb, "memory_edges"))
    pairs = extract_training_pairs(
        graph,
        min_positive_score=config.min_positive_score,
        max_negative_mentions=config.max_negative_mentions,
        min_content_chars=config.min_content_chars,
        max_examples_per_emotion=config.max_examples_per_emotion,
        seed=config.seed,
        max_negative_score=config.max_negative_score,
    )
    write_tables(duckdb, {"emotion_training_pairs": pairs})
    counts = pair_counts(pairs)
    dropped = sorted(set(graph.emotion_counts()) - set(counts["emotion"]))
    context.log.info(f"{len(pairs)} examples over {len(counts)} emotions; dropped (no positive or negative): {dropped}")
    per_emotion = {row.emotion: {"positive": int(row.positive), "negative": int(row.negative)} for row in counts.itertuples()}
    plots = {"pair_counts": _bar_png(counts, "emotion", ["positive", "negative"], "examples per emotion")} if len(
        counts
    ) else {}
    return materialized(
        pairs,
        config=config,
        metadata={
            "rows": len(pairs),
            "emotions": len(counts),
            "unique_nodes": int(pairs["node_id"].nunique()),
            "dropped_emotions": dg.MetadataValue.json(dropped),
            "per_emotion": dg.MetadataValue.json(per_emotion),
            "counts": table_preview(counts, rows=len(counts) or 1),
            "preview": table_preview(pairs),
            # The check reads the limits back from here: asset checks do not see the asset's config.
            "max_examples_per_emotion": config.max_examples_per_emotion,
            "min_content_chars": config.min_content_chars,
        },
        plots=plots,
    )


def _latest_metadata(context: dg.AssetCheckExecutionContext, asset: str) -> dict[str, Any]:
    event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    materialization = event.asset_materialization if event is not None else None
    return {k: v.value for k, v in (materialization.metadata if materialization else {}).items()}


@dg.asset_check(asset=emotion_training_pairs, blocking=True, description="Pairs non-empty; every emotion "
                "kept has positives and negatives within the cap, plain-word names, long enough texts without tag lines.")
def pairs_nonempty_within_caps(context: dg.AssetCheckExecutionContext, duckdb: DuckDBResource) -> dg.AssetCheckResult:
    pairs = read_table(duckdb, "emotion_training_pairs")
    meta = _latest_metadata(context, "emotion_training_pairs")
    cap = int(meta.get("max_examples_per_emotion", PairsConfig().max_examples_per_emotion))
    min_chars = int(meta.get("min_content_chars", PairsConfig().min_content_chars))
    counts = pair_counts(pairs)
    over_cap = counts[(counts["positive"] > cap) | (counts["negative"] > cap)]["emotion"].tolist()
    one_sided = counts[(counts["positive"] == 0) | (counts["negative"] == 0)]["emotion"].tolist()
    bad_names = sorted({e for e in pairs["emotion"] if not EMOTION_NAME.match(str(e))})
    bad_polarity = int((~pairs["polarity"].isin(["positive", "negative"])).sum())
    short = int((pairs["text"].str.len() < min_chars).sum())
    tagged_text = int(sum(1 for t in pairs["text"] if parse_tags(t)))
    return dg.AssetCheckResult(
        passed=bool(len(pairs) > 0 and not over_cap and not one_sided and not bad_names and bad_polarity == 0
                    and short == 0 and tagged_text == 0),
        metadata={
            "rows": len(pairs),
            "emotions": len(counts),
            "cap": cap,
            "max_per_polarity": int(counts[["positive", "negative"]].to_numpy().max()) if len(counts) else 0,
            "over_cap": dg.MetadataValue.json(over_cap),
            "one_sided": dg.MetadataValue.json(one_sided),
            "bad_names": dg.MetadataValue.json(bad_names),
            "bad_polarity": bad_polarity,
            "too_short": short,
            "texts_with_tag_line": tagged_text,
        },
    )
