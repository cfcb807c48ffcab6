"""Run the project's real `dagster dev` in a test: start it, talk GraphQL to it, stop it for sure.

`DagsterDev` starts `.venv/bin/dagster dev -w <repo>/workspace.yaml` on a free port as its own process
group (the webserver, daemon and code servers are its children), waits until GraphQL answers and the
code location has loaded, and on `stop()` sends SIGTERM to the whole group, then SIGKILL to whatever is
left. `isolated_env` builds a child environment whose homes are all under a tmp folder, so a test never
reads the project's `.env` nor writes its `.carl` / `.dagster_home`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: dagster, carl
WORKSPACE = REPO / "workspace.yaml"
# Variables the project reads for its homes; the tests decide each of them explicitly.
PROJECT_VARS = ("CARL_HOME", "DAGSTER_HOME", "CARL_MEMORY_SOURCE", "CARL_ENV_FILE")
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DAGSTER_DISABLE_TELEMETRY": "1",
}

LOCATIONS_QUERY = """
{ workspaceOrError { __typename
    ... on Workspace { locationEntries { name loadStatus
        locationOrLoadError { __typename
          ... on RepositoryLocation { name repositories { name } }
          ... on PythonError { message stack } } } }
    ... on PythonError { message } } }
"""


class DagsterDevError(RuntimeError):
    """`dagster dev` did not start, answered an error, or a GraphQL call failed."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_dagster_yaml(dagster_home: Path) -> None:
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")


def isolated_env(**overrides: str | None) -> dict[str, str]:
    """This process's environment without the project's variables (the venv's start-up hook filled
    them from the real project), plus offline settings; `overrides` set (or, with None, drop) more."""
    env = {k: v for k, v in os.environ.items() if k not in PROJECT_VARS}
    env.update(OFFLINE)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _default_signals() -> None:
    # Processes started in the background inherit SIGINT/SIGTERM as ignored, and Python keeps an
    # ignored SIGINT ignored; `dagster dev` must see our SIGTERM to shut its children down.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"<no log: {exc}>"


class DagsterDev:
    """One `dagster dev` process group. Use as a context manager, or call `start()` / `stop()`."""

    def __init__(self, env: dict[str, str], cwd: Path, log_path: Path, startup_timeout: float = 120.0):
        self.env = env
        self.cwd = Path(cwd)
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.location: str | None = None
        self.repository: str | None = None

    def __enter__(self) -> DagsterDev:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self) -> str:
        return _tail(self.log_path)

    def start(self) -> None:
        self.launch()
        self.wait_until_loaded()

    def launch(self) -> None:
        """Start the process group without waiting (do other work, then `wait_until_loaded()`)."""
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(BIN / "dagster"), "dev", "-w", str(WORKSPACE), "-h", "127.0.0.1", "-p", str(self.port)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_default_signals,
            )

    def wait_until_loaded(self) -> None:
        """Poll GraphQL until the code location is loaded; fails fast if it failed to load or the
        process died, and with the log tail after `startup_timeout`."""
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DagsterDevError(
                    f"dagster dev exited with status {self.proc.returncode} before loading; log tail:\n"
                    + self.log_tail()
                )
            try:
                data = self.query(LOCATIONS_QUERY, timeout=5)
            except (urllib.error.URLError, ConnectionError, TimeoutError, DagsterDevError) as exc:
                last = repr(exc)
                time.sleep(0.5)
                continue
            workspace = data["workspaceOrError"]
            entries = workspace.get("locationEntries") or []
            if workspace["__typename"] == "PythonError":
                raise DagsterDevError(f"workspace failed to load: {workspace['message']}")
            for entry in entries:
                loaded = entry["locationOrLoadError"]
                if loaded and loaded["__typename"] == "PythonError":
                    raise DagsterDevError(
                        f"code location {entry['name']!r} failed to load: {loaded['message']}\n"
                        f"{loaded['stack']}"
                    )
            ready = [e for e in entries if e["loadStatus"] == "LOADED" and e["locationOrLoadError"]]
            if ready:
                location = ready[0]["locationOrLoadError"]
                self.location = location["name"]
                self.repository = location["repositories"][0]["name"]
                return
            last = f"locations: {[(e['name'], e['loadStatus']) for e in entries]}"
            time.sleep(0.5)
        raise DagsterDevError(
            f"dagster dev on {self.url} not ready after {self.startup_timeout:.0f} s ({last}); log tail:\n"
            + self.log_tail()
        )

    def query(self, document: str, variables: dict[str, Any] | None = None, timeout: float = 30) -> dict:
        """POST a GraphQL document; the `data` object, or DagsterDevError naming the GraphQL errors."""
        body = json.dumps({"query": document, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # GraphQL validation errors come back as HTTP 400
            text = exc.read().decode(errors="replace")
            try:
                payload = json.loads(text)
            except ValueError:
                raise DagsterDevError(f"GraphQL HTTP {exc.code}: {text[:2000]}") from None
        if payload.get("errors"):
            raise DagsterDevError(f"GraphQL errors: {json.dumps(payload['errors'])[:2000]}")
        return payload["data"]

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the process group, wait up to `grace` seconds for all of it to exit, then SIGKILL
        what is left. The default grace is short: test homes are temporary, and dagster dev's orderly
        shutdown takes 10-15 s on a busy 2-core box."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.proc.poll()  # reap the leader: a zombie would count as alive
            if not _group_alive(pgid):
                break
            time.sleep(0.2)
        else:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        self.proc = None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
