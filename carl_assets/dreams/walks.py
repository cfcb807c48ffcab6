"""Sampling the latent space: random walks with restart over the memory graph.

The dream loop's "noise" is a walk through the memory graph that starts at a recent node of the
conditioning kinds and wanders along weighted edges, jumping back to its start with probability
`restart_prob` at each step. Restarts keep a walk near its seed, so the memories it collides stay
related to what is being trained; edge weights let some relations (say `reflects_on`) pull harder
than others (say `follows`).

Conditioning kinds. An explicit `conditioning_kinds` is used as given. Empty (the default) means the
graph's own, `auto_conditioning_kinds`: `reflection`/`lesson` when the graph holds at least
`MIN_PREFERRED_STARTS` (8) such nodes; otherwise the most populous kinds, from the largest down, until
they cover `POPULOUS_SHARE` (half) of the nodes (a kind tied with the last one taken is taken too), plus
any reflection/lesson nodes there are. Only non-stub nodes count (`is_stub`: an entity a relation names
but the file never created; its text is only its name).

Walk starts. Stub nodes never start a walk (walks may pass through them). Starts are the `recent_nodes`
most recent candidates: by `updated_at` (the latest observation timestamp) when the table has one with
any value, else `timestamp`/`created_at`, else file order (`source_line`); undated nodes count as older
than dated ones, ties go to the later line. With file order only, every candidate starts an equal share
of the walks. With dates, the share of a candidate dated `age` days before the newest one is
proportional to 0.5 ** (age / `recency_half_life_days`) (undated ones weigh as the oldest dated one),
and walks are dealt out by largest remainders, so the counts follow the weights to within one walk.

All walks advance together as numpy arrays: one draw for "restart?" and one for "which neighbour?"
per walk and step, the neighbour found by a binary search in the global cumulative edge weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from carl_assets.settings import Settings

# Recency columns, most preferred first; a column with no value is skipped. File order (`source_line`,
# else the row position) is the fallback and breaks ties.
RECENCY_COLUMNS = ("updated_at", "timestamp", "created_at")
PREFERRED_KINDS = ("reflection", "lesson")
MIN_PREFERRED_STARTS = 8  # fewer reflection/lesson nodes than this dream too few distinct scenes alone
POPULOUS_SHARE = 0.5  # auto kinds without enough reflection/lesson nodes: the largest covering this share


class WalkSettings(Settings):
    """How walks start and wander, as `dream_scenarios` exposes it. `conditioning_kinds` empty: the graph's
    own (`auto_conditioning_kinds`); in Python a string is also taken, as one kind ("auto" or "": empty);
    a run config gives a list.
    `recency_half_life_days` <= 0 gives every dated start an equal share. Raises ``ValueError`` (a pydantic
    ``ValidationError``) on a probability outside [0, 1], a negative length or weight, or no start."""

    restart_prob: float = Field(
        default=0.15, description="random walk: probability of jumping back to the start node at each step"
    )
    walk_length: int = Field(default=8, description="random walk: steps per walk")
    relation_weights: dict[str, float] = Field(
        default={}, description="random walk: edge weight per relation type (others weigh 1)"
    )
    conditioning_kinds: list[str] = Field(
        default=[],
        description="walks start at recent nodes of these "
        "kinds; [] (the default) means the graph's own: reflection/lesson "
        "when it has at least 8 of them, else its most populous kinds "
        "covering half its nodes (carl_assets.dreams.walks)",
    )
    recent_nodes: int = Field(
        default=64, description="walks start among this many most recent nodes of the conditioning kinds"
    )
    recency_half_life_days: float = Field(
        default=30.0,
        description="when nodes carry dates (updated_at), a "
        "start dated this many days before the newest seeds half as many "
        "walks (<= 0: equal shares; without dates shares are equal)",
    )

    @field_validator("conditioning_kinds", mode="before")
    @classmethod
    def _kinds_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # "auto", or one kind written without a list
            return [] if value in ("", "auto") else [value]
        return [str(k) for k in value] if isinstance(value, tuple | list) else value

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not 0.0 <= self.restart_prob <= 1.0:
            raise ValueError(f"restart_prob must lie in [0, 1], got {self.restart_prob}")
        if self.walk_length < 0:
            raise ValueError(f"walk_length must be >= 0, got {self.walk_length}")
        if self.recent_nodes < 1:
            raise ValueError(f"recent_nodes must be >= 1, got {self.recent_nodes}")
        if not np.isfinite(self.recency_half_life_days):
            raise ValueError(f"recency_half_life_days must be finite, got {self.recency_half_life_days}")
        _check_weights(self.relation_weights)
        return self


class WalkConfig(WalkSettings):
    """The walk settings plus what the asset does not expose: `relation_weights` maps a relation type to
    its edge weight (unknown types get `default_weight`; 0 means the walk never takes that relation);
    `directed=False` lets a walk follow an edge both ways; `seed` (the dream loop derives one per cycle
    from its own seed)."""

    default_weight: float = Field(default=1.0, description="edge weight of a relation type not weighed")
    directed: bool = Field(default=False, description="walk edges only from source to target")
    seed: int = Field(default=0, description="seed of the walks")

    @model_validator(mode="after")
    def _check_default_weight(self) -> Self:
        _check_weights({"<default_weight>": self.default_weight})
        return self


def _check_weights(weights: dict[str, float]) -> None:
    bad = {k: v for k, v in weights.items() if not np.isfinite(v) or v < 0}
    if bad:
        raise ValueError(f"edge weights must be finite and >= 0, got {bad}")


class NoWalkStartError(ValueError):
    """No node can start a walk: none of the conditioning kinds (or only stubs). `kinds` were asked
    for; `present` counts the graph's non-stub nodes per kind, most first."""

    def __init__(self, kinds: tuple[str, ...], present: dict[str, int]) -> None:
        self.kinds, self.present = kinds, present
        super().__init__(
            f"no node of the conditioning kinds {list(kinds)} can start a walk "
            f"(non-stub nodes per kind: {present})"
        )


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


