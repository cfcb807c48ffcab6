"""Colliding memories: a few distinct nodes from one walk become one dream scenario.

A collision always holds the walk's start (a recent node of the conditioning kinds) plus one or two
other memories the walk passed through; stub nodes (named by a relation, never created: no memory of
their own) are passed through but never collided. Its `dream_id` is a short hash of the sorted node ids,
so the same set of memories is the same dream in every cycle and table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from carl_assets.dreams.walks import WalkConfig, random_walks, stub_mask

DEFAULT_SYSTEM_PROMPT = (
    "You are dreaming. Memories from your own past drift together into one scene. "
    "Stay inside the scene and answer it honestly, in your own voice."
)


@dataclass(frozen=True)
class Collision:
    """One dream scenario: its id and the memories it collides (the start node first)."""

    dream_id: str
    node_ids: tuple[str, ...]
    kinds: tuple[str, ...]
    texts: tuple[str, ...]

    @property
    def node_set(self) -> frozenset[str]:
        return frozenset(self.node_ids)


def dream_id_of(node_ids: Iterable[str]) -> str:
    """A stable short id of a set of memories (order does not matter)."""
    digest = hashlib.sha256("\x1f".join(sorted(node_ids)).encode()).hexdigest()
    return f"dream-{digest[:12]}"


def node_lookup(nodes: pd.DataFrame) -> dict[str, tuple[str, str, bool]]:
    """node_id -> (kind, text, is_stub). Raises ValueError when `nodes` lacks node_id, kind or text."""
    missing = {"node_id", "kind", "text"} - set(nodes.columns)
    if missing:
        raise ValueError(f"nodes table lacks columns {sorted(missing)}")
    ids = nodes["node_id"].astype(str).tolist()
    return dict(
        zip(
            ids,
            zip(
                nodes["kind"].astype(str).tolist(),
                nodes["text"].fillna("").astype(str).tolist(),
                stub_mask(nodes).tolist(),
                strict=True,
            ),
            strict=True,
        )
    )


def collision_of(node_ids: tuple[str, ...], lookup: dict[str, tuple[str, str, bool]]) -> Collision:
    """The scenario colliding `node_ids` (the start first), with their kinds and texts from `lookup`
    (`node_lookup`). Raises KeyError for an id `lookup` lacks."""
    return Collision(
        dream_id=dream_id_of(node_ids),
        node_ids=node_ids,
        kinds=tuple(lookup[x][0] for x in node_ids),
        texts=tuple(lookup[x][1] for x in node_ids),
    )


def collide(
    walks: Sequence[Sequence[str]],
    nodes: pd.DataFrame,
    *,
    min_memories: int,
    max_memories: int,
    seed: int = 0,
    exclude: set[frozenset[str]] | None = None,
) -> list[Collision]:
    """One collision per usable walk: the start node plus `size - 1` other distinct nodes of the walk,
    drawn uniformly, where `size` is drawn uniformly from `min_memories..max_memories` (capped at the
    walk's distinct nodes). Stub nodes (`is_stub`) are never members: a walk that starts at one is
    skipped, and the others it passed are left out before drawing.

    Walks with fewer than `min_memories` distinct non-stub nodes are skipped, as are collisions whose node
    set is in `exclude` (e.g. the held-out set) or was already produced by an earlier walk of this call (so
    `dream_id` identifies one scenario). Deterministic given `seed`.
    """
    if min_memories < 1 or max_memories < min_memories:
        raise ValueError(f"need 1 <= min_memories <= max_memories, got {min_memories}, {max_memories}")
    lookup = node_lookup(nodes)
    rng = np.random.default_rng(seed)
    seen: set[frozenset[str]] = set(exclude or ())
    out: list[Collision] = []
    for walk in walks:
        if not walk:
            continue
        distinct = list(dict.fromkeys(str(x) for x in walk))  # walk order, start first
        unknown = [x for x in distinct if x not in lookup]
        if unknown:
            raise KeyError(f"walk visits nodes missing from the nodes table: {unknown[:5]}")
        start_is_stub = lookup[distinct[0]][2]
        distinct = distinct[:1] + [x for x in distinct[1:] if not lookup[x][2]]
        # Draw before skipping, so one walk's skip does not shift the draws of the next ones.
        size = int(rng.integers(min_memories, max_memories + 1))
        order = rng.permutation(max(len(distinct) - 1, 0))
        if len(distinct) < min_memories or start_is_stub:
            continue
        size = min(size, len(distinct))
        picked = sorted(order[: size - 1].tolist())
        chosen = (distinct[0], *(distinct[1 + i] for i in picked))
        key = frozenset(chosen)
        if key in seen:
            continue
        seen.add(key)
        out.append(collision_of(chosen, lookup))
    return out


def excerpt(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars` characters at a word boundary, with an ellipsis when cut."""
    text = " ".join(text.split())
    if max_chars <= 0 or len(text) <= max_chars:
        return text if max_chars > 0 else ""
    cut = text[: max_chars - 1]
    space = cut.rfind(" ")
    if space >= max_chars // 2:  # keep whole words unless that loses half the excerpt
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"


def scenario_messages(
    collision: Collision, *, excerpt_chars: int, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
) -> list[dict[str, str]]:
    """The chat prompt of a dream: a system message (unless `system_prompt` is None or empty) and one user
    message that sets the collided memories as one scene and asks for a response in the model's words."""
    lines = [f"{len(collision.node_ids)} memories surface together in a dream:"]
    # A node's text opens with its name and kind (memory.build.node_text): no second kind label here.
    for i, text in enumerate(collision.texts, start=1):
        lines.append(f"{i}. {excerpt(text, excerpt_chars)}")
    lines.append(
        "They are one scene, happening now. What do you do, think or feel? Answer in your own words."
    )
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": "\n".join(lines)})
    return messages


def heldout_collisions(
    nodes: pd.DataFrame,
    edges: pd.DataFrame,
    n: int,
    config: WalkConfig | None = None,
    seed: int = 1_000_003,
    *,
    min_memories: int,
    max_memories: int,
) -> list[Collision]:
    """A fixed set of up to `n` novel collisions from walks with their own `seed` (the walk config's
    seed is replaced), meant never to be trained on: pass their node sets as `exclude` to the dream
    loop. Fewer than `n` come back only when the graph cannot produce more distinct ones."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    config = config or WalkConfig()
    found: list[Collision] = []
    seen: set[frozenset[str]] = set()
    for attempt in range(8):  # more walks per round until n distinct collisions are found
        walk_config = config.model_copy(update={"seed": seed + attempt})
        walks = random_walks(nodes, edges, max(2 * n, 16) * (attempt + 1), walk_config)
        sizes = {"min_memories": min_memories, "max_memories": max_memories}
        for c in collide(walks, nodes, **sizes, seed=seed + attempt, exclude=seen):
            seen.add(c.node_set)
            found.append(c)
        if len(found) >= n:
            break
    return found[:n]


HELDOUT_POOL_DIVISOR = 4  # a small pool gives at most a quarter of its scenarios to the held-out set


@dataclass(frozen=True)
class HeldoutPlan:
    """The held-out collisions, how many were asked for, and `pool`: the distinct collisions the walks
    found when looking for held-out + dreamed ones (capped at that sum)."""

    collisions: list[Collision]
    requested: int
    pool: int

    @property
    def shrunk(self) -> bool:
        return len(self.collisions) < self.requested


def plan_heldout(
    nodes: pd.DataFrame,
    edges: pd.DataFrame,
    requested: int,
    n_scenarios: int,
    config: WalkConfig | None = None,
    seed: int = 1_000_003,
    *,
    min_memories: int,
    max_memories: int,
) -> HeldoutPlan:
    """Held-out collisions sized to the graph. When the walks find at least `requested + n_scenarios`
    distinct collisions, the held-out set is `heldout_collisions(..., requested, ...)` unchanged; when
    they find fewer (a small graph, few start nodes), it shrinks to at most `pool //
    HELDOUT_POOL_DIVISOR`, so the dreams keep most of what the graph can give. A pool of 0 gives an
    empty plan: the caller says why (see `walks.kind_counts`). Raises what the walks raise
    (`NoWalkStartError` when no node can start one)."""
    if requested < 0 or n_scenarios < 0:
        raise ValueError(f"requested and n_scenarios must be >= 0, got {requested}, {n_scenarios}")
    sizes = {"min_memories": min_memories, "max_memories": max_memories}
    pool = len(heldout_collisions(nodes, edges, requested + n_scenarios, config, seed, **sizes))
    n = requested if pool >= requested + n_scenarios else min(requested, pool // HELDOUT_POOL_DIVISOR)
    return HeldoutPlan(
        collisions=heldout_collisions(nodes, edges, n, config, seed, **sizes),
        requested=requested,
        pool=pool,
    )
