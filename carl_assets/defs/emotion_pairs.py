"""The emotion_training_pairs asset: the (emotion, polarity, text) examples of the amygdala readout, judged
by its own check inside the asset (so the check sees exactly the config and pairs of this run)."""

from typing import Any, Literal

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource
from pydantic import Field

from carl_assets.defs.common import library_config, materialized, table_preview
from carl_assets.defs.resources import write_tables
from carl_assets.handles import AssetHandle
from carl_assets.memory.graph import (
    EMOTION_NAME,
    extract_training_pairs,
    graph_from_tables,
    pair_counts,
    parse_tags,
)
from carl_assets.memory.pairs import PairSettings
from carl_assets.memory.tagging import SOURCES, nodes_with_tags
from carl_assets.plotting import figure_png, plt

TAGS_TABLE = "emotion_tags"  # written by the emotion_tags asset (carl_assets/defs/emotion_tags.py)
STATUS_TABLE = "emotion_tag_nodes"  # ... with the tagger that made them
PAIRS_CHECK = "pairs_nonempty_within_caps"
NO_TAG_LINE = "no node carries an emotion tag line (an observation such as 'warmth:9 clarity:10')"
NO_TAGS_REASON = (
    f"{NO_TAG_LINE}; the emotion_tags asset's tagger (emotion_tags.tagger: 'lexicon', the default, or "
    "'model') scores untagged nodes for the pairs, or add tag lines to your memories"
)


class PairsConfig(dg.Config, PairSettings):
    """emotion_training_pairs: which tags label the pairs; `PairSettings`: which nodes make the examples."""

    tag_sources: Literal["auto", "all", "user"] = Field(
        default="auto", description="the tags that label the pairs: 'all' (the user's tag lines, and for "
        "nodes without one the emotion_tags tagger's tags), 'user' (tag lines only) or 'auto' (the default: "
        "'user' when any node carries a tag line, else 'all': on the tagged sample graph, a lexicon's tags "
        "on its few untagged nodes made the steering vectors worse). User tags always win.")


def bar_png(frame: pd.DataFrame, index: str, columns: list[str], title: str) -> bytes:
    """A grouped bar chart of `columns` by `index` as PNG bytes."""
    fig, ax = plt.subplots(figsize=(7.0, 3.4))
    frame.set_index(index)[columns].plot.bar(ax=ax, width=0.8)
    ax.set_title(title)
    ax.set_xlabel("")
    ax.tick_params(axis="x", labelrotation=60)
    fig.tight_layout()
    return figure_png(fig)


