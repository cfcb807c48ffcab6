"""Materialize a few assets of the graph alone: their declared upstream inputs come from storage.

An asset that reads an upstream declares it as an input (`carl_assets.defs.io_manager` hands it a handle),
and Dagster refuses to materialize it unless that upstream is in the selection. `with_upstreams` adds each
missing upstream as an external `dg.AssetSpec`: the IO manager then hands over the version already in
storage (or an empty handle, which says "materialize it first" when read), as the UI does for a partial run.
"""

from __future__ import annotations

import dagster as dg


def with_upstreams(*assets: dg.AssetsDefinition) -> list[dg.AssetsDefinition | dg.AssetSpec]:
    """`assets` plus an external spec for every upstream asset they depend on and do not include."""
    keys = {key for asset in assets for key in asset.keys}
    upstream = {dep for asset in assets for deps in asset.asset_deps.values() for dep in deps} - keys
    return [*assets, *(dg.AssetSpec(key) for key in sorted(upstream, key=lambda k: k.to_user_string()))]
