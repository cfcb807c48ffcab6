"""`carl materialize` / `carl lineage` end to end: the whole graph with small configs in a temp home,
then a config change upstream that must make the downstream assets stale."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from carl_assets import storage
from carl_assets.defs import CODE_VERSIONS
from tests.tiny_run import TINY  # also imported from here by tests/test_concurrency.py


def carl(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "carl_assets.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )


def statuses(lineage_stdout: str) -> dict[str, str]:
    lines = lineage_stdout.splitlines()
    at = lines[0].index("status")
    return {line.split()[0]: line[at:].strip() for line in lines[1:] if line.strip()}


@pytest.mark.slow
def test_materialize_everything_then_config_change_makes_downstream_stale(tmp_path):
    env = {
        **os.environ,
        "CARL_HOME": str(tmp_path / "carl"),
        "DAGSTER_HOME": str(tmp_path / "dagster"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))

    run = carl(["materialize", "--config", str(config)], env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Outputs:" in run.stdout and "make dev" in run.stdout
    summary = run.stdout[run.stdout.index("asset ") :]
    for asset in (
        "memory_graph",
        "steering_vectors",
        "grpo_checkpoint",
        "agent_evaluation",
        "leworld_evaluation",
    ):
        assert f"{asset} " in summary and "FAILED" not in summary

    db = tmp_path / "carl" / "carl.duckdb"
    assert len(storage.read_table(db, "memory_nodes")) >= 300
    assert (
        tmp_path / "carl" / "artifacts" / "steering_vectors" / "current" / "vectors.safetensors"
    ).is_file()
    assert (tmp_path / "dagster" / "dagster.yaml").read_text().startswith("telemetry")

    lineage = carl(["lineage"], env)
    assert lineage.returncode == 0, lineage.stderr
    before = statuses(lineage.stdout)
    assert before.pop("memory_source") == "observed"  # materialize observes the source first
    assert len(before) == len(CODE_VERSIONS) and set(before.values()) == {"fresh"}, (
        lineage.stdout
    )  # every asset

    # A different pairs config is a new data version of emotion_training_pairs: steering goes stale,
    # assets that do not depend on it stay fresh.
    changed = {"ops": {"emotion_training_pairs": {"config": {"min_positive_score": 9}}}}
    config.write_text(yaml.safe_dump(changed))
    rerun = carl(["materialize", "--select", "emotion_training_pairs", "--config", str(config)], env)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    after = statuses(carl(["lineage", "steering_vectors"], env).stdout)
    assert after.pop("steering_vectors") == "stale (emotion_training_pairs changed)"
    upstream = ("memory_source", "memory_graph", "emotion_tags", "emotion_training_pairs", "base_model")
    assert {k: after.pop(k) for k in upstream} == {
        "memory_source": "observed",
        "memory_graph": "fresh",
        "emotion_tags": "fresh",
        "emotion_training_pairs": "fresh",
        "base_model": "fresh",
    }
    # everything downstream of the readout waits on it
    assert set(after) >= {"dream_scenarios", "agent_evaluation"} and set(after.values()) == {"upstream stale"}

    # a comma list selects several assets, as `dagster asset materialize --select a,b` does
    both = carl(
        ["materialize", "--select", "emotion_training_pairs,steering_vectors", "--config", str(config)], env
    )
    assert both.returncode == 0, both.stderr[-2000:]
    assert statuses(carl(["lineage", "steering_vectors"], env).stdout)["steering_vectors"] == "fresh"


def test_lineage_rejects_an_unknown_asset(tmp_path):
    env = {**os.environ, "CARL_HOME": str(tmp_path / "carl"), "DAGSTER_HOME": str(tmp_path / "dagster")}
    out = carl(["lineage", "no_such_asset"], env)
    assert out.returncode == 2
    assert "unknown asset 'no_such_asset'" in out.stderr and "Traceback" not in out.stderr


def test_materialize_names_a_missing_config_file(tmp_path):
    env = {**os.environ, "CARL_HOME": str(tmp_path / "carl"), "DAGSTER_HOME": str(tmp_path / "dagster")}
    out = carl(["materialize", "--config", str(tmp_path / "nope.yaml")], env)
    assert out.returncode != 0
    assert "nope.yaml" in out.stderr and "Traceback" not in out.stderr


def test_a_failing_check_is_printed_with_its_description_and_metadata(capsys):
    """The summary after a run names each check that did not pass, what it checks, why, and its metadata."""
    import dagster as dg

    from carl_assets.defs.pipeline_cli import _check_descriptions, _print_checks, _print_summary

    @dg.asset
    def notes():
        return 3

    @dg.asset_check(asset=notes, blocking=True, description="notes has at least five rows")
    def enough_notes():  # no annotations: `dg` is local, and this module defers annotations
        return dg.AssetCheckResult(
            passed=False,
            description="3 rows: add two notes",
            metadata={"rows": 3, "missing": dg.MetadataValue.json(["a", "b"])},
        )

    @dg.asset_check(asset=notes, description="a warning only")
    def tidy_notes():
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN, description="untidy")

    @dg.asset_check(asset=notes)
    def fine_notes():
        return dg.AssetCheckResult(passed=True)

    @dg.asset
    def broken():
        raise ValueError("broken.config must name a file")

    defs = dg.Definitions(assets=[notes], asset_checks=[enough_notes, tidy_notes, fine_notes])
    result = dg.materialize([notes, enough_notes, tidy_notes, fine_notes], raise_on_error=False)
    capsys.readouterr()  # Dagster's own log lines
    _print_checks(result, _check_descriptions(defs))
    err = capsys.readouterr().err
    assert "check notes:enough_notes FAILED (blocks what is downstream)" in err
    assert "checks: notes has at least five rows" in err and "why:    3 rows: add two notes" in err
    assert "rows: 3" in err and 'missing: ["a", "b"]' in err
    assert "check notes:tidy_notes WARNING (nothing blocked)" in err and "why:    untidy" in err
    assert "fine_notes" not in err

    with dg.instance_for_test() as instance:
        failed = dg.materialize([broken], instance=instance, raise_on_error=False)
        capsys.readouterr()
        _print_summary(instance, failed, 0.0)
    err = capsys.readouterr().err
    assert (
        "broken failed: ValueError: broken.config must name a file" in err
    )  # the cause, not Dagster's wrapper


@pytest.mark.slow
def test_materialize_on_untagged_and_empty_memory_files(tmp_path):
    """An untagged file runs green, printing the pairs check's reason; an empty file fails naming it."""
    memory = tmp_path / "memory.jsonl"
    memory.write_text(
        '{"type":"entity","name":"Pond","entityType":"place","observations":'
        '["Frogs came back to the pond once the reeds grew tall along the edge."]}\n'
    )
    env = {
        **os.environ,
        "CARL_HOME": str(tmp_path / "carl"),
        "DAGSTER_HOME": str(tmp_path / "dagster"),
        "CARL_MEMORY_SOURCE": f"jsonl:{memory}",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    run = carl(["materialize", "--select", "memory_graph,emotion_training_pairs"], env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "check emotion_training_pairs:pairs_nonempty_within_caps WARNING (nothing blocked)" in run.stderr
    assert "why:    no node carries an emotion tag line" in run.stderr and "emotion_tags.tagger" in run.stderr
    assert "warnings: pairs_nonempty_within_caps" in run.stdout

    memory.write_text("")
    empty = carl(["materialize", "--select", "memory_graph"], env)
    assert empty.returncode == 1
    assert f"memory_graph failed: cannot read memory source 'jsonl:{memory}'" in empty.stderr
    assert "Nothing was written: the last good graph stays (memory_nodes, 1 nodes)" in empty.stderr


def test_dagster_home_written_with_quotes_and_tilde_is_made_absolute(tmp_path, monkeypatch):
    from carl_assets.defs.pipeline_cli import ensure_dagster_home

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", ' "~/dagster home" ')
    home = ensure_dagster_home()
    assert home == tmp_path / "dagster home" and os.environ["DAGSTER_HOME"] == str(home)
    assert (home / "dagster.yaml").is_file()


def test_a_job_runs_under_its_own_name_with_its_own_config():
    """`carl materialize --job retraining_real` runs that job (its name in the run list), with the real
    preset's budgets it carries, the user's values laid over them, and no config for assets outside it
    (which Dagster would refuse); Dagster's own validation accepts the result."""
    import dagster as dg

    from carl_assets.defs import build_definitions
    from carl_assets.defs.pipeline_cli import PipelineUsageError, job_run, with_preset
    from carl_assets.defs.presets import REAL

    defs = build_definitions()
    own = {"ops": {"dream_scenarios": {"config": {"n_scenarios": 3}}}}
    job, config = job_run(defs, "retraining_real", own)
    assert job.name == "retraining_real"
    dreams = config["ops"]["dream_scenarios"]["config"]
    preset_dreams = REAL["ops"]["dream_scenarios"]["config"]
    assert dreams["n_scenarios"] == 3  # the user's value wins ...
    assert dreams["max_new_tokens"] == preset_dreams["max_new_tokens"]  # ... the preset fills the rest
    assert "base_model" not in config["ops"] and "steering_vectors" not in config["ops"]
    assert dg.validate_run_config(job, config)

    job, config = job_run(defs, "retraining", with_preset("real", {}))  # --job retraining --preset real
    assert job.name == "retraining"
    assert not {"base_model", "steering_vectors", "scorer_validation"} & set(config["ops"])
    assert config["ops"]["dream_scenarios"] == REAL["ops"]["dream_scenarios"]
    assert dg.validate_run_config(job, config)

    # An op the graph does not have stays, so that Dagster names the typo.
    assert "dream_scenario" in job_run(defs, "retraining", {"ops": {"dream_scenario": {}}})[1]["ops"]
    with pytest.raises(PipelineUsageError, match="unknown job 'nightly'"):
        job_run(defs, "nightly", {})


@pytest.fixture(scope="module")
def defs():
    from carl_assets.defs import build_definitions

    return build_definitions()


def _lines(defs, asset: str, values) -> list[str]:
    from carl_assets.defs.config_check import check_run_config

    return check_run_config(defs, {"ops": {asset: {"config": values}}})


def test_run_config_problems_are_one_line_each_naming_the_asset_and_field(defs):
    """The asset's own config class judges the values before Dagster does: ranges, choices, unknown
    fields and assets, each one line in the run config's own names, with a close match."""
    from carl_assets.defs.config_check import check_run_config

    assert _lines(defs, "steering_vectors", {"threads": 0}) == [
        "steering_vectors.threads: Input should be greater than or equal to 1 (got 0)"
    ]
    assert _lines(defs, "steering_vectors", {"dtype": "int8"}) == [
        "steering_vectors.dtype: Input should be 'fp32', 'bf16' or 'fp16' (got 'int8')"
    ]
    assert _lines(defs, "steering_vectors", {"layer": [3]}) == [
        "steering_vectors.layer: not a setting of steering_vectors (did you mean 'layers'?)"
    ]
    # a model-level validator's message is put under the field it starts with
    assert _lines(defs, "dream_scenarios", {"n_scenarios": 0}) == [
        "dream_scenarios.n_scenarios: must be >= 1, got 0"
    ]
    assert check_run_config(defs, {"ops": {"steering_vectorz": {"config": {}}}}) == [
        "unknown asset 'steering_vectorz' in the run config (did you mean 'steering_vectors'?)"
    ]
    assert check_run_config(defs, {"opz": {}}) == [
        "unknown section 'opz' in the run config (did you mean 'ops'?)"
    ]
    valid = {"threads": 2, "dtype": "bf16", "layers": [1, 2], "top_n_emotions": 3}
    assert _lines(defs, "steering_vectors", valid) == []
    assert check_run_config(defs, TINY) == []


def test_materialize_refuses_a_bad_config_before_anything_runs(tmp_path, monkeypatch, capsys):
    """A bad value: exit 2, one line per problem, no run in the instance and nothing under CARL_HOME.
    The user's config for an asset the job (or --select) does not run is named in a warning; the preset's
    entries for such assets are dropped silently."""
    import dagster as dg

    from carl_assets.defs.pipeline_cli import materialize, with_preset

    monkeypatch.setenv("CARL_HOME", str(tmp_path / "carl"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    (tmp_path / "dagster").mkdir()
    bad = {"ops": {"steering_vectors": {"config": {"threads": 0}},
                   "dream_scenarios": {"config": {"n_scenarios": 0}}}}
    assert materialize("*", bad) == 2
    threads = "carl materialize: steering_vectors.threads: Input should be greater than or equal to 1 (got 0)"
    assert capsys.readouterr().err.splitlines() == [
        threads, "carl materialize: dream_scenarios.n_scenarios: must be >= 1, got 0"]

    # dream_scenarios is outside steering_refresh: its (bad) config is dropped, with a warning; the real
    # preset's entries for the job's other outsiders (sft_checkpoint, ...) are dropped without one.
    assert materialize(run_config=with_preset("real", bad), job="steering_refresh", user_config=bad) == 2
    assert capsys.readouterr().err.splitlines() == [
        "carl materialize: config for dream_scenarios ignored: not in job steering_refresh", threads]
    assert materialize("steering_vectors", bad) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "carl materialize: config for dream_scenarios ignored: not in --select 'steering_vectors'")

    with dg.DagsterInstance.get() as instance:
        assert instance.get_runs() == []
    assert [p for p in (tmp_path / "carl").rglob("*") if p.is_file()] == []  # no table, no artifact


def test_a_run_config_that_is_not_yaml_names_its_file(tmp_path):
    from carl_assets.defs.pipeline_cli import PipelineUsageError, load_run_config

    path = tmp_path / "x.yaml"
    path.write_text("ops:\n  steering_vectors: {config: {threads: 2}\n")
    with pytest.raises(PipelineUsageError) as raised:
        load_run_config(str(path))
    message = str(raised.value)
    assert message.startswith(f"carl materialize: run config '{path}' is not valid YAML: ")
    assert "line 3" in message and "unicode string" not in message
