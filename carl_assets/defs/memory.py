"""The memory group: the memory graph from its source, and the (emotion, polarity, text) pairs."""

import json
from typing import Any, Literal

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
    MemorySourceError,
    extract_training_pairs,
    graph_from_tables,
    load_graph,
    pair_counts,
    parse_tags,
)
from carl_assets.memory.tagging import SOURCES, nodes_with_tags
from carl_assets.plotting import figure_png, plt
from carl_assets.project_env import normalise_memory_source


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
    fingerprint = source_fingerprint(memory_source.resolved)
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
    tag_sources: Literal["auto", "all", "user"] = Field(
        default="auto", description="the tags that label the pairs: 'all' (the user's tag lines, and for nodes "
        "without one the emotion_tags tagger's tags), 'user' (tag lines only) or 'auto' (the default: 'user' "
        "when any node carries a tag line, else 'all': on the tagged sample graph, a lexicon's tags on its few "
        "untagged nodes made the steering vectors worse). User tags always win.")
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


NO_TAG_LINE = "no node carries an emotion tag line (an observation such as 'warmth:9 clarity:10')"
NO_TAGS_REASON = (
    f"{NO_TAG_LINE}; the emotion_tags asset's tagger (emotion_tags.tagger: 'lexicon', the default, or 'model') "
    "scores untagged nodes for the pairs, or add tag lines to your memories"
)
METADATA_COLUMNS = ["key", "line", "value_json"]
TAGS_TABLE = "emotion_tags"  # written by the emotion_tags asset (carl_assets/defs/emotion_tags.py)


def _previous_nodes(duckdb: DuckDBResource) -> int | None:
    """Rows of the last good `memory_nodes` table, None when there is none."""
    try:
        return len(read_table(duckdb, "memory_nodes"))
    except (LookupError, FileNotFoundError):
        return None


def _source_failure(source: str, why: str, duckdb: DuckDBResource, rejects: pd.DataFrame | None = None
                    ) -> dg.Failure:
    """The asset's failure for a source that gives no graph: what was read, why, what stays, what to do."""
    previous = _previous_nodes(duckdb)
    kept = ("Nothing was written: the last good graph stays (memory_nodes, " + f"{previous} nodes)"
            if previous is not None else "Nothing was written (there is no earlier graph)")
    advice = "" if "CARL_MEMORY_SOURCE" in why else (
        " Fix the file, or point $CARL_MEMORY_SOURCE (or this run's memory_graph.source) at a memory file "
        "('jsonl:PATH'), a live server ('mcp+stdio:COMMAND') or 'sample'.")
    text = f"{why.rstrip('. ')}. {kept}.{advice}"
    metadata: dict[str, Any] = {"source": source, "previous_nodes": -1 if previous is None else previous}
    if rejects is not None and len(rejects):
        metadata["rejects"] = len(rejects)
        metadata["rejects_preview"] = table_preview(rejects)
    return dg.Failure(description=text, metadata=metadata)


def _file_metadata(graph: Any) -> pd.DataFrame:
    """What the reader learnt about the file besides the graph (`MemoryGraph.metadata`: format, encoding,
    counts, and marker records such as `{"type":"_aim",...}` with their line), one row per item: columns
    key, line (the marker's line, else null), value_json."""
    found = getattr(graph, "metadata", None) or {}
    rows = []
    for key, value in (found.items() if isinstance(found, dict) else [("records", found)]):
        for item in value if isinstance(value, list) else [value]:
            line = item.get("line") if isinstance(item, dict) else None
            rest = {k: v for k, v in item.items() if k != "line"} if isinstance(item, dict) else item
            rows.append({"key": str(key), "line": None if line is None else int(line),
                         "value_json": json.dumps(rest, ensure_ascii=False, sort_keys=True, default=str)})
    return pd.DataFrame(rows, columns=METADATA_COLUMNS).astype({"line": "Int64"})


def _load(source: str, duckdb: DuckDBResource) -> tuple[Any, SourceFingerprint | None]:
    """The graph and the file's fingerprint; a `dg.Failure` (before anything is written) when the source
    cannot be read or holds no entity."""
    try:
        fingerprint = source_fingerprint(source) if not source.startswith("mcp") else None
        graph = load_graph(source)
    except MemorySourceError as exc:
        raise _source_failure(source, str(exc), duckdb) from None
    if graph.nodes.empty:
        summary = graph.summary()
        why = (f"cannot read memory source {source!r}: it holds no entity ({summary['rejects']} records rejected"
               + (f", e.g. line {graph.rejects['line'].iloc[0]}: {graph.rejects['reason'].iloc[0]}"
                  if len(graph.rejects) else "") + ")")
        raise _source_failure(source, why, duckdb, graph.rejects)
    return graph, fingerprint


