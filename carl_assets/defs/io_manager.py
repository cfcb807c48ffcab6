"""The artifact store as Dagster's IO manager: a declared input arrives as a typed handle.

Assets keep writing their own version folders and tables and return `dg.MaterializeResult` (no value is
stored). A downstream asset that reads an upstream declares it, `ins={"base_model": dg.AssetIn()}`, and
receives `carl_assets.handles.Checkpoint` (etc.) naming the version this run made, else `current`:
the lineage in the UI is then every edge an asset really has.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from carl_assets.defs.artifact_store import ArtifactStore, StoreSettings
from carl_assets.handles import AssetHandle


class ArtifactIOManager(dg.ConfigurableIOManager, StoreSettings):
    """Hands each declared upstream asset to its reader as a handle (`carl_assets.handles`); stores nothing.
    Its store is the `artifacts` resource's (the same `StoreSettings`), set up for the run."""
    # Not a nested resource: Dagster's set-up of nested resources calls a deprecated API of its own.
    _store: ArtifactStore | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._store = self.store.for_run(context.run.run_id if context.run else None)

    @property
    def store(self) -> ArtifactStore:
        """The artifact store, set up for this run once the run has started."""
        return self._store or ArtifactStore(home=self.home, keep_versions=self.keep_versions)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        # Assets write their own artifacts and return MaterializeResult: there is no value to keep.
        if obj is not None:
            raise TypeError(
                f"{context.asset_key.to_user_string() if context.has_asset_key else context.name} "
                f"returned a {type(obj).__name__}: assets here write their artifacts themselves and "
                "return dg.MaterializeResult"
            )

    def load_input(self, context: dg.InputContext) -> AssetHandle:
        """The upstream asset's handle: the version the run that made this output wrote (a re-executed run
        reads its parent's), else the one this run made, else `current`."""
        if not context.has_asset_key:
            raise TypeError(f"input {context.name!r} is not an asset: only assets are read through handles")
        asset = context.asset_key.path[-1]
        upstream_run = context.upstream_output.run_id if context.upstream_output is not None else None
        return self.store.handle(asset, run_ids=(upstream_run,))
