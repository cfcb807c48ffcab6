"""The project's environment: where its homes are, which memory source it reads, and every `CARL_*`
setting read from the user's environment, whatever the cwd and however the value was written.

`dagster dev` loads `.env` from the folder it is started in, and resolves `DAGSTER_HOME` only from the
environment; started anywhere else (`dagster dev -w /abs/path/workspace.yaml`) it would use a temporary
instance, and `CARL_HOME` would default to the wrong folder. So every Python process of the project's
virtualenv applies these defaults at start-up (`make install` puts a one-line `.pth` file in the venv
that calls `apply()`): variables already set win, then the project's `.env` (or the file named by
`$CARL_ENV_FILE`), then the project folders:

    CARL_HOME=<project>/.carl   DAGSTER_HOME=<project>/.dagster_home   CARL_MEMORY_SOURCE=sample

The `.env` file is read by python-dotenv, as `dagster dev` reads it (`export ` prefixes, quotes, `#`
comments, `${VAR}` expansion). Relative paths in it are resolved against the file's folder, `~` is
expanded. A value set in the environment is read the way a shell, a Docker env-file or a systemd unit
may leave it: surrounding whitespace and one pair of matching quotes are dropped; a value that still
cannot be used falls back to the default with a `SettingWarning` naming the variable and the value —
a setting never stops the definitions from loading. Nothing here imports Dagster or torch: it runs in
every interpreter of the venv.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from dotenv import dotenv_values

ENV_FILE_VAR = "CARL_ENV_FILE"
PATH_VARS = ("CARL_HOME", "DAGSTER_HOME")
MEMORY_SOURCE_VAR = "CARL_MEMORY_SOURCE"
DEFAULT_MEMORY_SOURCE = "sample"
MEMORY_SCHEMES = ("sample", "jsonl:", "mcp+stdio:", "mcp+http://", "mcp+https://")


class SettingWarning(UserWarning):
    """A `CARL_*` (or `DAGSTER_HOME`) value from the environment could not be used; the default is."""


def clean_value(raw: str | None) -> str:
    """`raw` without surrounding whitespace and one pair of matching surrounding quotes (`"x"`, `'x'`):
    the forms a Docker env-file, a systemd `Environment=` line or a quoted shell value leave behind."""
    value = (raw or "").strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1].strip()
    return value


def setting(name: str, environ: Mapping[str, str] | None = None) -> str:
    """The cleaned value of `name` in `environ` (default `os.environ`); "" when unset or blank."""
    return clean_value((os.environ if environ is None else environ).get(name))


def warn_setting(name: str, raw: str, expected: str, default: object) -> None:
    """Say once (per value) that `name` was ignored, what was expected and what is used instead."""
    warnings.warn(f"{name}={raw!r} ignored: expected {expected}; using the default {default!r}",
                  SettingWarning, stacklevel=3)


def env_seconds(name: str, default: float, *, positive: bool = False,
                environ: Mapping[str, str] | None = None) -> float:
    """A duration in seconds from `name`: a finite number >= 0 (> 0 with `positive`), optionally written
    with an `s` suffix (`30`, `"2.5"`, `45s`); unset means `default`, anything else warns and gives
    `default`."""
    raw = (os.environ if environ is None else environ).get(name)
    value = clean_value(raw).removesuffix("s").strip()
    if not value:
        return float(default)
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        warn_setting(name, str(raw), f"a finite number of seconds {'> 0' if positive else '>= 0'}", default)
        return float(default)
    return seconds


def env_int(name: str, default: int, *, minimum: int = 1, environ: Mapping[str, str] | None = None) -> int:
    """A whole number >= `minimum` from `name` (`300`, `"300"`, `300.0`); unset means `default`,
    anything else warns and gives `default`."""
    raw = (os.environ if environ is None else environ).get(name)
    value = clean_value(raw)
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number != int(number) or number < minimum:
        warn_setting(name, str(raw), f"a whole number >= {minimum}", default)
        return default
    return int(number)


def env_path(name: str, environ: Mapping[str, str] | None = None) -> Path | None:
    """The absolute path in `name` (`~` and `$VAR` expanded, relative to the cwd), or None when unset."""
    value = setting(name, environ)
    if not value:
        return None
    return Path(os.path.expandvars(value)).expanduser().resolve()


def memory_source_setting(environ: Mapping[str, str] | None = None) -> str:
    """`$CARL_MEMORY_SOURCE` as a source string (default 'sample'). A bare path to a file (no scheme) is
    read as `jsonl:PATH`, the only file source; an unknown scheme is passed on for the reader to name."""
    value = setting(MEMORY_SOURCE_VAR, environ)
    if not value:
        return DEFAULT_MEMORY_SOURCE
    return normalise_memory_source(value)


def normalise_memory_source(value: str) -> str:
    """`value` cleaned; a bare file path (one that exists, or ends in .json/.jsonl) becomes `jsonl:PATH`."""
    value = clean_value(value)
    if value.startswith(MEMORY_SCHEMES) or not value:
        return value
    candidate = Path(os.path.expandvars(value)).expanduser()
    if candidate.suffix.lower() in (".json", ".jsonl") or candidate.is_file():
        return f"jsonl:{candidate}"
    return value


def project_root() -> Path | None:
    """The checkout this package runs from (the folder with `workspace.yaml`), or None when installed
    as a plain wheel."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "workspace.yaml").is_file() else None


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """The `KEY=VALUE` settings of an env file, parsed by python-dotenv as `dagster dev` parses `.env`
    (`export ` prefixes, quotes, `#` comments, `${VAR}` expansion); keys without a value are left out.
    Raises `UnicodeDecodeError`/`OSError` for a file that cannot be read as UTF-8."""
    text = Path(path).read_text(encoding="utf-8")  # dotenv would replace undecodable bytes silently
    return {k: v for k, v in dotenv_values(stream=io.StringIO(text)).items() if v is not None}


