"""The code location of this project: `dg` (`[tool.dg.project]` in pyproject.toml), `dagster dev`
(workspace.yaml) and `dagster` commands in the repo root (`[tool.dagster]`) all load `defs` from here."""

from __future__ import annotations

import dagster as dg

from carl_assets.defs import build_definitions


@dg.definitions
def defs() -> dg.Definitions:
    """Every asset and check of the defs folder (`dg.load_from_defs_folder`) with the project's code versions,
    jobs, schedule, sensor, resources and executor (`carl_assets.defs.build_definitions`)."""
    return build_definitions()
