"""The Dagster layer: assets per group, resources, checks, jobs, schedules and sensors.

Each asset module reads its inputs from storage, calls the library, writes storage and returns
metadata. `build_definitions()` collects them into the one `Definitions` object.
"""

from __future__ import annotations

import os

import dagster as dg

from carl_assets.defs import carl, leworld, memory, models, steering
from carl_assets.defs.jobs import build_jobs_schedules_sensors
from carl_assets.defs.resources import build_resources

ASSET_MODULES = [memory, models, steering, carl, leworld]


def build_definitions(home: str | os.PathLike[str] | None = None) -> dg.Definitions:
    assets = dg.load_assets_from_modules(ASSET_MODULES)
    checks = dg.load_asset_checks_from_modules(ASSET_MODULES)
    jobs, schedules, sensors = build_jobs_schedules_sensors()
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        schedules=schedules,
        sensors=sensors,
        resources=build_resources(home),
    )
