"""docs/architecture.md stays true to the code: its mermaid diagram is the asset graph of the loaded
Definitions (solid = a declared input, dotted = an ordering-only dep), its table names every asset, every
table of `handles.TABLE_OWNERS` and every check, and every back edge of `handles.CYCLE_BACK_EDGES`."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import dagster as dg
import pytest

from carl_assets.defs import build_definitions
from carl_assets.handles import CYCLE_BACK_EDGES, TABLE_OWNERS

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
EDGE = re.compile(r"^\s*(\w+) (-->|-\.->) (\w+)\s*$")


def graph_edges(defs: dg.Definitions | None = None) -> set[tuple[str, str, str]]:
    """(upstream, arrow, asset) for every edge: '-->' for an input the asset reads, '-.->' for a `deps` edge
    (an input of Dagster's Nothing type)."""
    if defs is None:
        defs = build_definitions(tempfile.mkdtemp(prefix="carl-doc-"))
    graph = defs.get_repository_def().asset_graph
    edges = set()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if not node.is_materializable:
            continue
        assets_def = node.assets_def
        for input_name, upstream in assets_def.keys_by_input_name.items():
            nothing = assets_def.op.ins[input_name].dagster_type.is_nothing
            edges.add((upstream.to_user_string(), "-.->" if nothing else "-->", key.to_user_string()))
    return edges


def _upstream_first(edges: set[tuple[str, str, str]]) -> list[str]:
    """The assets in a deterministic topological order (among those ready, alphabetical)."""
    names = {n for up, _, down in edges for n in (up, down)}
    parents = {n: {up for up, _, down in edges if down == n} for n in names}
    order: list[str] = []
    while len(order) < len(names):
        order.append(min(n for n in names if n not in order and parents[n] <= set(order)))
    return order


def graph_mermaid(defs: dg.Definitions | None = None) -> str:
    """The mermaid block docs/architecture.md shows, from the loaded Definitions: the edges into each asset,
    assets upstream first."""
    edges = graph_edges(defs)
    rank = {name: i for i, name in enumerate(_upstream_first(edges))}
    lines = [f"  {up} {arrow} {down}" for up, arrow, down in sorted(edges, key=lambda e: (rank[e[2]], e[0]))]
    return "\n".join(["```mermaid", "flowchart LR", *lines, "```"])


def doc_edges(text: str) -> set[tuple[str, str, str]]:
    block = text.split("```mermaid", 1)[1].split("```", 1)[0]
    return {m.groups() for m in map(EDGE.match, block.splitlines()) if m}


@pytest.fixture(scope="module")
def defs(tmp_path_factory) -> dg.Definitions:
    return build_definitions(tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def text() -> str:
    return DOC.read_text()


def test_the_diagram_is_the_asset_graph(defs, text):
    drawn, real = doc_edges(text), graph_edges(defs)
    assert len(real) > 30  # the graph really was read (35 edges when this was written)
    assert drawn == real, (
        f"docs/architecture.md diagram differs from the graph: missing {sorted(real - drawn)}, "
        f"extra {sorted(drawn - real)}; print it with tests.test_architecture_doc.graph_mermaid()"
    )


def test_the_table_names_every_asset_table_and_check(defs, text):
    graph = defs.get_repository_def().asset_graph
    rows = {m.group(1) for m in re.finditer(r"^\| `(\w+)` \(", text, flags=re.M)}
    assets = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert rows == assets
    tables = {t for owned in TABLE_OWNERS.values() for t in owned}
    checks = {
        spec.name
        for key in graph.get_all_asset_keys()
        if graph.get(key).is_materializable
        for spec in graph.get(key).assets_def.check_specs
    }
    assert len(checks) == 13
    missing = sorted(name for name in tables | checks if not re.search(rf"\b{name}\b", text))
    assert not missing, f"docs/architecture.md does not name {missing}"


def test_the_back_edges_named_are_the_code_s(text):
    section = text.split("### The dream cycle's back edge", 1)[1].split("###", 1)[0]
    for reader, upstreams in CYCLE_BACK_EDGES.items():
        assert f"`{reader}`" in section
        for upstream in upstreams:
            assert f"`{upstream}`" in section
