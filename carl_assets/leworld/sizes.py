"""The LeWorld system's sizes a user picks: defined here once, with their help texts. The leworld_model
asset's config inherits `ArchitectureSettings`; the memory, SLM and BLM configs take their defaults from it
(`models.component_configs` builds the three from the settings and the data's shapes)."""

from __future__ import annotations

from pydantic import Field

from carl_assets.settings import Settings


class ArchitectureSettings(Settings):
    """Widths and counts of the LeWorld system (the reference's SLM width was 128)."""

    slm_d_model: int = Field(default=64, description="SLM width (the reference used 128; 64 halves the "
                             "SLMs' cost at the same validation MSE here)")
    blm_d_model: int = Field(default=128, description="BLM width (hidden size of the big model)")
    n_slms: int = Field(default=3, description="number of small models (address pickers)")
    info_dim: int = Field(default=16, description="size of the BLM's info request")
    encoding_dim: int = Field(default=64, description="size of a memory read's learned encoding")
    max_read_range: int = Field(default=128, description="most words one read covers")


DEFAULT_SIZES = ArchitectureSettings()
