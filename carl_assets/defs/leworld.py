"""LeWorld assets: memory → dataset → model (three phases, with and without memory reads, over seeds) →
evaluation against the baselines and the multi-seed memory verdict.

The science lives in `carl_assets.leworld`. The assets live in two modules, collected here (the module the
definitions load): `leworld_data` (the bit memory and the sequence dataset) and `leworld_training` (the
model over seeds and its evaluation). Each asset declares the upstreams it reads as inputs and judges its
own output with `check_specs` (leworld_dataset_is_well_formed, leworld_model_is_sound,
leworld_beats_persistence).
"""

from carl_assets.defs.leworld_data import (
    GROUP,
    LeWorldDatasetConfig,
    LeWorldMemoryConfig,
    leworld_dataset,
    leworld_memory,
)
from carl_assets.defs.leworld_training import (
    LeWorldEvaluationConfig,
    LeWorldModelConfig,
    leworld_evaluation,
    leworld_model,
)

__all__ = [
    "GROUP", "LeWorldDatasetConfig", "LeWorldEvaluationConfig", "LeWorldMemoryConfig", "LeWorldModelConfig",
    "leworld_dataset", "leworld_evaluation", "leworld_memory", "leworld_model",
]
