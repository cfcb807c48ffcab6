"""The one Dagster `Definitions` of this project; `dagster dev` loads it through workspace.yaml."""

from carl_assets.defs import build_definitions

defs = build_definitions()
