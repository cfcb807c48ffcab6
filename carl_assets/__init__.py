"""CARL asset pipeline: memory graph -> steering vectors, CARL training, dreams and LeWorld.

The science lives in plain packages by capability, with no Dagster import: `memory` (the memory
graph and its sources), `models` (loading, the offline default), `steering` (amygdala readout
vectors), `carl` (coherence maths, rewards, SFT/GRPO, the gated agent), `dreams` (the dream loop) and
`leworld`; `storage`, `plotting` and `runtime` are shared. `carl_assets.defs` is the thin Dagster
layer that mirrors them and wires them into one asset graph.
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (installed for the optional APOLLO optimizer; peft imports it) warns at import, on CPUs with
# AVX512-BF16, that the optional `kernels` package for its 4-bit CPU matmul is missing. Nothing here runs
# 4-bit kernels, and the line reads like a broken install on every command: only its errors are shown.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
