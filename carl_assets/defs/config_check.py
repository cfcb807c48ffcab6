"""A run config checked against the assets' config classes before Dagster sees it, one line per problem.

Dagster checks a run config's shape before a run (an unknown op or field: the whole job's schema on one
line) and builds each asset's pydantic config only when its step starts (a range or cross-field check:
two tracebacks, after the assets before it ran). `check_run_config` builds every `ops.<asset>.config`
with the asset's own config class up front and says what is wrong as `asset.field: problem`, with a
close match for a misspelt asset or field. Public Dagster API only; nothing here defines an asset.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
import typing
from collections.abc import Mapping
from typing import Any

import dagster as dg
from pydantic import BaseModel, ValidationError

RUN_CONFIG_SECTIONS = ("ops", "resources", "execution", "loggers")
OP_ENTRY_KEYS = ("config", "inputs", "outputs")

# A model-level validator's message that starts with a field ("cycles must be >= 1" or
# "DreamConfig.n_scenarios must be >= 1") is reported under that field.
_FIELD_FIRST = re.compile(r"^(?:[A-Z]\w*\.)?(?P<field>[a-z_]\w*) (?P<rest>.+)$", re.DOTALL)


def _did_you_mean(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def asset_config_class(assets_def: dg.AssetsDefinition) -> type[BaseModel] | None:
    """The pydantic class of the asset function's `config` parameter; None when the asset takes no config
    or this Dagster version does not expose the decorated function (Dagster then checks at step start)."""
    fn = getattr(getattr(getattr(assets_def, "op", None), "compute_fn", None), "decorated_fn", None)
    if fn is None or "config" not in inspect.signature(fn).parameters:
        return None
    try:
        annotation = typing.get_type_hints(fn).get("config")
    except Exception:  # an annotation that does not resolve: leave the check to Dagster
        return None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def asset_names(defs: dg.Definitions) -> set[str]:
    """The names of every asset of the graph in `defs` (the observed memory source included)."""
    return {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}


def config_classes(defs: dg.Definitions) -> dict[str, type[BaseModel] | None]:
    """Per op name of every asset in `defs`: its config class (None: none found)."""
    out: dict[str, type[BaseModel] | None] = {}
    for assets_def in defs.assets or []:
        if isinstance(assets_def, dg.AssetsDefinition) and assets_def.is_executable:
            out[assets_def.op.name] = asset_config_class(assets_def)
    return out


def _resolve_env(values: Mapping[str, Any]) -> dict[str, Any]:
    """Dagster's `{env: NAME}` values replaced by the variable's value; an unset one is left out (Dagster
    names the missing variable)."""
    out = {}
    for name, value in values.items():
        if isinstance(value, Mapping) and set(value) == {"env"}:
            if os.environ.get(str(value["env"])) is None:
                continue
            value = os.environ[str(value["env"])]
        out[str(name)] = value
    return out


def _error_line(asset: str, cls: type[BaseModel], error: Mapping[str, Any]) -> str:
    """One pydantic error as `asset.field: message (got value)`."""
    loc = ".".join(str(part) for part in error.get("loc", ()))
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if not loc:
        match = _FIELD_FIRST.match(message)
        if match and match["field"] in cls.model_fields:
            loc, message = match["field"], match["rest"]
    if error.get("type") == "extra_forbidden":
        hint = _did_you_mean(loc, cls.model_fields)
        message = f"not a setting of {asset}" + (hint or f"; its settings: {', '.join(cls.model_fields)}")
    elif loc and "got" not in message:
        value = error.get("input")
        if isinstance(value, (str, int, float, bool)) or value is None:
            message += f" (got {value!r})"
    return f"{asset}.{loc}: {message}" if loc else f"{asset}: {message}"


def check_asset_config(asset: str, cls: type[BaseModel], values: Any) -> list[str]:
    """`values` (an `ops.<asset>.config` entry) built with the asset's config class: one line per
    problem, none when it builds."""
    if values is None:
        return []
    if not isinstance(values, Mapping):
        return [f"ops.{asset}.config must be a mapping of settings, got {values!r}"]
    try:
        cls(**_resolve_env(values))
    except ValidationError as exc:
        return [_error_line(asset, cls, error) for error in exc.errors()]
    except (TypeError, ValueError) as exc:  # a validator raising outside pydantic's wrapping
        return [f"{asset}: {exc}"]
    return []


def check_run_config(defs: dg.Definitions, run_config: Mapping[str, Any]) -> list[str]:
    """What is wrong with `run_config` for the assets of `defs`, one line per problem (empty: nothing).

    Every `ops.<asset>.config` entry is checked, selected or not, because Dagster refuses a bad field of
    any op in the job's config before the run. Lines name the asset and field as the run config does:
    "unknown asset 'steering_vectorz' in the run config (did you mean 'steering_vectors'?)",
    "steering_vectors.threads: Input should be greater than or equal to 1 (got 0)". A section other
    than ops, resources, execution or loggers is named too; resources are left to Dagster."""
    if not isinstance(run_config, Mapping):
        return [f"the run config must be a mapping like {{ops: {{asset: {{config: ...}}}}}}, "
                f"got {run_config!r}"]
    lines = [f"unknown section {key!r} in the run config{_did_you_mean(str(key), RUN_CONFIG_SECTIONS)}"
             for key in run_config if key not in RUN_CONFIG_SECTIONS]
    ops = run_config.get("ops") or {}
    if not isinstance(ops, Mapping):
        return [*lines, f"ops must be a mapping of assets, got {ops!r}"]
    classes = config_classes(defs)
    graph_names = asset_names(defs)
    for asset, entry in ops.items():
        asset = str(asset)
        if asset not in classes:
            lines.append(f"asset {asset!r} takes no run config (it is observed, not materialized)"
                         if asset in graph_names else
                         f"unknown asset {asset!r} in the run config{_did_you_mean(asset, classes)}")
            continue
        if entry is None:
            continue
        if not isinstance(entry, Mapping):
            lines.append(f"ops.{asset} must be a mapping like {{config: {{...}}}}, got {entry!r}")
            continue
        lines += [f"unknown key {key!r} under ops.{asset}{_did_you_mean(str(key), OP_ENTRY_KEYS)}"
                  for key in entry if key not in OP_ENTRY_KEYS]
        cls = classes[asset]
        if cls is not None:
            lines += check_asset_config(asset, cls, entry.get("config"))
    return lines


def ignored_user_entries(user_config: Mapping[str, Any] | None, running: typing.Collection[str],
                         graph_names: typing.Collection[str]) -> list[str]:
    """The assets of the graph the user gave `ops` config for that the run does not materialize (sorted);
    names outside the graph are left to `check_run_config`."""
    ops = (user_config or {}).get("ops") if isinstance(user_config, Mapping) else None
    if not isinstance(ops, Mapping):
        return []
    return sorted(str(name) for name in ops if str(name) in graph_names and str(name) not in running)


def config_ok(defs: dg.Definitions, run_config: Mapping[str, Any], user_config: Mapping[str, Any] | None,
              running: typing.Collection[str], scope: str) -> bool:
    """What `carl materialize` says before a run, on stderr: a warning per asset the user gave config
    for that will not run (`running`: the asset names that will; `scope`: "job x" or "--select 'y'"), then
    each problem `check_run_config` finds. False when there is a problem (nothing may run)."""
    graph_names = asset_names(defs)
    for asset in ignored_user_entries(user_config, running, graph_names):
        print(f"carl materialize: config for {asset} ignored: not in {scope}", file=sys.stderr)
    problems = check_run_config(defs, run_config)
    for line in problems:
        print(f"carl materialize: {line}", file=sys.stderr)
    return not problems