def stub_mask(nodes: pd.DataFrame) -> np.ndarray:
    """[N] bool: the node is a stub (`is_stub` column; all False without one)."""
    if "is_stub" not in nodes.columns:
        return np.zeros(len(nodes), dtype=bool)
    return nodes["is_stub"].astype("boolean").fillna(False).to_numpy(dtype=bool)


def kind_counts(nodes: pd.DataFrame) -> dict[str, int]:
    """Non-stub nodes per kind, most first (ties by name)."""
    kinds = nodes["kind"].astype(str)[~stub_mask(nodes)]
    counts = kinds.value_counts()
    return {str(k): int(v) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}


def auto_conditioning_kinds(nodes: pd.DataFrame) -> tuple[str, ...]:
    """The graph's own conditioning kinds (the rule is in the module docstring): reflection/lesson when
    there are at least `MIN_PREFERRED_STARTS` of them, else the most populous kinds covering
    `POPULOUS_SHARE` of the non-stub nodes (ties taken together) plus any reflection/lesson. Empty
    only for a graph without non-stub nodes."""
    counts = kind_counts(nodes)
    preferred = tuple(k for k in PREFERRED_KINDS if k in counts)
    if sum(counts[k] for k in preferred) >= MIN_PREFERRED_STARTS:
        return preferred
    total, covered, taken = sum(counts.values()), 0, []
    for kind, count in counts.items():
        if covered >= POPULOUS_SHARE * total and count < counts[taken[-1]]:
            break
        taken.append(kind)
        covered += count
    return preferred + tuple(k for k in taken if k not in preferred)


def resolve_conditioning_kinds(nodes: pd.DataFrame, config: WalkConfig) -> tuple[str, ...]:
    """`config.conditioning_kinds` when given, else `auto_conditioning_kinds(nodes)`."""
    return tuple(config.conditioning_kinds) or auto_conditioning_kinds(nodes)


def _file_order(nodes: pd.DataFrame) -> np.ndarray:
    if "source_line" in nodes.columns:
        return nodes["source_line"].to_numpy(dtype=np.float64, na_value=-np.inf)
    return np.arange(len(nodes), dtype=np.float64)


