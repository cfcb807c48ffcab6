"""The project's environment: where its homes are and which memory source it reads, whatever the cwd.

`dagster dev` loads `.env` from the folder it is started in, and resolves `DAGSTER_HOME` only from the
environment; started anywhere else (`dagster dev -w /abs/path/workspace.yaml`) it would use a temporary
instance, and `CARL_HOME` would default to the wrong folder. So every Python process of the project's
virtualenv applies these defaults at start-up (`make install` puts a one-line `.pth` file in the venv
that calls `apply()`): variables already set win, then the project's `.env` (or the file named by
`$CARL_ENV_FILE`), then the project folders:

    CARL_HOME=<project>/.carl   DAGSTER_HOME=<project>/.dagster_home   CARL_MEMORY_SOURCE=sample

Relative paths in the env file are resolved against the file's folder. Nothing here imports Dagster or
torch: it runs in every interpreter of the venv.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

ENV_FILE_VAR = "CARL_ENV_FILE"
PATH_VARS = ("CARL_HOME", "DAGSTER_HOME")
MEMORY_SOURCE_VAR = "CARL_MEMORY_SOURCE"
DEFAULT_MEMORY_SOURCE = "sample"


def project_root() -> Path | None:
    """The checkout this package runs from (the folder with `workspace.yaml`), or None when installed
    as a plain wheel."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "workspace.yaml").is_file() else None


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """`KEY=VALUE` lines (optional `export `, quotes, `#` comments), as `dagster dev` reads `.env`."""
    values: dict[str, str] = {}
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.removeprefix("export ").split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def project_defaults(root: Path) -> dict[str, str]:
    return {
        "CARL_HOME": str(root / ".carl"),
        "DAGSTER_HOME": str(root / ".dagster_home"),
        MEMORY_SOURCE_VAR: DEFAULT_MEMORY_SOURCE,
    }


def resolved_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The values `apply` would add to `environ` (only variables it does not set already)."""
    environ = os.environ if environ is None else environ
    root = project_root()
    env_file = environ.get(ENV_FILE_VAR) or (str(root / ".env") if root else "")
    values: dict[str, str] = {}
    if env_file and Path(env_file).is_file():
        base = Path(env_file).resolve().parent
        for key, value in read_env_file(env_file).items():
            if key in PATH_VARS and value:
                value = str((base / Path(value).expanduser()).resolve())
            values[key] = value
    if root is not None:
        for key, value in project_defaults(root).items():
            values.setdefault(key, value)
    return {k: v for k, v in values.items() if not environ.get(k)}


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
