"""A bare-bones MCP memory server over stdio (standard library only, so it starts in milliseconds)
that misbehaves in `read_graph`. Usage: `python raw_stdio_memory_server.py MODE [MARKER_FILE]`:

- ``hang``: answers `initialize` and `tools/list`, then never answers `tools/call`;
- ``die``: starts writing the `read_graph` reply, stops half-way and exits with status 3;
- ``garbage``: answers `read_graph` with text that is not JSON.

When `tools/call` arrives it touches MARKER_FILE (if given), so a test can tell that the failure
happened in `read_graph`, not while starting up.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TOOL = {
    "name": "read_graph",
    "description": "Read the entire knowledge graph",
    "inputSchema": {"type": "object", "properties": {}},
}


def reply(request_id: object, result: dict) -> None:
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": request_id, "result": result}) + "\n")
    sys.stdout.flush()


def main() -> None:
    mode = sys.argv[1]
    marker = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    for line in sys.stdin:
        message = json.loads(line)
        method, request_id = message.get("method"), message.get("id")
        if method == "initialize":
            reply(
                request_id,
                {
                    "protocolVersion": message["params"]["protocolVersion"],
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "raw-memory", "version": "0"},
                },
            )
        elif method == "tools/list":
            reply(request_id, {"tools": [TOOL]})
        elif method == "tools/call":
            if marker is not None:
                marker.write_text(mode)
            if mode == "die":
                whole = json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": request_id,
                        "result": {"content": [{"type": "text", "text": '{"entities": []}'}]},
                    }
                )
                sys.stdout.write(whole[: len(whole) // 2])  # half a reply, no newline
                sys.stdout.flush()
                print("raw-memory: killed while writing the graph", file=sys.stderr, flush=True)
                os._exit(3)
            if mode == "garbage":
                reply(request_id, {"content": [{"type": "text", "text": "this is not a graph {"}]})
            # hang: never answer
        elif request_id is not None:
            reply(request_id, {})


if __name__ == "__main__":
    main()