def _as_sort_key(values: pd.Series) -> np.ndarray:
    """A float key that sorts like the column (timestamps become seconds since the epoch, whatever the
    column's time unit; missing values -inf)."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.to_numpy(dtype=np.float64, na_value=-np.inf)
    stamps = pd.to_datetime(values, errors="coerce", utc=True, format="ISO8601")
    if stamps.isna().sum() > values.isna().sum():  # not all ISO 8601: parse each value on its own (slower)
        stamps = pd.to_datetime(values, errors="coerce", utc=True, format="mixed")
    if stamps.isna().all():
        raise ValueError(f"recency column {values.name!r} is neither numeric nor parseable as timestamps")
    key = (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(dtype=np.float64, na_value=-np.inf)
    return key


def _dated_recency(nodes: pd.DataFrame) -> tuple[np.ndarray, bool] | None:
    """([N] sort key, NaN where undated; whether the key is a date in seconds) from the first recency
    column with a value, or None. A numeric column orders the nodes but is not taken for a date."""
    for column in RECENCY_COLUMNS:
        if column in nodes.columns and nodes[column].notna().any():
            values = nodes[column]
            key = _as_sort_key(values)
            key = np.where(np.isneginf(key), np.nan, key)
            return key, not pd.api.types.is_numeric_dtype(values)
    return None


def start_candidates(nodes: pd.DataFrame, config: WalkConfig) -> np.ndarray:
    """Row positions of the nodes walks may start from: the `recent_nodes` most recent non-stub nodes of
    the conditioning kinds, most recent first (order: see the module docstring).

    Raises NoWalkStartError (a ValueError) naming the kinds asked for and the kinds present."""
    kinds = resolve_conditioning_kinds(nodes, config)
    eligible = np.flatnonzero(nodes["kind"].astype(str).isin(kinds).to_numpy() & ~stub_mask(nodes))
    if eligible.size == 0:
        raise NoWalkStartError(kinds, kind_counts(nodes))
    dated = _dated_recency(nodes)
    if dated is None and "source_line" not in nodes.columns:
        raise ValueError(f"nodes need a recency column: one of {[*RECENCY_COLUMNS, 'source_line']}")
    primary = np.zeros(len(nodes)) if dated is None else np.nan_to_num(dated[0], nan=-np.inf)
    order = np.lexsort((-_file_order(nodes)[eligible], -primary[eligible]))
    return eligible[order[: config.recent_nodes]]


def start_weights(nodes: pd.DataFrame, candidates: np.ndarray, config: WalkConfig) -> np.ndarray | None:
    """[len(candidates)] shares of the walks each candidate starts (summing to 1), or None for equal
    shares (file order only, no dated candidate, or `recency_half_life_days` <= 0): a candidate dated
    `age` days before the newest weighs 0.5 ** (age / half-life); undated ones weigh as the oldest."""
    dated = _dated_recency(nodes)
    if dated is None or not dated[1] or config.recency_half_life_days <= 0:
        return None
    stamps = dated[0][candidates]
    if np.isnan(stamps).all():
        return None
    stamps = np.where(np.isnan(stamps), np.nanmin(stamps), stamps)
    age_days = (stamps.max() - stamps) / 86_400.0
    weights = 0.5 ** (age_days / config.recency_half_life_days)
    return weights / weights.sum()


def deal_starts(
    candidates: np.ndarray, weights: np.ndarray | None, n_walks: int, rng: np.random.Generator
) -> np.ndarray:
    """[n_walks] start rows. Equal shares: round-robin over a seeded shuffle of the candidates. Weighted:
    each candidate gets floor(n_walks * weight) walks, the rest go to the largest remainders, then the
    walks are shuffled."""
    if weights is None:
        return np.resize(rng.permutation(candidates), n_walks)
    exact = weights * n_walks
    counts = np.floor(exact).astype(np.int64)
    rest = n_walks - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:rest]] += 1
    return rng.permutation(np.repeat(candidates, counts))


def _adjacency(node_ids: np.ndarray, edges: pd.DataFrame, config: WalkConfig) -> _Adjacency:
    n = len(node_ids)
    index = pd.Index(node_ids)
    src = index.get_indexer(edges["src"].astype(str))
    dst = index.get_indexer(edges["dst"].astype(str))
    relation = edges["relation"].astype(str).to_numpy() if len(edges) else np.array([], dtype=str)
    weight = np.array(
        [config.relation_weights.get(r, config.default_weight) for r in relation], dtype=np.float64
    )
    keep = (src >= 0) & (dst >= 0) & (weight > 0)  # edges to nodes outside the table cannot be walked
    src, dst, weight = src[keep], dst[keep], weight[keep]
    if not config.directed:
        src, dst, weight = (
            np.concatenate([src, dst]),
            np.concatenate([dst, src]),
            np.concatenate([weight, weight]),
        )
    order = np.argsort(src, kind="stable")
    src, dst, weight = src[order], dst[order], weight[order]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=offsets[1:])
    out_weight = np.bincount(src, weights=weight, minlength=n).astype(np.float64)
    return _Adjacency(offsets, dst.astype(np.int64), np.cumsum(weight), out_weight)


def sample_walks(nodes: pd.DataFrame, edges: pd.DataFrame, n_walks: int, config: WalkConfig) -> WalkSample:
    """`n_walks` random walks with restart, as arrays (see `random_walks` for the rules).

    Start nodes are dealt by `deal_starts`: equal shares without dates, recency-weighted shares with them.
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

    starts = deal_starts(candidates, start_weights(nodes, candidates, config), n_walks, rng)
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


def random_walks(
    nodes: pd.DataFrame, edges: pd.DataFrame, n_walks: int, config: WalkConfig
) -> list[list[str]]:
    """`n_walks` random walks with restart over the memory graph, each a list of `walk_length + 1` node
    ids (the start, then one node per step).

    A walk starts at one of the `recent_nodes` most recent non-stub nodes of the conditioning kinds (the
    graph's own when `conditioning_kinds` is empty; recency and start shares: see the module docstring;
    raises NoWalkStartError when no node qualifies). At each step it jumps
    back to its start with probability `restart_prob`, else moves to a neighbour drawn in proportion
    to edge weight (`relation_weights`, `default_weight`); a node with no out-edges restarts. With
    `directed=False` an edge is walked both ways. Deterministic given `config.seed`.
    """
    return sample_walks(nodes, edges, n_walks, config).as_lists()
