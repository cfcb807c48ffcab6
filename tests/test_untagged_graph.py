"""The whole graph on a memory file like most users have (issue 13): no emotion tag line, no reflection or
lesson node, kinds project/person/paper/concept, some observations as {"text", "timestamp"} objects and a
few relations to entities the file never created (tests/data/untagged_memory.jsonl, written by
tests/data/make_untagged_memory.py). `carl materialize` runs every asset and check, as the `carl_all` job
does, with the offline model on CPU and small budgets: it must be green, with steering skipped for a
stated reason and dreams started from the graph's own kinds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from carl_assets import storage
from carl_assets.defs.presets import merge_run_config
from tests.tiny_run import TINY as SHARED_TINY
from tests.tiny_run import TINY_BASE_MODEL

ROOT = Path(__file__).resolve().parents[1]
MEMORY = ROOT / "tests" / "data" / "untagged_memory.jsonl"

# The shared small budgets (tests/tiny_run.py), plus: untagged stays untagged (steering must skip), and a
# small scorer validation.
TINY = merge_run_config(
    SHARED_TINY,
    {
        "ops": {
            "emotion_tags": {"config": {"tagger": "off"}},
            "scorer_validation": {
                "config": {"n_prompts": 2, "max_tokens": 4, "hot_samples": 1, "n_bootstrap": 50}
            },
        }
    },
)


def _entities() -> list[dict]:
    records = [json.loads(line) for line in MEMORY.read_text(encoding="utf-8").splitlines()]
    return [r for r in records if r["type"] == "entity"]


def test_the_fixture_is_what_the_slow_test_claims():
    """Checked fast, so that a regenerated file cannot quietly stop testing the untagged case."""
    from tests.data.make_untagged_memory import build

    records = [json.loads(line) for line in MEMORY.read_text(encoding="utf-8").splitlines()]
    assert records == build()  # the committed file is the script's output
    entities = _entities()
    kinds = {e["entityType"] for e in entities}
    assert len(entities) >= 100 and kinds == {"project", "person", "paper", "concept"}
    observations = [o for e in entities for o in e["observations"]]
    assert any(isinstance(o, dict) and {"text", "timestamp"} <= set(o) for o in observations)
    assert any(isinstance(o, str) for o in observations)
    names = {e["name"] for e in entities}
    dangling = [r for r in records if r["type"] == "relation" and r["to"] not in names]
    assert 1 <= len(dangling) <= 10
    # no tag line anywhere: nothing of the form `word:score`
    from re import fullmatch

    texts = [o["text"] if isinstance(o, dict) else o for o in observations]
    assert not [t for t in texts if fullmatch(r"(\s*[a-z]+\s*:\s*\d{1,2}\s*,?)+", t)]


def _metadata(instance: dg.DagsterInstance, asset: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    assert event is not None and event.asset_materialization is not None, f"{asset} was not materialized"
    return {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}


@pytest.mark.slow
def test_whole_graph_is_green_on_an_untagged_file(tmp_path):
    home, dagster_home = tmp_path / "carl", tmp_path / "dagster"
    env = {
        **os.environ,
        "CARL_HOME": str(home),
        "DAGSTER_HOME": str(dagster_home),
        "CARL_MEMORY_SOURCE": f"jsonl:{MEMORY}",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run = subprocess.run(
        [sys.executable, "-m", "carl_assets.cli", "materialize", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    summary = run.stdout[run.stdout.find("asset ") :]
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "FAILED" not in summary and "asset checks:" in summary, summary

    db = home / storage.DATABASE_NAME
    nodes = storage.read_table(db, "memory_nodes")
    real = nodes[~nodes["is_stub"].astype(bool)] if "is_stub" in nodes.columns else nodes
    assert len(real) == len(_entities())
    assert not set(real["kind"]) & {"reflection", "lesson"}

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        pairs = _metadata(instance, "emotion_training_pairs")
        steering = _metadata(instance, "steering_vectors")
        dreams = _metadata(instance, "dream_scenarios")
        for asset in ("sft_checkpoint", "crystallization_events", "grpo_checkpoint", "agent_evaluation"):
            _metadata(instance, asset)  # materialized, not skipped

    # untagged: no pairs, and steering says why it skipped (what it read and what to add)
    assert int(pairs["rows"]) == 0 and "tag" in pairs["empty_reason"]
    assert int(steering["concepts"]) == 0 and "emotion_tags.tagger" in steering["skipped_reason"], steering

    # dreams start from the graph's own kinds: the most populous ones (people 35, projects and papers
    # 30 each, tied; concepts 25 are not needed to cover half the nodes)
    assert sorted(dreams["conditioning_kinds"]) == ["paper", "person", "project"]
    assert dreams["kept"] >= 1


CASES = ROOT / "tests" / "data" / "dreams_default_kinds"  # ../shared/cases/memory-files/real-10
BASE = TINY_BASE_MODEL
DREAMS = {"n_scenarios": 4, "responses_per_scenario": 2, "max_new_tokens": 6, "excerpt_chars": 40}


@pytest.mark.slow
def test_dream_asset_on_the_real_10_graphs(tmp_path):
    """real-10: a graph with one lesson dreamed "0/0 scenarios" and failed the blocking check without a
    reason; a graph without lessons failed without naming the config field."""
    from carl_assets.defs import dreams, memory, models
    from carl_assets.defs.resources import build_resources
    from tests.upstreams import with_upstreams

    def run(case: str, home: Path, **dream_config):
        config = {
            "ops": {
                "memory_graph": {"config": {"source": f"jsonl:{CASES / case}"}},
                "base_model": {"config": BASE},
                "dream_scenarios": {"config": {**DREAMS, **dream_config}},
            }
        }
        return dg.materialize(
            with_upstreams(memory.memory_graph, models.base_model, dreams.dream_scenarios),
            resources=build_resources(home),
            run_config=config,
            raise_on_error=False,
        )

    # one lesson: auto kinds are the lesson plus the populous kinds; all 8 held-out scenarios fit
    result = run("memory_one_lesson.jsonl", tmp_path / "one")
    assert result.success
    cycle = storage.read_table(tmp_path / "one" / storage.DATABASE_NAME, "dream_cycles").iloc[-1]
    assert json.loads(cycle["conditioning_kinds"]) == ["lesson", "person", "task", "topic"]
    assert cycle["dreams"] == 4 and cycle["heldout_scenarios"] == 8

    # kinds set to the lesson alone: 3 possible scenarios, so none is held out and all 3 are dreamed
    result = run("memory_one_lesson.jsonl", tmp_path / "lesson", conditioning_kinds=["lesson"])
    assert result.success
    cycle = storage.read_table(tmp_path / "lesson" / storage.DATABASE_NAME, "dream_cycles").iloc[-1]
    assert (cycle["dreams"], cycle["heldout_scenarios"], cycle["scenario_pool"]) == (3, 0, 3)
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["dreams_kept_something"] is True and all(checks.values())

    # kinds the graph does not have: the asset fails naming the field and the kinds present
    result = run("memory_no_lesson.jsonl", tmp_path / "none", conditioning_kinds=["reflection"])
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure and e.step_key == "dream_scenarios")
    message = str(failure.step_failure_data.user_failure_data.description)
    assert "dream_scenarios.conditioning_kinds" in message
    assert "{'person': 6, 'project': 6, 'task': 6, 'topic': 6}" in message


def test_agent_tasks_on_an_untagged_graph_ask_for_the_kind():
    """No node has feelings to ask about: the held-out agent tasks ask for each node's kind instead, never
    about a stub (its text is only its name)."""
    from carl_assets.carl.sft_data import SFTDataConfig, build_sft_examples
    from carl_assets.memory_graph import load_graph

    nodes = load_graph(f"jsonl:{MEMORY}").nodes
    examples, tasks = build_sft_examples(nodes, SFTDataConfig(max_examples=8, holdout_tasks=4))
    assert len(examples) == 8 and len(tasks) == 4 and set(tasks["task"]) == {"kind"}
    kind_of = dict(zip(nodes["node_id"], nodes["kind"], strict=True))
    assert all(row.expected == f"A {kind_of[row.node_id]}." for row in tasks.itertuples())
    stubs = set(nodes.loc[nodes["is_stub"].astype(bool), "node_id"]) if "is_stub" in nodes.columns else set()
    assert not stubs & (set(tasks["node_id"]) | set(examples["node_id"]))
