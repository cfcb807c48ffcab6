"""The Dagster layer: assets per group, resources, checks, jobs, schedules and sensors.

Each asset module mirrors a library package (`memory`, `models`, `steering`, `dreams`, `carl`, `leworld`):
it reads inputs from storage, calls the library, writes storage and returns metadata.
`build_definitions()` collects them into the one `Definitions` object.
"""

from __future__ import annotations

import os
import warnings

import dagster as dg

# The observable source asset and a few parameters used here are marked beta; the warnings say nothing a
# user of this project can act on.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

from carl_assets.defs import (  # noqa: E402
    carl,
    dreams,
    emotion_tags,
    leworld,
    memory,
    models,
    scorer_validation,
    steering,
)
from carl_assets.defs.jobs import build_jobs_schedules_sensors  # noqa: E402
from carl_assets.defs.resources import build_resources  # noqa: E402

ASSET_MODULES = [memory, emotion_tags, models, steering, dreams, scorer_validation, carl, leworld]

# Bump an asset's code version when its code changes what it makes: Dagster then marks it (and what is
# downstream) stale. One table, so a change is one line in review.
CODE_VERSIONS = {
    "memory_graph": "3",
    "emotion_tags": "1",
    "emotion_training_pairs": "3",
    "base_model": "3",
    "steering_vectors": "2",
    "dream_scenarios": "2",
    "scorer_validation": "1",
    "sft_dataset": "3",
    "sft_checkpoint": "3",
    "crystallization_events": "2",
    "grpo_checkpoint": "3",
    "agent_evaluation": "3",
    "leworld_memory": "2",
    "leworld_dataset": "2",
    "leworld_model": "2",
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


# Concurrency pools, each limited to 1 across all runs (`concurrency: pools: default_limit: 1` in the
# project's dagster.yaml, written by carl_assets/dagster_instance.py), so two overlapping runs take turns:
# - `training`: assets that train or generate for long share one machine's cores;
# - `ledger`: crystallization_events reads its tables kept across runs, then writes them back with its
#   row added; two at once would each write back what they read, and one run's row would be lost.
TRAINING_POOL = "training"
LEDGER_POOL = "ledger"
POOLS = {
    TRAINING_POOL: frozenset({"base_model", "dream_scenarios", "scorer_validation", "sft_checkpoint",
                              "grpo_checkpoint", "leworld_model"}),
    LEDGER_POOL: frozenset({"crystallization_events"}),
}
TRAINING_ASSETS = POOLS[TRAINING_POOL]


def _in_pool(asset: dg.AssetsDefinition, pool: str) -> dg.AssetsDefinition:
    """The same asset with its op in `pool`. Dagster reads a step's pool from the op, and an asset's op
    can only be given one by its decorator; this rebuilds the op with every other property unchanged,
    the way Dagster copies ops itself, so the list of pooled assets stays in this one file."""
    op = asset.op
    if op.pool not in (None, pool):
        raise ValueError(f"asset op {op.name!r} is already in pool {op.pool!r}, not {pool!r}")
    with warnings.catch_warnings():  # `version` is the only public read of an op's code version in 1.13
        warnings.simplefilter("ignore", DeprecationWarning)
        code_version = op.version
    pooled = dg.OpDefinition(
        compute_fn=op.compute_fn,
        name=op.name,
        ins={definition.name: dg.In.from_definition(definition) for definition in op.input_defs},
        outs={definition.name: dg.Out.from_definition(definition) for definition in op.output_defs},
        description=op.description,
        config_schema=op.config_schema,
        required_resource_keys=op.required_resource_keys,
        tags=op.tags,
        retry_policy=op.retry_policy,
        code_version=code_version,
        pool=pool,
    )
    return dg.AssetsDefinition.dagster_internal_init(**{**asset.get_attributes_dict(), "node_def": pooled})


def _pooled(asset: dg.AssetsDefinition) -> dg.AssetsDefinition:
    names = {key.to_user_string() for key in asset.keys}
    pools = [pool for pool, members in POOLS.items() if names & members]
    if len(pools) > 1:
        raise ValueError(f"assets {sorted(names)} are listed in several pools {pools}: an op has one pool")
    return _in_pool(asset, pools[0]) if pools else asset


def _with_code_version(spec: dg.AssetSpec) -> dg.AssetSpec:
    name = spec.key.to_user_string()
    if name not in CODE_VERSIONS:
        raise KeyError(f"asset {name!r} has no entry in CODE_VERSIONS (carl_assets/defs/__init__.py)")
    return spec.replace_attributes(code_version=CODE_VERSIONS[name])


def build_definitions(home: str | os.PathLike[str] | None = None) -> dg.Definitions:
    loaded = dg.load_assets_from_modules(ASSET_MODULES)
    # A source asset is observed, not computed: its version is its data version; it has no code version.
    assets = [a if isinstance(a, dg.SourceAsset) else _pooled(a.map_asset_specs(_with_code_version)) for a in loaded]
    missing = frozenset().union(*POOLS.values()) - {key.to_user_string() for a in assets for key in getattr(a, "keys", [])}
    if missing:
        raise KeyError(f"POOLS names {sorted(missing)}, which are not assets (carl_assets/defs/__init__.py)")
    checks = dg.load_asset_checks_from_modules(ASSET_MODULES)
    names = [key.to_user_string() for a in assets for key in getattr(a, "keys", [getattr(a, "key", None)]) if key]
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
