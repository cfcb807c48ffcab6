"""The base of every library config: a frozen pydantic model that refuses unknown fields.

A library config defines each of its settings once, with its default and its help text; the Dagster config
of the asset that uses it inherits the class (Dagster 1.13 does not nest a plain pydantic field, so the
fields stay flat in the YAML and the launchpad), and the asset hands the values back with
`carl_assets.defs.common.library_config`. No Dagster import here.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# A field marked `Field(..., json_schema_extra=PERFORMANCE_ONLY)` changes how fast its asset runs, not what
# it makes: the Dagster layer leaves it out of the asset's data version (`defs.common.config_values`).
PERFORMANCE_ONLY = {"performance_only": True}


class Settings(BaseModel):
    """Base of the library's configs: unknown fields are errors, values are fixed once made, choices are
    stored as their plain string values (JSON, metadata)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=True)
