"""One dream cycle's state, resolved once when the cycle dreams and handed downstream with its data.

A cycle is: its number, the policy that dreams (an asset and the version folder it was read from), the
noise schedule's step for that number (sampling temperature, SFT learning rate, progress), how the policy
was chosen (`start_from`: 'auto' or a rollback to '<asset>@<version>') and the run that dreamed. The
`dream_scenarios` asset resolves it and writes it as `cycle.json` into its own version folder;
`sft_dataset` copies it beside the dataset it makes from that cycle's dreams, so `sft_checkpoint` reads the
cycle of the very dataset it trains on (its start weights and learning rate), never the newest cycle some
overlapping run dreamed. No Dagster import here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

CYCLE_FILE = "cycle.json"
POLICY_ASSETS = ("grpo_checkpoint", "sft_checkpoint", "base_model")
AUTO = "auto"


class PolicyChoice(BaseModel):
    """Which policy a dream-cycle asset runs (dream_scenarios dreams with it, scorer_validation measures
    it): one setting, resolved by `parse_checkpoint` / `is_auto`."""

    start_from: str = Field(
        default=AUTO,
        description="the policy: 'auto' (the newest grpo_checkpoint, i.e. the previous cycle's, else "
        "base_model), 'base_model', or '<asset>@<version>' from artifact_versions to roll back to an "
        "earlier cycle",
    )


@dataclass(frozen=True)
class DreamCycleState:
    """What one dream cycle was, as resolved by the run that dreamed it.

    `policy_path` is the policy's version folder when it dreamed (version folders never change; one that
    has since been pruned is reported missing by `policy_folder`)."""

    cycle: int
    policy_asset: str
    policy_version: str
    policy_path: str
    temperature: float
    learning_rate: float
    schedule_progress: float
    start_from: str
    run_id: str

    def __post_init__(self) -> None:
        if self.cycle < 0:
            raise ValueError(f"cycle must be >= 0, got {self.cycle}")
        if self.policy_asset not in POLICY_ASSETS:
            raise ValueError(f"policy_asset {self.policy_asset!r} is not one of {', '.join(POLICY_ASSETS)}")
        for name in ("temperature", "learning_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}")

    @property
    def policy(self) -> str:
        """'<asset>@<version>', as the start_from settings and the logs spell a checkpoint."""
        return f"{self.policy_asset}@{self.policy_version}"

    def policy_folder(self) -> Path:
        """The dreaming policy's version folder. Raises FileNotFoundError when it is no longer kept."""
        folder = Path(self.policy_path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} is missing: {self.policy} dreamed cycle {self.cycle} but is no "
                "longer kept (raise the artifacts' keep_versions, or set start_from)"
            )
        return folder

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> DreamCycleState:
        """Parse `to_json`'s text. Raises ValueError naming the missing or unknown fields."""
        values: dict[str, Any] = json.loads(text)
        names = {f.name for f in fields(cls)}
        if set(values) != names:
            raise ValueError(
                f"not a dream cycle state: missing {sorted(names - set(values))}, "
                f"unknown {sorted(set(values) - names)}"
            )
        return cls(**values)

    def save(self, folder: Path) -> Path:
        """Write `cycle.json` into `folder` (a version folder being written); returns its path."""
        path = Path(folder) / CYCLE_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: Path) -> DreamCycleState:
        """Read a `cycle.json` file (FileNotFoundError when absent)."""
        return cls.from_json(Path(path).read_text())


def parse_checkpoint_spec(spec: str) -> tuple[str, str | None]:
    """'grpo_checkpoint@20261126T...' -> (asset, version); 'base_model' -> (asset, None).

    Raises ValueError for an asset that is not a policy (`POLICY_ASSETS`)."""
    asset, _, version = spec.strip().partition("@")
    if asset not in POLICY_ASSETS:
        raise ValueError(
            f"unknown checkpoint {spec!r}: use 'auto', one of {', '.join(POLICY_ASSETS)}, "
            "or '<asset>@<version>' (see the artifact_versions table)"
        )
    return asset, (version or None)


def is_auto(spec: str) -> bool:
    """Whether a start_from setting leaves the choice to the cycle ('' or 'auto')."""
    return spec.strip() in ("", AUTO)


def next_cycle(configured: int, last: int | None) -> int:
    """This cycle's number: as configured when >= 0, else one after the last recorded (0 when none)."""
    if configured >= 0:
        return configured
    return 0 if last is None else last + 1
