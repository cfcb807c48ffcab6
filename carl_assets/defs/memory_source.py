"""The memory source as an observable source asset, and the one way it is observed.

The observable asset (the UI's 'Observe sources'), `carl materialize` (before its run) and the
memory_graph_changed sensor all record the same observation: `memory_source_observation`.
"""

from typing import Any

import dagster as dg

from carl_assets.defs.resources import MemorySource
from carl_assets.memory.fingerprint import SourceFingerprint, source_fingerprint

MEMORY_SOURCE_KEY = dg.AssetKey("memory_source")


def fingerprint_metadata(fingerprint: SourceFingerprint) -> dict[str, Any]:
    """The observation's metadata: the source, its kind, the fingerprint and what it was computed from."""
    return {
        "source": fingerprint.source,
        "source_kind": fingerprint.kind,
        "fingerprint": fingerprint.version,
        **{f"source_{k}": v for k, v in fingerprint.details.items()},
    }


def memory_source_observation(source: str) -> tuple[str, dg.AssetObservation]:
    """(fingerprint, an observation of `memory_source` whose data version is that fingerprint) for the
    memory source string `source` ('sample', 'jsonl:PATH', 'mcp+...'). Raises
    `carl_assets.memory.graph.MemorySourceError` when the source cannot be read."""
    fingerprint = source_fingerprint(source)
    observation = dg.AssetObservation(
        asset_key=MEMORY_SOURCE_KEY,
        tags={"dagster/data_version": fingerprint.version},
        metadata=fingerprint_metadata(fingerprint),
    )
    return fingerprint.version, observation


@dg.observable_source_asset(
    name="memory_source",
    group_name="memory",
    description="The memory source the project reads ($CARL_MEMORY_SOURCE): its data version is the "
    "source's fingerprint (a file: size, mtime and a hash of its tail; a live MCP server: counts and a hash "
    "of the graph). Observed by the memory_graph_changed sensor, or by 'Observe sources' in the UI.",
)
def memory_source(memory_source: MemorySource) -> dg.ObserveResult:
    version, observation = memory_source_observation(memory_source.resolved)
    return dg.ObserveResult(data_version=dg.DataVersion(version), metadata=observation.metadata)
