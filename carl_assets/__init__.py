"""CARL asset pipeline: memory graph -> steering vectors, CARL training, dreams and LeWorld.

The modules directly under this package are plain Python (no Dagster import) and do the science;
`carl_assets.defs` is the thin Dagster layer that wires them into one asset graph.
"""

__version__ = "0.1.0"
