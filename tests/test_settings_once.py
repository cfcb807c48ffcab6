"""Each setting is defined once: a field name that two config classes define is either the same setting
written twice (a failure: it belongs in one shared class the configs inherit) or a different setting of a
different asset that shares a common word (listed below, each with what tells them apart)."""

import importlib
import inspect
import pkgutil
from collections import defaultdict

import dagster as dg
from pydantic import BaseModel

import carl_assets
import carl_assets.defs as defs_package
from carl_assets.carl.run_config import AgentSampling, GRPORunConfig, Placement, SFTRunConfig, Truncation
from carl_assets.carl.sft_data import SFTDataConfig
from carl_assets.defs.artifact_store import StoreSettings
from carl_assets.defs.dream_config import DreamScenariosConfig
from carl_assets.defs.emotion_pairs import PairsConfig
from carl_assets.defs.emotion_tags import EmotionTagsConfig
from carl_assets.defs.leworld import (
    LeWorldDatasetConfig,
    LeWorldEvaluationConfig,
    LeWorldMemoryConfig,
    LeWorldModelConfig,
)
from carl_assets.defs.models import BaseModelConfig
from carl_assets.defs.scorer_validation import ScorerValidationConfig
from carl_assets.defs.steering import SteeringConfig
from carl_assets.defs.training_config import (
    AgentEvaluationConfig,
    GRPOCheckpointConfig,
    SFTCheckpointConfig,
    SFTDatasetConfig,
    TrainerProgress,
)
from carl_assets.dreams.cycle_state import PolicyChoice
from carl_assets.dreams.loop import DreamSettings
from carl_assets.dreams.schedule import ScheduleSettings
from carl_assets.dreams.validation import ValidationSettings
from carl_assets.dreams.walks import WalkSettings
from carl_assets.leworld.data import DatasetSettings
from carl_assets.leworld.evaluation import EvaluationSettings
from carl_assets.leworld.memory import MemorySettings
from carl_assets.leworld.sizes import ArchitectureSettings
from carl_assets.leworld.training import LeWorldTrainingSettings
from carl_assets.memory.pairs import PairSettings
from carl_assets.memory.tagging import TaggerSettings
from carl_assets.models.offline import OfflineModelConfig
from carl_assets.settings import Settings
from carl_assets.steering import ReadoutConfig

# Same word, different settings: each asset's own knob, with a different meaning or unit per asset.
DIFFERENT_SETTINGS = {
    "batch_size": "texts, prompts, windows or examples per forward pass or step, per asset's own work",
    "emotions": "the emotions a tagger scores vs the emotions steering keeps",
    "excerpt_chars": "memory excerpt length in a dream prompt vs in a templated SFT prompt",
    "gate_threshold": "SFT's token-accuracy gate vs the agent's abstention gate on phi",
    "learning_rate": "the offline model's pretraining rate vs a trainer's fine-tuning rate",
    "max_length": "SFT example length vs steering text length, in tokens",
    "max_new_tokens": "dream answer length vs agent answer length",
    "min_score": "a tagger's score cut (0..10) vs the dream filter's score cut",
    "reduction": "the tagger's answer-distribution reduction vs steering's token reduction",
    "seed": "each asset's own random stream",
    "source": "the memory source (resource, and memory_graph's one-run override) vs sft_dataset's data",
    "start_from": "the policy a dream cycle runs (PolicyChoice) vs the weights SFT starts from",
    "temperature": "GRPO completion sampling vs the agent's answer sampling",
    "weight_decay": "the offline model's pretraining decay vs a trainer's fine-tuning decay",
    "state_dim": "set by LeWorld's DatasetSettings; TrainingConfig records the shape it trained on",
    "char_dim": "set by LeWorld's DatasetSettings; TrainingConfig records the shape it trained on",
}
# The shared classes the configs inherit: a field of theirs is defined there and nowhere else.
SHARED = (Placement, Truncation, PolicyChoice, StoreSettings, TrainerProgress)


def _config_classes() -> set[type]:
    """Every Dagster config and resource class of the project's definitions folder, and every library
    `Settings` class (so a Dagster config that re-declares a library setting is seen too)."""
    found: set[type] = set()
    for module_info in pkgutil.iter_modules(defs_package.__path__):
        module = importlib.import_module(f"{defs_package.__name__}.{module_info.name}")
        for value in vars(module).values():
            if (
                inspect.isclass(value)
                and issubclass(value, dg.Config | dg.ConfigurableResource | dg.ConfigurableIOManager)
                and value.__module__.startswith("carl_assets")
            ):
                found.add(value)
    for module_info in pkgutil.walk_packages(carl_assets.__path__, "carl_assets."):
        if module_info.name.startswith(("carl_assets.defs", "carl_assets.cli")):
            continue
        module = importlib.import_module(module_info.name)
        found |= {
            value for value in vars(module).values()
            if inspect.isclass(value)
            and issubclass(value, Settings)
            and value.__module__.startswith("carl_assets")
        }
    return found


