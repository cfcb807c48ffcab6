"""The base of every library config: a frozen pydantic model that refuses unknown fields.

A library config defines each of its settings once, with its default and its help text; the Dagster config
of the asset that uses it inherits the class (Dagster 1.13 does not nest a plain pydantic field, so the
fields stay flat in the YAML and the launchpad), and the asset hands the values back with
`carl_assets.defs.common.library_config`. No Dagster import here.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict

# A field marked `Field(..., json_schema_extra=PERFORMANCE_ONLY)` changes how fast its asset runs, not what
# it makes: the Dagster layer leaves it out of the asset's data version (`defs.common.config_values`).
PERFORMANCE_ONLY = {"performance_only": True}


class Settings(BaseModel):
    """Base of the library's configs: unknown fields are errors, values are fixed once made, choices are
    stored as their plain string values (JSON, metadata)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=True)

    @classmethod
    def overridden(cls, settings: BaseModel | None = None, **overrides: Any) -> Self:
        """`settings` (default: this class's defaults) read as this class, with `overrides` in place of its
        values: how a library function takes a settings object and keyword overrides of single fields.
        Raises pydantic's ValidationError (a ValueError) for an unknown field or a bad value."""
        return cls.model_validate({**(dict(settings) if settings is not None else {}), **overrides})
