"""The Dagster layer: assets per group, resources, checks, jobs, schedules and sensors.

Each asset module mirrors a library package (`memory`, `models`, `steering`, `dreams`, `carl`, `leworld`):
it declares the inputs it reads, calls the library, writes storage and returns metadata. This package is
the project's dg defs folder (`[tool.dg]` in pyproject.toml): `dg.load_from_defs_folder` finds every asset
and asset check defined at the top of its modules (every module here counts: two objects with one asset
key fail the load; a module re-exporting another's asset is fine), and `build_definitions(home)` adds what
is project-wide (code versions, jobs, schedule, sensor, resources on `home`, executor). It is the one way
the Definitions are made: carl_assets/definitions.py (`dg`, `dagster dev`), `carl materialize` / `carl
lineage` and the tests (with their own homes) all call it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import dagster as dg

# The observable source asset and a few parameters used here are marked beta; the warnings say nothing a
# user of this project can act on.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

from carl_assets.defs.jobs import build_jobs_schedules_sensors  # noqa: E402
from carl_assets.defs.resources import build_resources  # noqa: E402

# Bump an asset's code version when its code changes what it makes: Dagster then marks it (and what is
# downstream) stale. One table, so a change is one line in review.
CODE_VERSIONS = {
    "memory_graph": "4",
    "emotion_tags": "2",
    "emotion_training_pairs": "3",
    "base_model": "4",
    "steering_vectors": "3",
    "dream_scenarios": "4",
    "scorer_validation": "3",
    "sft_dataset": "4",
    "sft_checkpoint": "4",
    "crystallization_events": "3",
    "grpo_checkpoint": "4",
    "agent_evaluation": "4",
    "leworld_memory": "2",
    "leworld_dataset": "3",
    "leworld_model": "3",
    "leworld_evaluation": "2",
}

# Steps run in their own processes (so the LeWorld and CARL branches overlap), forked from a server that
# has already imported torch, transformers and the library: a step starts in well under a second instead
# of re-importing torch (15-20 s per step on a small CPU).
PRELOADED = ["torch", "transformers", "trl", "datasets", "carl_assets.defs"]
EXECUTOR = dg.multiprocess_executor.configured(
    {"max_concurrent": 2, "start_method": {"forkserver": {"preload_modules": PRELOADED}}},
    name="carl_multiprocess",
)


def _with_code_version(spec: dg.AssetSpec) -> dg.AssetSpec:
    name = spec.key.to_user_string()
    if name not in CODE_VERSIONS:
        raise KeyError(f"asset {name!r} has no entry in CODE_VERSIONS (carl_assets/defs/__init__.py)")
    return spec.replace_attributes(code_version=CODE_VERSIONS[name])


def _found_in_defs_folder() -> tuple[list, list]:
    """The assets and asset checks at the top of the modules of this folder, each once (a module that
    imports another's asset holds the same object)."""
    found = dg.load_from_defs_folder(path_within_project=Path(__file__).resolve().parent)
    assets = list({id(a): a for a in found.assets or []}.values())
    checks = list({id(c): c for c in found.asset_checks or []}.values())
    return assets, checks


def build_definitions(home: str | os.PathLike[str] | None = None) -> dg.Definitions:
    """The project's one `Definitions`: every asset and check of this folder with its code version from
    `CODE_VERSIONS`, the jobs, schedule and sensor, the resources on `home` (None: `$CARL_HOME`, else the
    project's .carl) and the preloading multiprocess executor. Raises KeyError for an asset missing
    from `CODE_VERSIONS`."""
    found, checks = _found_in_defs_folder()
    # A source asset is observed, not computed: its version is its data version; it has no code version.
    assets = [a if isinstance(a, dg.SourceAsset) else a.map_asset_specs(_with_code_version) for a in found]
    names = [key.to_user_string() for a in assets
             for key in getattr(a, "keys", [getattr(a, "key", None)]) if key]
    jobs, schedules, sensors = build_jobs_schedules_sensors(names)
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        schedules=schedules,
        sensors=sensors,
        resources=build_resources(home),
        executor=EXECUTOR,
    )
