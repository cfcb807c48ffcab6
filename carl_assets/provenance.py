"""Provenance: the memory nodes behind a checkpoint.

Every SFT example keeps the ids of the memory nodes it was dreamed from (or asked about). Each
checkpoint version records, in the table `checkpoint_provenance`, how many of its training examples
each node seeded and which checkpoint version it started from. A checkpoint of dream cycle n started
from cycle n-1's weights, so the nodes behind it are its own plus those behind its parent, all the way
back to the base model: `nodes_behind` follows that chain.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

PROVENANCE_TABLE = "checkpoint_provenance"
PROVENANCE_COLUMNS = ["asset", "version", "node_id", "examples", "parent_asset", "parent_version"]
CHECKPOINT_ASSETS = ("sft_checkpoint", "grpo_checkpoint")


def _node_list(value: Any) -> list[str]:
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else [value]
    return [str(v) for v in (value or [])]


def provenance_rows(
    asset: str, version: str, node_ids_per_example: Iterable[Any], parents: Mapping[str, str]
) -> pd.DataFrame:
    """One row per memory node used by the examples a checkpoint was trained on (with the number of
    examples it seeded), plus the checkpoint it started from. A checkpoint trained on no node still gets
    one row (node_id None) so its parent link is kept."""
    counts = Counter(node for ids in node_ids_per_example for node in _node_list(ids))
    parent = next(((a, v) for a, v in parents.items() if a in (*CHECKPOINT_ASSETS, "base_model")), ("", ""))
    rows = [
        {
            "asset": asset,
            "version": version,
            "node_id": node,
            "examples": int(n),
            "parent_asset": parent[0],
            "parent_version": parent[1],
        }
        for node, n in sorted(counts.items())
    ]
    if not rows:
        rows = [
            {
                "asset": asset,
                "version": version,
                "node_id": None,
                "examples": 0,
                "parent_asset": parent[0],
                "parent_version": parent[1],
            }
        ]
    return pd.DataFrame(rows, columns=PROVENANCE_COLUMNS)


def nodes_behind(provenance: pd.DataFrame, asset: str, version: str) -> pd.DataFrame:
    """The memory nodes behind `asset@version`, following the chain of checkpoints it started from:
    node_id, examples (summed over the chain), checkpoints (how many versions in the chain used it)."""
    chain: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    current = (asset, version)
    while current[0] in CHECKPOINT_ASSETS and current not in seen:
        seen.add(current)
        rows = provenance[(provenance["asset"] == current[0]) & (provenance["version"] == current[1])]
        if rows.empty:
            if not chain:
                raise LookupError(f"no provenance recorded for {asset}@{version}")
            break
        chain.append(current)
        current = (str(rows["parent_asset"].iloc[0]), str(rows["parent_version"].iloc[0]))
    used = provenance[
        [(a, v) in set(chain) for a, v in zip(provenance["asset"], provenance["version"], strict=True)]
    ]
    used = used[used["node_id"].notna()]
    result = (
        used.groupby("node_id")
        .agg(examples=("examples", "sum"), checkpoints=("version", "nunique"))
        .reset_index()
        .sort_values(["examples", "node_id"], ascending=[False, True])
        .reset_index(drop=True)
    )
    result.attrs["chain"] = chain
    return result
