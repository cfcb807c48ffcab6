"""Amygdala readout vectors and the `steering-vectors` reference loader (`reference`).

The public names of the readout (see `carl_assets.steering.vectors` for the module of each) are
importable from here.
"""

from __future__ import annotations

from carl_assets.steering import vectors
from carl_assets.steering.vectors import *  # noqa: F403 - the readout's public names, listed once there

__all__ = list(vectors.__all__)
