"""Reading a live MCP memory server (`@modelcontextprotocol/server-memory` or compatible).

Two transports, chosen by the source string:

- ``mcp+stdio:COMMAND`` spawns COMMAND (split like a shell would; leading ``NAME=VALUE`` words are
  environment variables for the server, e.g. ``mcp+stdio:MEMORY_FILE_PATH=/x/memory.jsonl npx -y
  @modelcontextprotocol/server-memory``). The server inherits this process's environment.
- ``mcp+http://HOST:PORT/PATH`` (or ``mcp+https://``) connects to a streamable-HTTP endpoint.

The graph is fetched with the server's ``read_graph`` tool. Any failure (the command is missing, the
server dies or never answers, the tool errors, the reply is not a graph) becomes one
`MemorySourceError` naming the source, with the tail of the server's stderr when there is one.

A server that never answers is given up on after a timeout covering the whole exchange (start,
initialise, `read_graph`): the `timeout_s` argument, else ``$CARL_MCP_TIMEOUT`` seconds, else 60. A
server that exits mid-read closes its stream, which fails at once instead of waiting for the timeout.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
from mcp import ClientSession, StdioServerParameters, stdio_client

from carl_assets.memory.tables import MemorySourceError
from carl_assets.project_env import env_seconds

TIMEOUT_ENV = "CARL_MCP_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
T = TypeVar("T")


def mcp_timeout_s(timeout_s: float | None = None) -> float:
    """`timeout_s` if given (must be > 0), else `$CARL_MCP_TIMEOUT` (read at call time), else 60 s."""
    if timeout_s is None:  # a bad environment value warns, naming it, and gives the default
        return env_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, positive=True)
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
    return float(timeout_s)


def parse_stdio_command(source: str) -> tuple[str, list[str], dict[str, str]]:
    """(`command`, `args`, extra `env`) from ``mcp+stdio:[NAME=VALUE ...] COMMAND [ARGS ...]``."""
    spec = source[len("mcp+stdio:") :]
    try:
        words = shlex.split(spec)
    except ValueError as exc:
        raise MemorySourceError(source, f"cannot split the command: {exc}") from exc
    env: dict[str, str] = {}
    while words and "=" in words[0] and words[0].split("=", 1)[0].isidentifier():
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    if not words:
        raise MemorySourceError(source, "no command after 'mcp+stdio:'")
    return words[0], words[1:], env


@asynccontextmanager
async def _transport(source: str, errlog: Any):
    if source.startswith("mcp+stdio:"):
        command, args, env = parse_stdio_command(source)
        params = StdioServerParameters(command=command, args=args, env={**os.environ, **env})
        async with stdio_client(params, errlog=errlog) as streams:
            yield streams[0], streams[1]
    elif source.startswith(("mcp+http://", "mcp+https://")):
        url = source[len("mcp+") :]
        try:  # mcp >= 2
            from mcp.client.streamable_http import streamable_http_client as http_client
        except ImportError:  # mcp 1.x
            from mcp.client.streamable_http import streamablehttp_client as http_client
        async with http_client(url) as streams:
            yield streams[0], streams[1]
    else:
        raise MemorySourceError(
            source, "not an MCP source (use 'mcp+stdio:COMMAND' or 'mcp+http://HOST:PORT/PATH')"
        )


def run_with_session(source: str, work: Callable[[Any], Awaitable[T]], timeout_s: float | None = None) -> T:
    """Connect to the MCP server named by `source`, initialise a session and return `await work(session)`,
    all within `timeout_s` (see `mcp_timeout_s`)."""
    timeout_s = mcp_timeout_s(timeout_s)

    async def main() -> T:
        with anyio.fail_after(timeout_s):
            async with _transport(source, errlog) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                return await work(session)

    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as errlog:
        try:
            return anyio.run(main)
        except MemorySourceError:
            raise
        except TimeoutError as exc:
            raise MemorySourceError(
                source,
                f"no answer within {timeout_s:g} s (the server hangs or is too slow; "
                f"set {TIMEOUT_ENV}=SECONDS to wait longer){_stderr_tail(errlog)}",
            ) from exc
        except Exception as exc:  # noqa: BLE001 -- any failure of the server is one clear error
            raise MemorySourceError(source, f"{_describe(exc)}{_stderr_tail(errlog)}") from exc


def _describe(exc: BaseException) -> str:
    while getattr(exc, "exceptions", None):  # task groups wrap the real error in an exception group
        exc = exc.exceptions[0]
    text = f"{type(exc).__name__}: {exc}"
    if "connection closed" in str(exc).lower():
        return f"the server closed the connection before answering (did it exit?): {text}"
    return text


def _stderr_tail(errlog: Any, limit: int = 800) -> str:
    try:
        errlog.flush()
        errlog.seek(0)
        text = errlog.read().strip()
    except (OSError, ValueError):
        return ""
    return f"; server stderr: {text[-limit:]}" if text else ""


def tool_result_json(result: Any, tool: str, keys: tuple[str, ...] = ()) -> Any:
    """The JSON payload of a `CallToolResult`: its structured content (when it has one of `keys`, if
    given: some servers wrap a plain result as `{"result": ...}`), else its first text part as JSON."""
    if getattr(result, "is_error", None) or getattr(result, "isError", None):
        texts = [getattr(c, "text", "") for c in getattr(result, "content", [])]
        raise RuntimeError(f"tool {tool!r} failed: {' '.join(texts).strip()[:500]}")
    structured = getattr(result, "structured_content", None) or getattr(result, "structuredContent", None)
    if structured and (not keys or any(k in structured for k in keys)):
        return structured
    for part in getattr(result, "content", []):
        if getattr(part, "type", None) == "text":
            try:
                return json.loads(part.text)
            except ValueError as exc:
                raise RuntimeError(
                    f"tool {tool!r} returned text that is not JSON ({exc}): {part.text[:200]!r}"
                ) from None
    raise RuntimeError(f"tool {tool!r} returned no JSON content")


async def call_tool(
    session: Any, name: str, arguments: dict[str, Any] | None = None, keys: tuple[str, ...] = ()
) -> Any:
    """Call one tool on an open session and return its JSON payload (see `tool_result_json`)."""
    return tool_result_json(await session.call_tool(name, arguments or {}), name, keys)


def read_mcp_graph(source: str, timeout_s: float | None = None) -> dict[str, Any]:
    """`{"entities": [...], "relations": [...]}` from the server's `read_graph` tool, within `timeout_s`
    (default `$CARL_MCP_TIMEOUT`, else 60 s)."""

    async def work(session: Any) -> Any:
        return await call_tool(session, "read_graph", keys=("entities", "relations"))

    graph = run_with_session(source, work, timeout_s)
    if (
        not isinstance(graph, dict)
        or not isinstance(graph.get("entities", []), list)
        or not isinstance(graph.get("relations", []), list)
    ):
        raise MemorySourceError(source, "read_graph did not return {'entities': [...], 'relations': [...]}")
    return graph
