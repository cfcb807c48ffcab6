"""The memory group: the memory graph from its source (the source asset: defs/memory_source.py; the pairs:
defs/emotion_pairs.py)."""

import json
from typing import Any

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource
from pydantic import Field

from carl_assets.defs.common import materialized, table_preview
from carl_assets.defs.emotion_pairs import (  # noqa: F401 - the memory group's assets, importable from here
    NO_TAG_LINE,
    NO_TAGS_REASON,
    PairsConfig,
    bar_png,
    emotion_training_pairs,
    no_tags_reason,
)
from carl_assets.defs.memory_source import fingerprint_metadata, memory_source
from carl_assets.defs.resources import MemorySource, read_table, write_tables
from carl_assets.memory.fingerprint import SourceFingerprint, source_fingerprint
from carl_assets.memory.graph import EMOTION_NAME, MAX_SCORE, MIN_SCORE, MemorySourceError, load_graph
from carl_assets.project_env import normalise_memory_source


class MemoryGraphConfig(dg.Config):
    source: str | None = Field(
        default=None,
        description="Override the memory source for this run only. None (default): the project's source, "
        "$CARL_MEMORY_SOURCE (the memory_source resource). Else 'sample' (built in), 'jsonl:PATH' (MCP "
        "memory-server file), 'mcp+stdio:COMMAND' or 'mcp+http://HOST:PORT/PATH' (live MCP memory server).",
    )


def _md_counts(counts: dict[str, int], header: tuple[str, str]) -> dg.MetadataValue:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"] + [f"| {k} | {v} |" for k, v in counts.items()]
    return dg.MetadataValue.md("\n".join(lines))


METADATA_COLUMNS = ["key", "line", "value_json"]
GRAPH_CHECK = "memory_graph_is_consistent"


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
        why = (f"cannot read memory source {source!r}: it holds no entity ({summary['rejects']} records "
               "rejected" + (f", e.g. line {graph.rejects['line'].iloc[0]}: {graph.rejects['reason'].iloc[0]}"
                  if len(graph.rejects) else "") + ")")
        raise _source_failure(source, why, duckdb, graph.rejects)
    return graph, fingerprint


@dg.asset(
    group_name="memory",
    deps=[memory_source],
    kinds={"duckdb"},
    check_specs=[dg.AssetCheckSpec(
        GRAPH_CHECK, asset="memory_graph", blocking=True, description="Node names unique, every edge between "
        "existing nodes (stub nodes stand for entities a relation names but the file never created), tags "
        "plain-word emotions with scores 0..10, at least one node.")],
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
    source = normalise_memory_source(config.source or "") or memory_source.resolved
    graph, fingerprint = _load(source, duckdb)
    summary = graph.summary()
    context.log.info(
        f"{source}: {summary['nodes']} nodes, {summary['edges']} edges, {summary['rejects']} rejects"
    )
    if summary["tagged_nodes"] == 0:
        context.log.warning(f"0 of {summary['nodes']} nodes carry emotion tags: {NO_TAGS_REASON}. If no "
                            "tagger tags them either, the pairs are empty and steering_vectors is skipped "
                            "(with that reason); dreams, SFT, GRPO and the evaluation run all the same.")
    file_metadata = _file_metadata(graph)
    tables = {"memory_nodes": graph.nodes, "memory_edges": graph.edges, "memory_rejects": graph.rejects,
              "memory_file_metadata": file_metadata}
    write_tables(duckdb, tables)
    emotions = pd.DataFrame({"emotion": list(summary["emotions"]),
                             "nodes": list(summary["emotions"].values())})
    title = "nodes tagged with each emotion"
    plots = {"emotion_histogram": bar_png(emotions, "emotion", ["nodes"], title)} if len(emotions) else {}
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
        check_results=[judge_graph(graph.nodes, graph.edges)],
    )


def _graph_problems(nodes: pd.DataFrame, edges: pd.DataFrame) -> tuple[dict[str, int], list[str]]:
    """Counts of what is wrong with the memory tables, and one sentence per problem saying what to do."""
    names = set(nodes["node_id"])
    dangling = int((~edges["src"].isin(names) | ~edges["dst"].isin(names)).sum())
    bad_tags = 0
    for tags_json in nodes["tags_json"]:
        tags = json.loads(tags_json)
        bad_tags += sum(1 for k, v in tags.items()
                        if not EMOTION_NAME.match(k) or not MIN_SCORE <= v <= MAX_SCORE)
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


def judge_graph(nodes: pd.DataFrame, edges: pd.DataFrame) -> dg.AssetCheckResult:
    """The `memory_graph_is_consistent` result for the tables this run wrote."""
    counts, problems = _graph_problems(nodes, edges)
    return dg.AssetCheckResult(
        check_name=GRAPH_CHECK,
        passed=not problems,
        description="; ".join(problems) or f"{counts['nodes']} nodes, every edge between them",
        metadata={**counts, "problems": dg.MetadataValue.json(problems)},
    )