@dg.asset(
    group_name="memory",
    deps=[memory_source],
    kinds={"duckdb"},
    description="The memory graph (nodes with text and emotion tags, links, rejected records) from the "
    "project's memory source ($CARL_MEMORY_SOURCE, or this run's config override): the built-in sample, an "
    "MCP memory-server JSONL file, or a live MCP server. Tables memory_nodes, memory_edges, memory_rejects, "
    "memory_file_metadata (the file's marker/metadata records). A source that cannot be read or holds no "
    "entity fails the asset before anything is written: the last good graph stays.",
)
def memory_graph(
    context: dg.AssetExecutionContext, config: MemoryGraphConfig, duckdb: DuckDBResource,
    memory_source: MemorySource,
) -> dg.MaterializeResult:
    source = normalise_memory_source(config.source) or memory_source.resolved
    graph, fingerprint = _load(source, duckdb)
    summary = graph.summary()
    context.log.info(
        f"{source}: {summary['nodes']} nodes, {summary['edges']} edges, {summary['rejects']} rejects"
    )
    if summary["tagged_nodes"] == 0:
        context.log.warning(f"0 of {summary['nodes']} nodes carry emotion tags: {NO_TAGS_REASON}. If no tagger "
                            "tags them either, the pairs are empty and steering_vectors is skipped (with that "
                            "reason); dreams, SFT, GRPO and the evaluation run all the same.")
    file_metadata = _file_metadata(graph)
    tables = {"memory_nodes": graph.nodes, "memory_edges": graph.edges, "memory_rejects": graph.rejects,
              "memory_file_metadata": file_metadata}
    write_tables(duckdb, tables)
    emotions = pd.DataFrame({"emotion": list(summary["emotions"]), "nodes": list(summary["emotions"].values())})
    plots = {"emotion_histogram": _bar_png(emotions, "emotion", ["nodes"], "nodes tagged with each emotion")} if len(
        emotions
    ) else {}
    # The file's metadata describes the file, not the graph: it stays out of the data version.
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
            "tags_note": f"{summary['tagged_nodes']} of {summary['nodes']} nodes carry emotion tags"
            + ("" if summary["tagged_nodes"] else f": {NO_TAGS_REASON}"),
            "emotions": len(summary["emotions"]),
            "kinds": _md_counts(summary["kinds"], ("kind", "nodes")),
            "emotion_counts": dg.MetadataValue.json(summary["emotions"]),
            "file_metadata": table_preview(file_metadata, rows=20),
            "nodes_preview": table_preview(graph.nodes),
            "rejects_preview": table_preview(graph.rejects),
        },
        plots=plots,
    )


def _graph_problems(nodes: pd.DataFrame, edges: pd.DataFrame) -> tuple[dict[str, int], list[str]]:
    """Counts of what is wrong with the memory tables, and one sentence per problem saying what to do."""
    names = set(nodes["node_id"])
    dangling = int((~edges["src"].isin(names) | ~edges["dst"].isin(names)).sum())
    bad_tags = 0
    for tags_json in nodes["tags_json"]:
        tags = json.loads(tags_json)
        bad_tags += sum(1 for k, v in tags.items() if not EMOTION_NAME.match(k) or not MIN_SCORE <= v <= MAX_SCORE)
    counts = {"nodes": len(nodes), "dangling_edges": dangling, "bad_tags": bad_tags,
              "duplicate_names": int(nodes["node_id"].duplicated().sum())}
    problems = []
    if not len(nodes):
        problems.append("memory_nodes is empty: rematerialize memory_graph from a source with entities")
    if dangling:
        problems.append(f"{dangling} edges name a node that is not in memory_nodes (a stub node should stand "
                        "for an entity that was never created): a reader bug, report it with the file")
    if bad_tags:
        problems.append(f"{bad_tags} tags are not a lower-case word with a score {MIN_SCORE}..{MAX_SCORE}: "
                        "a reader bug, report it with the file")
    if counts["duplicate_names"]:
        problems.append(f"{counts['duplicate_names']} node names repeat: same-name entities should be merged "
                        "by the reader; report it with the file")
    return counts, problems


@dg.asset_check(asset=memory_graph, blocking=True, description="Node names unique, every edge between "
                "existing nodes (stub nodes stand for entities a relation names but the file never created), "
                "tags plain-word emotions with scores 0..10, at least one node.")