def _defined_in(cls: type, name: str) -> type:
    """The class of `cls`'s MRO whose own body defines field `name`."""
    return next(base for base in cls.__mro__ if name in vars(base).get("__annotations__", {}))


def _definitions() -> dict[str, set[str]]:
    """field name -> the classes that define it (qualified names)."""
    where: dict[str, set[str]] = defaultdict(set)
    for cls in _config_classes():
        for name in cls.model_fields:
            owner = _defined_in(cls, name)
            where[name].add(f"{owner.__module__}.{owner.__qualname__}")
    return where


def test_no_setting_is_defined_twice():
    twice = {name: sorted(owners) for name, owners in _definitions().items() if len(owners) > 1}
    unexplained = {name: owners for name, owners in twice.items() if name not in DIFFERENT_SETTINGS}
    assert not unexplained, f"defined in more than one config class (share one class instead): {unexplained}"
    # A stale entry would excuse a future duplicate of that name unseen.
    assert set(DIFFERENT_SETTINGS) == set(twice)


def test_shared_fields_live_only_in_their_shared_class():
    where = _definitions()
    for shared in SHARED:
        for name in shared.model_fields:
            assert where[name] & {f"{shared.__module__}.{shared.__qualname__}"}, (shared, name)
            if name not in DIFFERENT_SETTINGS:
                assert len(where[name]) == 1, (name, sorted(where[name]))


def test_every_asset_running_a_model_inherits_placement():
    runs_a_model = {"BaseModelConfig", "SteeringConfig", "DreamScenariosConfig", "EmotionTagsConfig",
                    "ScorerValidationConfig", "SFTCheckpointConfig", "GRPOCheckpointConfig",
                    "AgentEvaluationConfig"}
    classes = {cls.__name__: cls for cls in _config_classes()}
    assert runs_a_model <= set(classes)
    assert all(issubclass(classes[name], Placement) for name in runs_a_model)


def test_the_default_is_spelled_none_and_said_so():
    """A field whose default is None says in its help what None means (the model's default, off, ...)."""
    silent = []
    for cls in _config_classes() | set(SHARED):
        for name, info in cls.model_fields.items():
            if info.default is None and "None" not in (info.description or ""):
                silent.append(f"{cls.__name__}.{name}")
    assert not silent, silent


class _PlacementOnly(dg.Config, Placement):
    pass


def test_placement_choices_are_refused_before_the_run_starts():
    """A device or precision outside the choices is a config error at launch, not a failure mid-run."""

    @dg.asset
    def runs_a_model(config: _PlacementOnly) -> None:
        return None

    for bad in ({"device": "gpu"}, {"dtype": "int8"}, {"threads": 0}):
        try:
            dg.materialize([runs_a_model], run_config={"ops": {"runs_a_model": {"config": bad}}})
        except (dg.DagsterInvalidConfigError, dg.DagsterExecutionStepExecutionError, ValueError) as error:
            text = str(error)
            assert next(iter(bad)) in text, text
        else:
            raise AssertionError(f"{bad} was accepted")
    index = {"ops": {"runs_a_model": {"config": {"device": "cuda:1"}}}}
    ok = dg.materialize([runs_a_model], run_config=index)
    assert ok.success  # an inference device index is a choice (placement fails later only if it is absent)


def test_library_mixins_carry_no_dagster():
    for shared in SHARED:
        assert issubclass(shared, BaseModel) and not issubclass(shared, dg.Config), shared


def test_asset_configs_inherit_the_library_config_they_build():
    """A Dagster config inherits the library config its asset builds (`defs.common.library_config`), and
    its own body defines none of that config's fields again (each setting once, with one default)."""
    builds = {
        SFTCheckpointConfig: [SFTRunConfig],
        GRPOCheckpointConfig: [GRPORunConfig],
        AgentEvaluationConfig: [AgentSampling],
        SteeringConfig: [ReadoutConfig],
        SFTDatasetConfig: [SFTDataConfig],
        BaseModelConfig: [OfflineModelConfig],
        DreamScenariosConfig: [DreamSettings, WalkSettings, ScheduleSettings],
        ScorerValidationConfig: [ValidationSettings],
        PairsConfig: [PairSettings],
        EmotionTagsConfig: [TaggerSettings],
        LeWorldModelConfig: [LeWorldTrainingSettings, ArchitectureSettings],
        LeWorldDatasetConfig: [DatasetSettings],
        LeWorldMemoryConfig: [MemorySettings],
        LeWorldEvaluationConfig: [EvaluationSettings],
    }
    for config, libraries in builds.items():
        own = set(vars(config).get("__annotations__", {}))
        for library in libraries:
            assert issubclass(config, library), (config.__name__, library.__name__)
            assert not issubclass(library, dg.Config), library.__name__
            again = own & set(library.model_fields)
            assert not again, f"{config.__name__} defines {sorted(again)} again ({library.__name__} has them)"
