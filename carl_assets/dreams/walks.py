"""Sampling the latent space: random walks with restart over the memory graph.

The dream loop's "noise" is a walk through the memory graph that starts at a recent reflection or
lesson (the conditioning) and wanders along weighted edges, jumping back to its start with
probability `restart_prob` at each step. Restarts keep a walk near its seed, so the memories it
collides stay related to what is being trained; edge weights let some relations (say `reflects_on`)
pull harder than others (say `follows`).

All walks advance together as numpy arrays: one draw for "restart?" and one for "which neighbour?"
per walk and step, the neighbour found by a binary search in the global cumulative edge weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

RECENCY_COLUMNS = ("timestamp", "created_at")  # preferred over source_line when the nodes table has one


@dataclass
class WalkConfig:
    """How walks are drawn. `relation_weights` maps a relation type to its edge weight (unknown types get
    `default_weight`; 0 means the walk never takes that relation); `directed=False` lets a walk follow
    an edge both ways."""

    restart_prob: float = 0.15
    walk_length: int = 8
    relation_weights: dict[str, float] = field(default_factory=dict)
    default_weight: float = 1.0
    conditioning_kinds: tuple[str, ...] = ("reflection", "lesson")
    recent_nodes: int = 64
    directed: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.restart_prob <= 1.0:
            raise ValueError(f"restart_prob must lie in [0, 1], got {self.restart_prob}")
        if self.walk_length < 0:
            raise ValueError(f"walk_length must be >= 0, got {self.walk_length}")
        if self.recent_nodes < 1:
            raise ValueError(f"recent_nodes must be >= 1, got {self.recent_nodes}")
        weights = {**self.relation_weights, "<default_weight>": self.default_weight}
        bad = {k: v for k, v in weights.items() if not np.isfinite(v) or v < 0}
        if bad:
            raise ValueError(f"edge weights must be finite and >= 0, got {bad}")
        self.conditioning_kinds = tuple(self.conditioning_kinds)
        if not self.conditioning_kinds:
            raise ValueError("conditioning_kinds is empty: walks need kinds to start from")


@dataclass
class WalkSample:
    """Walks as arrays: `nodes[w, t]` is the index (into `node_ids`) of walk w at step t (t = 0 is the
    start) and `restarted[w, t]` says step t was a restart (a jump back to the start, drawn or forced
    by a node without out-edges)."""

    node_ids: np.ndarray  # [N] str
    nodes: np.ndarray  # [n_walks, walk_length + 1] int
    restarted: np.ndarray  # [n_walks, walk_length + 1] bool (column 0 is False)

    def as_lists(self) -> list[list[str]]:
        return [[str(x) for x in row] for row in self.node_ids[self.nodes]]


@dataclass
class _Adjacency:
    """Out-edges in CSR form with a global running sum of weights for the neighbour search."""

    offsets: np.ndarray  # [N + 1]
    targets: np.ndarray  # [E]
    cumulative: np.ndarray  # [E] running sum of edge weights over the CSR order
    out_weight: np.ndarray  # [N] total out-weight per node


def _recency(nodes: pd.DataFrame) -> pd.Series:
    for column in RECENCY_COLUMNS:
        if column in nodes.columns:
            return nodes[column]
    if "source_line" not in nodes.columns:
        raise ValueError(f"nodes need a recency column: one of {[*RECENCY_COLUMNS, 'source_line']}")
    return nodes["source_line"]


def start_candidates(nodes: pd.DataFrame, config: WalkConfig) -> np.ndarray:
    """Row positions of the nodes walks may start from: the `recent_nodes` most recent nodes of the
    conditioning kinds (most recent first; ties keep table order)."""
    kinds = nodes["kind"].astype(str)
    eligible = np.flatnonzero(kinds.isin(config.conditioning_kinds).to_numpy())
    if eligible.size == 0:
        present = sorted(kinds.unique().tolist())
        raise ValueError(f"no node of the conditioning kinds {list(config.conditioning_kinds)} "
                         f"(kinds present: {present})")
    recency = _recency(nodes).iloc[eligible]
    order = np.argsort(-_as_sort_key(recency), kind="stable")
    return eligible[order[: config.recent_nodes]]


def _as_sort_key(values: pd.Series) -> np.ndarray:
    """A float key that sorts like the column (timestamps become nanoseconds since the epoch)."""
    if pd.api.types.is_numeric_dtype(values):
        return values.to_numpy(dtype=np.float64, na_value=-np.inf)
    stamps = pd.to_datetime(values, errors="coerce", utc=True)
    if stamps.isna().all():
        raise ValueError(f"recency column {values.name!r} is neither numeric nor parseable as timestamps")
    key = stamps.astype("int64").to_numpy(dtype=np.float64)
    key[stamps.isna().to_numpy()] = -np.inf
    return key


def _adjacency(node_ids: np.ndarray, edges: pd.DataFrame, config: WalkConfig) -> _Adjacency:
    n = len(node_ids)
    index = pd.Index(node_ids)
    src = index.get_indexer(edges["src"].astype(str))
    dst = index.get_indexer(edges["dst"].astype(str))
    relation = edges["relation"].astype(str).to_numpy() if len(edges) else np.array([], dtype=str)
    weight = np.array([config.relation_weights.get(r, config.default_weight) for r in relation], dtype=np.float64)
    keep = (src >= 0) & (dst >= 0) & (weight > 0)  # edges to nodes outside the table cannot be walked
    src, dst, weight = src[keep], dst[keep], weight[keep]
    if not config.directed:
        src, dst, weight = np.concatenate([src, dst]), np.concatenate([dst, src]), np.concatenate([weight, weight])
    order = np.argsort(src, kind="stable")
    src, dst, weight = src[order], dst[order], weight[order]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=offsets[1:])
    out_weight = np.bincount(src, weights=weight, minlength=n).astype(np.float64)
    return _Adjacency(offsets, dst.astype(np.int64), np.cumsum(weight), out_weight)


def sample_walks(nodes: pd.DataFrame, edges: pd.DataFrame, n_walks: int, config: WalkConfig) -> WalkSample:
    """`n_walks` random walks with restart, as arrays (see `random_walks` for the rules).

    Start nodes go round a seeded shuffle of the start candidates, so every recent reflection/lesson
    seeds about as many walks as any other.
    """
    if n_walks < 0:
        raise ValueError(f"n_walks must be >= 0, got {n_walks}")
    missing = {"node_id", "kind"} - set(nodes.columns) | {"src", "dst", "relation"} - set(edges.columns)
    if missing:
        raise ValueError(f"memory graph tables lack columns {sorted(missing)}")
    node_ids = nodes["node_id"].astype(str).to_numpy()
    if len(set(node_ids)) != len(node_ids):
        raise ValueError("nodes.node_id has duplicates")
    candidates = start_candidates(nodes, config)
    adjacency = _adjacency(node_ids, edges, config)
    rng = np.random.default_rng(config.seed)

    starts = np.resize(rng.permutation(candidates), n_walks)
    steps = config.walk_length
    walk = np.empty((n_walks, steps + 1), dtype=np.int64)
    restarted = np.zeros((n_walks, steps + 1), dtype=bool)
    walk[:, 0] = starts
    current = starts.copy()
    n_edges = len(adjacency.targets)
    for t in range(1, steps + 1):
        restart = rng.random(n_walks) < config.restart_prob
        pick = rng.random(n_walks)
        out = adjacency.out_weight[current]
        restart |= out <= 0  # a node without out-edges sends the walk home
        if n_edges:
            # The neighbour: the first edge of the current node's CSR segment whose running weight
            # exceeds (running weight before the segment) + u * (the segment's weight).
            first = adjacency.offsets[current]
            before = np.where(first > 0, adjacency.cumulative[np.maximum(first - 1, 0)], 0.0)
            edge = np.searchsorted(adjacency.cumulative, before + pick * out, side="right")
            last = np.maximum(adjacency.offsets[current + 1] - 1, first)  # float round-off stays inside
            edge = np.minimum(np.clip(edge, first, last), n_edges - 1)
            current = np.where(restart, starts, adjacency.targets[edge])
        else:
            current = starts
        walk[:, t] = current
        restarted[:, t] = restart
    return WalkSample(node_ids=node_ids, nodes=walk, restarted=restarted)


def random_walks(nodes: pd.DataFrame, edges: pd.DataFrame, n_walks: int, config: WalkConfig) -> list[list[str]]:
    """`n_walks` random walks with restart over the memory graph, each a list of `walk_length + 1` node
    ids (the start, then one node per step).

    A walk starts at one of the `recent_nodes` most recent nodes of `conditioning_kinds` (recency: a
    `timestamp`/`created_at` column if the table has one, else `source_line`). At each step it jumps
    back to its start with probability `restart_prob`, else moves to a neighbour drawn in proportion
    to edge weight (`relation_weights`, `default_weight`); a node with no out-edges restarts. With
    `directed=False` an edge is walked both ways. Deterministic given `config.seed`.
    """
    return sample_walks(nodes, edges, n_walks, config).as_lists()

