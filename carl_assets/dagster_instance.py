"""The project's Dagster instance settings: the one place that writes `$DAGSTER_HOME/dagster.yaml`.

Both `make` (through `python -m carl_assets.dagster_instance DAGSTER_HOME`) and `carl materialize`
(`ensure_dagster_home`) call `write_dagster_yaml`, so the two ways in get the same instance:

- telemetry off (nothing leaves the machine);
- concurrency pools at op granularity with a default limit of 1. The training assets (base_model,
  dream_scenarios, sft_checkpoint, grpo_checkpoint, leworld_model) are in the pool `training`
  (carl_assets/defs/__init__.py); dagster.yaml has no per-pool limits, only `default_limit`, and
  `training` is the only pool the project declares, so its limit is 1: two runs never train at once on
  one machine's cores. Another limit: `dagster instance concurrency set training N` (stored in the
  instance, it wins over the default).

A user's existing dagster.yaml is never rewritten: top-level sections it lacks are appended as text (its
comments and order stay), and settings it has are kept even where they differ from ours; the returned
`DagsterYaml` says which is which, and the differences are logged. Nothing here imports Dagster.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from carl_assets import storage

DAGSTER_YAML = "dagster.yaml"
POOL_LIMIT = 1  # steps at once in each concurrency pool (the pools: carl_assets/defs/pools.py)

# Order matters: telemetry first, so the file reads the same as the one earlier versions wrote.
SETTINGS: dict[str, Any] = {
    "telemetry": {"enabled": False},
    "concurrency": {"pools": {"granularity": "op", "default_limit": POOL_LIMIT}},
}

logger = logging.getLogger("carl_assets.dagster_instance")


@dataclass
class DagsterYaml:
    """What `write_dagster_yaml` did: the file, whether it made it, the sections it appended and the
    user's settings it kept although they differ from the project's (dotted key: (theirs, ours))."""

    path: Path
    created: bool = False
    added: list[str] = field(default_factory=list)
    kept: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def _section_text(key: str, value: Any) -> str:
    return yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False)


def _differences(theirs: Any, ours: Any, prefix: str) -> dict[str, tuple[Any, Any]]:
    """Dotted keys where the user's mapping lacks or differs from ours (theirs is None when missing)."""
    if isinstance(ours, dict):
        if not isinstance(theirs, dict):
            return {prefix: (theirs, ours)}
        found: dict[str, tuple[Any, Any]] = {}
        for key, value in ours.items():
            found.update(_differences(theirs.get(key), value, f"{prefix}.{key}"))
        return found
    return {} if theirs == ours else {prefix: (theirs, ours)}


def write_dagster_yaml(home: str | os.PathLike[str]) -> DagsterYaml:
    """Make `<home>/dagster.yaml` with the project's settings, or add the sections an existing one lacks.

    Raises ValueError naming the file if an existing dagster.yaml is not a YAML mapping (Dagster would
    refuse it too)."""
    home = Path(home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    path = home / DAGSTER_YAML
    if not path.exists():
        text = "".join(_section_text(key, value) for key, value in SETTINGS.items())
        storage.atomic_write_text(path, text)
        return DagsterYaml(path=path, created=True, added=list(SETTINGS))

    text = path.read_text(encoding="utf-8")
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ValueError(
            f"{path} must be a YAML mapping of Dagster instance settings, found {type(loaded).__name__}"
        )

    result = DagsterYaml(path=path)
    missing = [key for key in SETTINGS if key not in loaded]
    if missing:
        # Appended as text, not re-dumped: the user's comments and key order survive.
        addition = "".join(_section_text(key, SETTINGS[key]) for key in missing)
        separator = "" if not text or text.endswith("\n") else "\n"
        storage.atomic_write_text(path, f"{text}{separator}# added by carl-assets\n{addition}")
        result.added = missing
    for key in SETTINGS:
        if key in loaded:
            result.kept.update(_differences(loaded[key], SETTINGS[key], key))
    for dotted, (theirs, ours) in result.kept.items():
        logger.warning("%s: keeping your %s = %r (the project's default is %r)", path, dotted, theirs, ours)
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m carl_assets.dagster_instance [DAGSTER_HOME]` (default `$DAGSTER_HOME`, else
    ./.dagster_home)."""
    args = sys.argv[1:] if argv is None else argv
    home = args[0] if args else os.environ.get("DAGSTER_HOME") or ".dagster_home"
    try:
        result = write_dagster_yaml(home)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if result.created:
        print(f"{result.path}: written (telemetry off, each concurrency pool limited to {POOL_LIMIT})")
    elif result.added:
        print(f"{result.path}: added {', '.join(result.added)}")
    else:
        print(f"{result.path}: exists, has every section; left as it is")
    for dotted, (theirs, ours) in result.kept.items():
        print(f"{result.path}: kept your {dotted} = {theirs!r} (project default {ours!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
