"""The old import path (docs/architecture.md, "Library packages"): `carl_assets.memory_graph` is the module
`carl_assets.memory.graph`."""

import sys

from carl_assets.memory import graph as _graph

sys.modules[__name__] = _graph
