"""LeWorld: an addressable bit memory, small models that choose what to read and a big model that
predicts the next state from it; synthetic datasets, three training phases and evaluation.

Plain Python and torch (no Dagster): the assets in `carl_assets.defs.leworld` call these modules.
"""

from carl_assets.leworld.architecture import (
    ArtificialMemory,
    BigLeWorldModel,
    BLMConfig,
    LeWorldSystem,
    LossWeights,
    MemoryConfig,
    SLMConfig,
    SmallLeWorldModel,
    count_params,
    load_system,
    save_system,
)
from carl_assets.leworld.data import (
    DatasetSettings,
    SequenceBatch,
    StateTransitionDataset,
    generate_sequences,
    generate_splits,
)
from carl_assets.leworld.evaluation import EvaluationResult, Evaluator, evaluate
from carl_assets.leworld.populators import (
    MemoryPopulator,
    from_experience,
    random_bits,
    structured_patterns,
    text_experiences,
)
from carl_assets.leworld.sizes import ArchitectureSettings
from carl_assets.leworld.training import (
    REFERENCE_EPOCHS,
    LeWorldTrainingSettings,
    Phase1Trainer,
    Phase2Trainer,
    Phase3Trainer,
    TrainingConfig,
    train_system,
    training_config,
)

__all__ = [
    "REFERENCE_EPOCHS",
    "ArchitectureSettings",
    "ArtificialMemory",
    "BLMConfig",
    "BigLeWorldModel",
    "DatasetSettings",
    "EvaluationResult",
    "Evaluator",
    "LeWorldSystem",
    "LeWorldTrainingSettings",
    "LossWeights",
    "MemoryPopulator",
    "MemoryConfig",
    "Phase1Trainer",
    "Phase2Trainer",
    "Phase3Trainer",
    "SLMConfig",
    "SequenceBatch",
    "SmallLeWorldModel",
    "StateTransitionDataset",
    "TrainingConfig",
    "count_params",
    "evaluate",
    "from_experience",
    "generate_sequences",
    "generate_splits",
    "load_system",
    "random_bits",
    "save_system",
    "structured_patterns",
    "text_experiences",
    "train_system",
    "training_config",
]