def memory_graph_is_consistent(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    counts, problems = _graph_problems(read_table(duckdb, "memory_nodes"), read_table(duckdb, "memory_edges"))
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or f"{counts['nodes']} nodes, every edge between them",
        metadata={**counts, "problems": dg.MetadataValue.json(problems)},
    )


@dg.asset(
    group_name="memory",
    deps=[memory_graph, "emotion_tags"],
    kinds={"duckdb"},
    description="The amygdala training examples (seed step 1): per emotion, positive nodes (scored >= "
    "min_positive_score) and negative nodes (tagged, without the emotion, naming it at most "
    "max_negative_mentions times), text >= min_content_chars with the tag line stripped, at most "
    "max_examples_per_emotion per polarity, sampled deterministically from seed. Tags: the user's tag lines, "
    "and for nodes without one the emotion_tags tagger's (tag_sources 'all', or 'auto' on a graph without tag "
    "lines), or tag lines only ('user'). "
    "No tags at all: empty, with the reason in metadata (empty_reason).",
)
def emotion_training_pairs(
    context: dg.AssetExecutionContext, config: PairsConfig, duckdb: DuckDBResource
) -> dg.MaterializeResult:
    nodes, tagger, used = _nodes_with_tags(context, duckdb, config.tag_sources)
    graph = graph_from_tables(nodes, read_table(duckdb, "memory_edges"))
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
    reason = _empty_reason(graph, config, tagger, used) if pairs.empty else ""
    if reason:
        context.log.warning(f"no emotion training pairs: {reason}")
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
            # Why there are none (empty when there are pairs): the check and steering_vectors repeat it.
            "empty_reason": reason,
            "tag_sources": config.tag_sources,
            "tag_sources_used": used,
            "tagger": tagger or "not materialized",
            "tagged_nodes": int((graph.nodes["n_tags"] > 0).sum()),
        },
        plots=plots,
    )


def _nodes_with_tags(context: dg.AssetExecutionContext, duckdb: DuckDBResource, tag_sources: str
                     ) -> tuple[pd.DataFrame, str | None, str]:
    """`memory_nodes` with the tags the pairs use, the emotion_tags tagger (None: never materialized) and
    the sources used ('user' or 'all'). The user's tag lines come from the graph itself (always current,
    always winning); with 'all' (or 'auto' on a graph without tag lines) a node without one takes the
    tagger's tags from the `emotion_tags` table."""
    nodes = read_table(duckdb, "memory_nodes")
    user = nodes["n_tags"] > 0
    used = "all" if tag_sources == "all" or (tag_sources == "auto" and not user.any()) else "user"
    try:
        table = read_table(duckdb, TAGS_TABLE)
    except LookupError:
        context.log.warning("emotion_tags has not been materialized: the pairs use the graph's tag lines only")
        return nodes, None, "user"
    tagger = str(_latest_metadata(context, TAGS_TABLE).get("tagger", "unknown"))
    if used == "user":
        return nodes, tagger, used
    scored = nodes_with_tags(nodes, table, [s for s in SOURCES if s != "user"])
    # The graph's own tag lines, current even if emotion_tags was made from an older graph.
    scored.loc[user, ["tags_json", "n_tags"]] = nodes.loc[user, ["tags_json", "n_tags"]]
    return scored, tagger, used


def no_tags_reason(tag_sources: str, tagger: str | None) -> str:
    """Why no node has a tag the pairs can use, and what to change (config fields that exist)."""
    if tag_sources == "user":
        return (f"{NO_TAG_LINE}, and emotion_training_pairs.tag_sources = 'user' leaves out a tagger's tags; add "
                "tag lines, or set tag_sources to 'all' with emotion_tags.tagger 'lexicon' or 'model'")
    if tagger is None:
        return (f"{NO_TAG_LINE}, and emotion_tags has not been materialized; add tag lines, or materialize "
                "emotion_tags (emotion_tags.tagger 'lexicon' or 'model') before the pairs")
    if tagger == "off":
        return (f"{NO_TAG_LINE}, and emotion_tags.tagger is 'off'; add tag lines, or set emotion_tags.tagger to "
                "'lexicon' or 'model'")
    other = "model" if tagger == "lexicon" else "lexicon"
    return (f"{NO_TAG_LINE}, and the {tagger!r} tagger (emotion_tags.tagger) scored no node at or above "
            f"emotion_tags.min_score; add tag lines, lower emotion_tags.min_score, or set emotion_tags.tagger "
            f"to {other!r}")


