"""CARL asset pipeline: memory graph -> steering vectors, CARL training, dreams and LeWorld.

The science lives in plain packages by capability, with no Dagster import: `memory` (the memory
graph and its sources), `models` (loading, the offline default), `steering` (amygdala readout
vectors), `carl` (coherence maths, rewards, SFT/GRPO, the gated agent), `dreams` (the dream loop) and
`leworld`; `storage`, `plotting` and `runtime` are shared. `carl_assets.defs` is the thin Dagster
layer that mirrors them and wires them into one asset graph.
"""

__version__ = "0.1.0"
