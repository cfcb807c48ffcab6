"""The dream cycle's state: resolved once by dream_scenarios, carried with the data, and exact when two runs'
cycles overlap (run A dreams, run B dreams and builds its dataset, then run A's SFT steps run)."""

import json

import dagster as dg
import pytest
from datasets import load_from_disk

from carl_assets import storage
from carl_assets.artifacts import ArtifactVersions
from carl_assets.defs import dreams, memory, models, sft, sft_training
from carl_assets.defs.resources import build_resources
from carl_assets.defs.sft import split_grpo_prompts
from carl_assets.dreams import sft_examples_from_dreams
from carl_assets.dreams.cycle_state import (
    CYCLE_FILE,
    DreamCycleState,
    is_auto,
    next_cycle,
    parse_checkpoint_spec,
)
from tests.tiny_run import TINY_BASE_MODEL
from tests.upstreams import with_upstreams

STATE = DreamCycleState(
    cycle=2,
    policy_asset="grpo_checkpoint",
    policy_version="20261129T000000Z-abcd1234",
    policy_path="/nowhere/grpo_checkpoint/20261129T000000Z-abcd1234",
    temperature=0.9,
    learning_rate=3e-4,
    schedule_progress=0.5,
    start_from="auto",
    run_id="run-a",
)


def test_state_round_trips_and_refuses_what_is_not_one(tmp_path):
    assert DreamCycleState.from_json(STATE.to_json()) == STATE
    assert DreamCycleState.load(STATE.save(tmp_path)) == STATE
    assert (tmp_path / CYCLE_FILE).is_file() and STATE.policy == "grpo_checkpoint@20261129T000000Z-abcd1234"
    values = json.loads(STATE.to_json())
    with pytest.raises(ValueError, match=r"missing \['run_id'\], unknown \['extra'\]"):
        DreamCycleState.from_json(
            json.dumps({**{k: v for k, v in values.items() if k != "run_id"}, "extra": 1})
        )
    with pytest.raises(ValueError, match="learning_rate must be a positive"):
        DreamCycleState(**{**values, "learning_rate": 0.0})
    with pytest.raises(ValueError, match="policy_asset 'leworld_model'"):
        DreamCycleState(**{**values, "policy_asset": "leworld_model"})
    with pytest.raises(FileNotFoundError, match="dreamed cycle 2 but is no longer kept"):
        STATE.policy_folder()


def test_cycle_numbers_and_start_specs():
    assert [next_cycle(-1, None), next_cycle(-1, 4), next_cycle(7, 4), next_cycle(0, 4)] == [0, 5, 7, 0]
    assert is_auto("") and is_auto(" auto ") and not is_auto("base_model")
    assert parse_checkpoint_spec("sft_checkpoint@v3") == ("sft_checkpoint", "v3")
    assert parse_checkpoint_spec("base_model") == ("base_model", None)
    with pytest.raises(ValueError, match="unknown checkpoint"):
        parse_checkpoint_spec("memory_graph@v1")


BASE = TINY_BASE_MODEL
DREAMS = {
    "n_scenarios": 4,
    "responses_per_scenario": 2,
    "max_new_tokens": 6,
    "heldout_scenarios": 2,
    "excerpt_chars": 40,
}
SFT = {"max_steps": 1, "batch_size": 2, "max_length": 768}


def _ops(**configs):
    return {"ops": {name: {"config": config} for name, config in configs.items()}}


def _metadata(result, asset):
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}