def project_defaults(root: Path) -> dict[str, str]:
    return {
        "CARL_HOME": str(root / ".carl"),
        "DAGSTER_HOME": str(root / ".dagster_home"),
        MEMORY_SOURCE_VAR: DEFAULT_MEMORY_SOURCE,
    }


def _file_path(value: str, base: Path) -> str:
    return str((base / Path(os.path.expandvars(clean_value(value))).expanduser()).resolve())


def resolved_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The values `apply` would add to `environ` (only variables it does not set already), plus the
    path variables it sets in a form Dagster cannot use (quoted, `~`, relative) made absolute."""
    environ = os.environ if environ is None else environ
    root = project_root()
    env_file = clean_value(environ.get(ENV_FILE_VAR)) or (str(root / ".env") if root else "")
    values: dict[str, str] = {}
    if env_file and Path(env_file).expanduser().is_file():
        base = Path(env_file).expanduser().resolve().parent
        for key, value in read_env_file(Path(env_file).expanduser()).items():
            if key in PATH_VARS and clean_value(value):
                value = _file_path(value, base)
            values[key] = value
    if root is not None:
        for key, value in project_defaults(root).items():
            values.setdefault(key, value)
    added = {k: v for k, v in values.items() if not clean_value(environ.get(k))}
    for key in PATH_VARS:  # DAGSTER_HOME must be absolute for Dagster; both are read by several processes
        if clean_value(environ.get(key)):
            fixed = str(env_path(key, environ))
            if fixed != environ[key]:
                added[key] = fixed
    return added


def apply(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Fill in the project's defaults for unset variables; returns what was set. Never raises: it runs
    at interpreter start-up, where an error would break every command of the venv."""
    environ = os.environ if environ is None else environ
    try:
        added = resolved_env(environ)
    except Exception:  # noqa: BLE001 - an unreadable .env must not break `python`
        return {}
    environ.update(added)
    return added