@dg.asset(
    group_name="memory",
    ins={"memory_graph": dg.AssetIn(), "emotion_tags": dg.AssetIn()},
    kinds={"duckdb"},
    check_specs=[dg.AssetCheckSpec(
        PAIRS_CHECK, asset="emotion_training_pairs", blocking=True, description="Pairs non-empty; every "
        "emotion kept has positives and negatives within the cap, plain-word names, long enough texts "
        "without tag lines. No pairs at all (an untagged graph) is a WARN with the reason, so the rest of "
        "the graph runs and steering_vectors skips; a malformed pair is an ERROR naming what to change.")],
    description="The amygdala training examples (the reference's step 1): per emotion, positive nodes "
    "(scored >= min_positive_score) and negative nodes (tagged, without the emotion, naming it at most "
    "max_negative_mentions times), text >= min_content_chars with the tag line stripped, at most "
    "max_examples_per_emotion per polarity, sampled deterministically from seed. Tags: the user's tag lines, "
    "and for nodes without one the emotion_tags tagger's (tag_sources 'all', or 'auto' on a graph without "
    "tag lines), or tag lines only ('user'). "
    "No tags at all: empty, with the reason in metadata (empty_reason).",
)
def emotion_training_pairs(
    context: dg.AssetExecutionContext, config: PairsConfig, duckdb: DuckDBResource, memory_graph: AssetHandle,
    emotion_tags: AssetHandle,
) -> dg.MaterializeResult:
    nodes, tagger, used = _nodes_with_tags(context, memory_graph, emotion_tags, config.tag_sources)
    graph = graph_from_tables(nodes, memory_graph.read("memory_edges"))
    pairs = extract_training_pairs(graph, library_config(config, PairSettings))
    write_tables(duckdb, {"emotion_training_pairs": pairs})
    counts = pair_counts(pairs)
    dropped = sorted(set(graph.emotion_counts()) - set(counts["emotion"]))
    context.log.info(f"{len(pairs)} examples over {len(counts)} emotions; "
                     f"dropped (no positive or negative): {dropped}")
    reason = _empty_reason(graph, config, tagger, used) if pairs.empty else ""
    if reason:
        context.log.warning(f"no emotion training pairs: {reason}")
    per_emotion = {row.emotion: {"positive": int(row.positive), "negative": int(row.negative)}
                   for row in counts.itertuples()}
    title = "examples per emotion"
    plots = {"pair_counts": bar_png(counts, "emotion", ["positive", "negative"], title)} if len(
        counts) else {}
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
            "max_examples_per_emotion": config.max_examples_per_emotion,
            "min_content_chars": config.min_content_chars,
            # Why there are none (empty when there are pairs): steering_vectors repeats it.
            "empty_reason": reason,
            "tag_sources": config.tag_sources,
            "tag_sources_used": used,
            "tagger": tagger or "not materialized",
            "tagged_nodes": int((graph.nodes["n_tags"] > 0).sum()),
        },
        plots=plots,
        check_results=[judge_pairs(pairs, config, reason)],
    )


def _tagger(emotion_tags: AssetHandle) -> str:
    """The tagger that made the `emotion_tags` tables (their status table says; 'unknown' if an older
    emotion_tags wrote it without the column)."""
    try:
        status = emotion_tags.read(STATUS_TABLE)
    except LookupError:
        return "unknown"
    taggers = status["tagger"].dropna().unique().tolist() if "tagger" in status.columns else []
    return str(taggers[0]) if taggers else "unknown"


def _nodes_with_tags(context: dg.AssetExecutionContext, memory_graph: AssetHandle, emotion_tags: AssetHandle,
                     tag_sources: str) -> tuple[pd.DataFrame, str | None, str]:
    """`memory_nodes` with the tags the pairs use, the emotion_tags tagger (None: never materialized) and
    the sources used ('user' or 'all'). The user's tag lines come from the graph itself (always current,
    always winning); with 'all' (or 'auto' on a graph without tag lines) a node without one takes the
    tagger's tags from the `emotion_tags` table."""
    nodes = memory_graph.read("memory_nodes")
    user = nodes["n_tags"] > 0
    used = "all" if tag_sources == "all" or (tag_sources == "auto" and not user.any()) else "user"
    try:
        table = emotion_tags.read(TAGS_TABLE)
    except LookupError:
        context.log.warning("emotion_tags has not been materialized: the pairs use the graph's tag lines "
                            "only")
        return nodes, None, "user"
    tagger = _tagger(emotion_tags)
    if used == "user":
        return nodes, tagger, used
    scored = nodes_with_tags(nodes, table, [s for s in SOURCES if s != "user"])
    # The graph's own tag lines, current even if emotion_tags was made from an older graph.
    scored.loc[user, ["tags_json", "n_tags"]] = nodes.loc[user, ["tags_json", "n_tags"]]
    return scored, tagger, used


