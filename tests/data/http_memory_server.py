"""A minimal MCP memory server over streamable HTTP, for testing `mcp+http://` sources.

The npm memory server speaks stdio only, so this stands in for an HTTP deployment: it serves the
graph of a memory-server JSONL file through a `read_graph` tool, in the same shape
(`{"entities": [...], "relations": [...]}`). Usage: `python http_memory_server.py PORT JSONL_PATH`.
"""

from __future__ import annotations

import json
import sys

import uvicorn


def read_jsonl(path: str) -> dict:
    graph: dict = {"entities": [], "relations": []}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            item = json.loads(line)
            kind = item.pop("type")
            graph["entities" if kind == "entity" else "relations"].append(item)
    return graph


def main() -> None:
    port, path = int(sys.argv[1]), sys.argv[2]
    try:  # mcp >= 2
        from mcp.server.mcpserver import MCPServer as Server
    except ImportError:  # mcp 1.x
        from mcp.server.fastmcp import FastMCP as Server

    server = Server("memory-http-test")

    @server.tool(name="read_graph", description="Read the entire knowledge graph")
    def read_graph() -> dict:
        return read_jsonl(path)

    uvicorn.run(server.streamable_http_app(), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