def _overlapping_runs(tmp_path, monkeypatch) -> tuple[dg.ExecuteInProcessResult, dict, tuple[str, str]]:
    """Run A (dreams, dataset, SFT) with run B's dreams made before A's sft_dataset step and B's dataset
    made (and current) before A's sft_checkpoint step. Returns (run A, run B's results, base versions)."""
    resources = build_resources(tmp_path)
    # two base_model versions: run B rolls back to the first, run A dreams with the current (second) one
    for _ in range(2):
        materialized = dg.materialize(
            [memory.memory_graph, models.base_model], resources=resources, run_config=_ops(base_model=BASE)
        )
        assert materialized.success
    bases = tuple(
        sorted(
            p.name for p in (tmp_path / storage.ARTIFACTS_DIR / "base_model").iterdir() if p.name[0].isdigit()
        )
    )
    run_b: dict = {}
    b_configs = {
        "dreams": (
            dreams.dream_scenarios,
            {"dream_scenarios": {**DREAMS, "start_from": f"base_model@{bases[0]}", "lr_start": 4e-3}},
        ),
        "dataset": (sft.sft_dataset, {"sft_dataset": {"holdout_tasks": 2}}),
    }

    def after(step, function):  # run B's step, once, before run A's step calls `function`
        def wrapped(*args, **kwargs):
            if step not in run_b:
                asset, configs = b_configs[step]
                run_b[step] = dg.materialize(
                    with_upstreams(asset), resources=resources, run_config=_ops(**configs)
                )
            return function(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(sft, "build_examples", after("dreams", sft.build_examples))
    monkeypatch.setattr(sft_training, "sft_start", after("dataset", sft_training.sft_start))
    run_a = dg.materialize(
        with_upstreams(dreams.dream_scenarios, sft.sft_dataset, sft_training.sft_checkpoint),
        resources=resources,
        run_config=_ops(
            dream_scenarios={**DREAMS, "lr_start": 1e-2}, sft_dataset={"holdout_tasks": 2}, sft_checkpoint=SFT
        ),
    )
    assert run_a.success and run_b["dreams"].success and run_b["dataset"].success
    return run_a, run_b, bases


def _examples_of_cycle(scenarios, cycle: int) -> set[str]:
    """The SFT example ids sft_dataset makes from one cycle's dreams (the GRPO prompts split off)."""
    examples = sft_examples_from_dreams(scenarios[scenarios["cycle"] == cycle])
    return set(split_grpo_prompts(examples, 8, "dream_id")[0]["example_id"])


@pytest.mark.slow
def test_overlapping_cycles_each_train_from_their_own_state(tmp_path, monkeypatch):
    run_a, run_b, (first_base, second_base) = _overlapping_runs(tmp_path, monkeypatch)
    art, db = tmp_path / storage.ARTIFACTS_DIR, tmp_path / storage.DATABASE_NAME
    cycles = storage.read_table(db, "dream_cycles").set_index("cycle")
    assert cycles.loc[0, "run_id"] == run_a.run_id and cycles.loc[1, "run_id"] == run_b["dreams"].run_id
    assert cycles.loc[0, "policy_version"] == second_base and cycles.loc[1, "policy_version"] == first_base
    a_lr, b_lr = float(cycles.loc[0, "learning_rate"]), float(cycles.loc[1, "learning_rate"])
    assert a_lr == pytest.approx(1e-2) and 4e-4 < b_lr < 4e-3  # cycle 0 at its start rate, B's on its way

    # when A's SFT ran, B's dreams, cycle row and dataset were the newest: A still used its own cycle
    a_dataset, b_dataset = _metadata(run_a, "sft_dataset"), _metadata(run_b["dataset"], "sft_dataset")
    assert (a_dataset["dream_cycle"], b_dataset["dream_cycle"]) == (0, 1)
    assert (art / "sft_dataset" / "current").resolve().name == b_dataset["version"] != a_dataset["version"]
    state = DreamCycleState.load(art / "sft_dataset" / a_dataset["version"] / CYCLE_FILE)
    assert (state.cycle, state.run_id, state.policy_version) == (0, run_a.run_id, second_base)
    a_dreams = ArtifactVersions(art / "dream_scenarios", "dream_scenarios").made_by(run_a.run_id)
    assert state == DreamCycleState.load(art / "dream_scenarios" / a_dreams / CYCLE_FILE)

    a_sft = _metadata(run_a, "sft_checkpoint")
    log = json.loads((art / "sft_checkpoint" / a_sft["version"] / "training_log.json").read_text())
    for record in (a_sft, log):
        assert (record["dream_cycle"], record["started_from"]) == (0, f"base_model@{second_base}")
        assert record["learning_rate"] == pytest.approx(a_lr)
    # A's SFT data are cycle 0's kept dreams only (the sft_dataset table is B's now, cycle 1's)
    scenarios = storage.read_table(db, "dream_scenarios")
    a_ids = set(load_from_disk(str(art / "sft_dataset" / a_dataset["version"] / "dataset"))["example_id"])
    assert a_ids == _examples_of_cycle(scenarios, 0) != _examples_of_cycle(scenarios, 1)
    assert set(storage.read_table(db, "sft_dataset")["example_id"]) == _examples_of_cycle(scenarios, 1)