def _empty_reason(graph: Any, config: PairsConfig, tagger: str | None, used: str) -> str:
    """Why `extract_training_pairs` gave nothing, and what to change (names real config fields)."""
    tagged = int((graph.nodes["n_tags"] > 0).sum())
    if tagged == 0:
        return no_tags_reason(used if config.tag_sources == "auto" else config.tag_sources, tagger)
    emotions = graph.emotion_counts()
    more = "" if used == "all" or tagger in (None, "off") else (
        "; the tagger's tags were left out (emotion_training_pairs.tag_sources = "
        f"{config.tag_sources!r}): set it to 'all' to add them")
    return (f"{tagged} of {len(graph.nodes)} nodes carry tags over {len(emotions)} emotions, but no emotion has "
            f"both a positive node (scored >= emotion_training_pairs.min_positive_score = "
            f"{config.min_positive_score}) and a negative one, each with >= min_content_chars = "
            f"{config.min_content_chars} characters of text; lower those settings or tag more nodes "
            f"(every emotion needs nodes that score it high and tagged nodes without it){more}")


def _latest_metadata(context: dg.AssetCheckExecutionContext, asset: str) -> dict[str, Any]:
    event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    materialization = event.asset_materialization if event is not None else None
    return {k: v.value for k, v in (materialization.metadata if materialization else {}).items()}


@dg.asset_check(asset=emotion_training_pairs, blocking=True, description="Pairs non-empty; every emotion "
                "kept has positives and negatives within the cap, plain-word names, long enough texts without "
                "tag lines. No pairs at all (an untagged graph) is a WARN with the reason, so the rest of the "
                "graph runs and steering_vectors skips; a malformed pair is an ERROR naming what to change.")
def pairs_nonempty_within_caps(context: dg.AssetCheckExecutionContext, duckdb: DuckDBResource) -> dg.AssetCheckResult:
    pairs = read_table(duckdb, "emotion_training_pairs")
    meta = _latest_metadata(context, "emotion_training_pairs")
    cap = int(meta.get("max_examples_per_emotion", PairsConfig().max_examples_per_emotion))
    min_chars = int(meta.get("min_content_chars", PairsConfig().min_content_chars))
    counts = pair_counts(pairs)
    found = {
        "over_cap": counts[(counts["positive"] > cap) | (counts["negative"] > cap)]["emotion"].tolist(),
        "one_sided": counts[(counts["positive"] == 0) | (counts["negative"] == 0)]["emotion"].tolist(),
        "bad_names": sorted({e for e in pairs["emotion"] if not EMOTION_NAME.match(str(e))}),
        "bad_polarity": int((~pairs["polarity"].isin(["positive", "negative"])).sum()),
        "too_short": int((pairs["text"].str.len() < min_chars).sum()),
        "texts_with_tag_line": int(sum(1 for t in pairs["text"] if parse_tags(t))),
    }
    metadata = {
        "rows": len(pairs), "emotions": len(counts), "cap": cap,
        "max_per_polarity": int(counts[["positive", "negative"]].to_numpy().max()) if len(counts) else 0,
        **{k: dg.MetadataValue.json(v) if isinstance(v, list) else v for k, v in found.items()},
    }
    if pairs.empty:
        reason = str(meta.get("empty_reason") or "emotion_training_pairs is empty")
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN, description=reason,
                                   metadata={**metadata, "reason": reason})
    problems = _pair_problems(found, cap, min_chars)
    return dg.AssetCheckResult(passed=not problems, metadata={**metadata, "problems": dg.MetadataValue.json(problems)},
                               description="; ".join(problems) or f"{len(pairs)} pairs over {len(counts)} emotions")


def _pair_problems(found: dict[str, Any], cap: int, min_chars: int) -> list[str]:
    """One sentence per problem the check found, saying what is wrong and what to change."""
    messages = {
        "over_cap": f"emotions {found['over_cap']} have more than max_examples_per_emotion = {cap} pairs of a "
                    "polarity: a sampling bug, report it",
        "one_sided": f"emotions {found['one_sided']} have pairs of one polarity only: a pairs bug, report it",
        "bad_names": f"emotion names {found['bad_names']} are not lower-case words: fix those tag lines",
        "bad_polarity": f"{found['bad_polarity']} pairs have a polarity other than positive/negative",
        "too_short": f"{found['too_short']} texts are shorter than min_content_chars = {min_chars}",
        "texts_with_tag_line": f"{found['texts_with_tag_line']} texts still hold a tag line: the tag parser "
                               "missed it, report it with the memory file",
    }
    return [message for key, message in messages.items() if found[key]]