def no_tags_reason(tag_sources: str, tagger: str | None) -> str:
    """Why no node has a tag the pairs can use, and what to change (config fields that exist)."""
    if tag_sources == "user":
        return (f"{NO_TAG_LINE}, and emotion_training_pairs.tag_sources = 'user' leaves out a tagger's tags; "
                "add tag lines, or set tag_sources to 'all' with emotion_tags.tagger 'lexicon' or 'model'")
    if tagger is None:
        return (f"{NO_TAG_LINE}, and emotion_tags has not been materialized; add tag lines, or materialize "
                "emotion_tags (emotion_tags.tagger 'lexicon' or 'model') before the pairs")
    if tagger == "off":
        return (f"{NO_TAG_LINE}, and emotion_tags.tagger is 'off'; add tag lines, or set emotion_tags.tagger "
                "to 'lexicon' or 'model'")
    other = "model" if tagger == "lexicon" else "lexicon"
    return (f"{NO_TAG_LINE}, and the {tagger!r} tagger (emotion_tags.tagger) scored no node at or above "
            f"emotion_tags.min_score; add tag lines, lower emotion_tags.min_score, or set "
            f"emotion_tags.tagger to {other!r}")


def _empty_reason(graph: Any, config: PairsConfig, tagger: str | None, used: str) -> str:
    """Why `extract_training_pairs` gave nothing, and what to change (names real config fields)."""
    tagged = int((graph.nodes["n_tags"] > 0).sum())
    if tagged == 0:
        # 'auto' with emotion_tags never made falls back to 'user': say that emotion_tags is missing instead.
        auto_used = used if tagger is not None else "auto"
        return no_tags_reason(auto_used if config.tag_sources == "auto" else config.tag_sources, tagger)
    emotions = graph.emotion_counts()
    more = "" if used == "all" or tagger in (None, "off") else (
        "; the tagger's tags were left out (emotion_training_pairs.tag_sources = "
        f"{config.tag_sources!r}): set it to 'all' to add them")
    return (f"{tagged} of {len(graph.nodes)} nodes carry tags over {len(emotions)} emotions, but no "
            f"emotion has both a positive node (scored >= emotion_training_pairs.min_positive_score = "
            f"{config.min_positive_score}) and a negative one, each with >= min_content_chars = "
            f"{config.min_content_chars} characters of text; lower those settings or tag more nodes "
            f"(every emotion needs nodes that score it high and tagged nodes without it){more}")


def judge_pairs(pairs: pd.DataFrame, config: PairsConfig, empty_reason: str) -> dg.AssetCheckResult:
    """The `pairs_nonempty_within_caps` result for the pairs this run made under its own config: WARN with
    the reason when there are none, ERROR naming each problem otherwise."""
    cap, min_chars = config.max_examples_per_emotion, config.min_content_chars
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
        reason = empty_reason or "emotion_training_pairs is empty"
        return dg.AssetCheckResult(check_name=PAIRS_CHECK, passed=False, severity=dg.AssetCheckSeverity.WARN,
                                   description=reason, metadata={**metadata, "reason": reason})
    problems = _pair_problems(found, cap, min_chars)
    return dg.AssetCheckResult(check_name=PAIRS_CHECK, passed=not problems,
                               metadata={**metadata, "problems": dg.MetadataValue.json(problems)},
                               description="; ".join(problems)
                               or f"{len(pairs)} pairs over {len(counts)} emotions")


def _pair_problems(found: dict[str, Any], cap: int, min_chars: int) -> list[str]:
    """One sentence per problem the check found, saying what is wrong and what to change."""
    messages = {
        "over_cap": f"emotions {found['over_cap']} have more than max_examples_per_emotion = {cap} pairs of "
                    "a polarity: a sampling bug, report it",
        "one_sided": f"emotions {found['one_sided']} have pairs of one polarity only: a pairs bug, report it",
        "bad_names": f"emotion names {found['bad_names']} are not lower-case words: fix those tag lines",
        "bad_polarity": f"{found['bad_polarity']} pairs have a polarity other than positive/negative",
        "too_short": f"{found['too_short']} texts are shorter than min_content_chars = {min_chars}",
        "texts_with_tag_line": f"{found['texts_with_tag_line']} texts still hold a tag line: the tag parser "
                               "missed it, report it with the memory file",
    }
    return [message for key, message in messages.items() if found[key]]
