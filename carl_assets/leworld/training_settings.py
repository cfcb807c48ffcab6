"""The settings of LeWorld's three training phases: `LeWorldTrainingSettings`, what a user picks (the
leworld_model asset's config inherits it, so each setting is defined here once), and `TrainingConfig`,
everything `training.train_system` reads (the settings, per-phase batch sizes, the data's shapes and the
reference's fixed optimisation constants), built from the settings by `training_config`."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from carl_assets.leworld.architecture import LossWeights
from carl_assets.leworld.data import SequenceBatch
from carl_assets.settings import Settings

# "seed": the earlier name of "reference", still accepted so saved configs load
InfoUtility = Literal["reinforce", "reference", "seed"]
INFO_UTILITIES = get_args(InfoUtility)
# The reference's schedule (its TrainingConfig's epochs); the defaults below fit a minute on a 2-core CPU.
REFERENCE_EPOCHS = {"phase1_epochs": 50, "phase2_epochs": 100, "phase3_epochs": 50}
PHASE_BATCH_SIZES = ("phase1_batch_size", "phase2_batch_size", "phase3_batch_size")


class LeWorldTrainingSettings(Settings):
    """The training settings a user picks (the leworld_model asset's config inherits this class, so each is
    defined here only). The epochs are the asset's (3/2/1), not the reference's 50/100/50
    (`REFERENCE_EPOCHS`). Raises ValueError (pydantic's ValidationError) for an unknown `info_utility`."""

    phase1_epochs: int = Field(
        default=3, description="phase 1 epochs (SLMs and BLM pre-trained apart), per replicate")
    phase2_epochs: int = Field(default=2, description="phase 2 epochs (end to end), per replicate (4 before "
                               "the multi-seed comparison: halved to keep 3 seeds × 2 variants affordable)")
    phase3_epochs: int = Field(
        default=1, description="phase 3 epochs (info-request refinement), per replicate (was 2)")
    batch_size: int = Field(default=32, description="sequences per batch in every phase")
    phase1_lr: float = Field(default=1e-3, description="phase 1 learning rate")
    phase2_lr: float = Field(default=3e-4, description="phase 2 learning rate (cosine warm restarts)")
    phase3_lr: float = Field(default=1e-4, description="phase 3 learning rate of the info-request group (the "
                             "reference's groups: SLMs and the rest of the BLM ×0.1, memory encoder ×0.01)")
    info_utility: InfoUtility = Field(
        default="reinforce",
        description="phase 3's information-utility term: 'reinforce' (REINFORCE on the BLM's decision to "
        "send its info request, reward = the improvement over the branch without it) or 'reference' (the "
        "reference's detached form, which has no gradient: documented, inert; 'seed' is its earlier name)",
    )
    lambda_info_util: float = Field(default=0.1,
                                    description="weight λ of phase 3's information-utility term")
    seed: int = Field(
        default=0, description="seed of the primary model (initialisation, batch order, phase 3 draws)")

    @field_validator("info_utility", mode="before")
    @classmethod
    def _known_utility(cls, value: Any) -> Any:
        if value not in INFO_UTILITIES:
            raise ValueError(f"info_utility must be one of {INFO_UTILITIES}, got {value!r}")
        return value


class TrainingConfig(LeWorldTrainingSettings):
    """Everything `train_system` reads: the settings, each phase's batch size (None: `batch_size`), the
    data's shapes (recorded only) and the reference's fixed optimisation constants."""

    phase1_batch_size: int | None = Field(default=None, description="phase 1 batch size; None: batch_size")
    phase2_batch_size: int | None = Field(default=None, description="phase 2 batch size; None: batch_size")
    phase3_batch_size: int | None = Field(default=None, description="phase 3 batch size; None: batch_size")
    phase2_warmup_steps: int = Field(default=500, description="kept from the reference, which never used it")
    weight_decay: float = Field(default=0.01, description="AdamW weight decay of every phase")
    grad_clip: float = Field(default=1.0, description="gradient norm clip of every step")
    state_dim: int | None = Field(
        default=None, description="the data's state size, recorded only (None: not recorded)")
    char_dim: int | None = Field(
        default=None, description="the data's characteristics size, recorded only (None: not recorded)")
    sequence_length: int | None = Field(
        default=None, description="the data's time steps, recorded only (None: not recorded)")
    lambda_balance: float = Field(default=0.01, description="weight of the router's load-balance loss")
    lambda_diversity: float = Field(default=0.001, description="weight of the SLMs' address-diversity loss")
    lambda_entropy: float = Field(default=0.01, description="weight of the router's entropy loss")
    temp_anneal_rate: float = Field(default=3e-5, description="router temperature decay per phase 2 step")
    temp_min: float = Field(default=0.1, description="floor of the router temperature")

    @model_validator(mode="before")
    @classmethod
    def _batch_sizes(cls, values: Any) -> Any:
        """A phase batch size not given (or None) is `batch_size`."""
        if isinstance(values, dict):
            size = values.get("batch_size", cls.model_fields["batch_size"].default)
            values = {**values, **{k: size for k in PHASE_BATCH_SIZES if values.get(k) is None}}
        return values

    def loss_weights(self) -> LossWeights:
        return LossWeights(self.lambda_balance, self.lambda_diversity, self.lambda_entropy)

    def record(self) -> dict[str, Any]:
        """The values a checkpoint's config.json records, in the order it has always recorded them (the file's
        bytes are part of leworld_model's data version); `batch_size` is in the phase batch sizes."""
        return {name: getattr(self, name) for name in CHECKPOINT_RECORD}


CHECKPOINT_RECORD = (
    "phase1_lr", "phase1_epochs", "phase1_batch_size", "phase2_lr", "phase2_epochs", "phase2_batch_size",
    "phase2_warmup_steps", "phase3_lr", "phase3_epochs", "phase3_batch_size", "weight_decay", "grad_clip",
    "state_dim", "char_dim", "sequence_length", "lambda_balance", "lambda_diversity", "lambda_entropy",
    "lambda_info_util", "temp_anneal_rate", "temp_min", "seed", "info_utility",
)


def training_config(settings: LeWorldTrainingSettings, train: SequenceBatch) -> TrainingConfig:
    """The full `TrainingConfig` of `settings`: every phase batches `settings.batch_size` sequences; the
    shapes recorded are `train`'s (states `[N, T, state_dim]`, characteristics `[N, char_dim]`)."""
    return TrainingConfig(
        **settings.model_dump(include=set(LeWorldTrainingSettings.model_fields)),
        state_dim=train.states.shape[2], char_dim=train.characteristics.shape[1],
        sequence_length=train.states.shape[1],
    )
