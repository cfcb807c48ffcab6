"""`dg` on this project, as a user types it: `dg check defs` passes, `dg list defs --json` lists every asset
with the upstreams and group the in-process Definitions give it, the jobs, the schedule and the sensor, and
`dg launch --assets` materializes an asset into the instance. Each command loads the code location
(carl_assets/definitions.py, `[tool.dg]` in pyproject.toml) in a fresh interpreter.

dg loads the project root's `.env` over the environment, and `make run` writes one (CARL_HOME, DAGSTER_HOME):
run from the repo itself, these tests would write into a developer's own homes. They run from a copy of the
project root (pyproject.toml, the package and the venv linked) that has no `.env`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from carl_assets import storage
from tests.dagster_dev import isolated_env
from tests.test_definitions import EXPECTED

REPO = Path(__file__).resolve().parents[1]
DG = Path(sys.executable).with_name("dg")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not DG.exists(), reason="dagster-dg-cli is not installed")]


def _project_root(tmp_path: Path) -> Path:
    """A project root like the repo's, without its `.env`: pyproject.toml copied, package and venv linked."""
    root = tmp_path / "project"
    if not root.is_dir():
        root.mkdir()
        shutil.copy(REPO / "pyproject.toml", root)
        (root / "carl_assets").symlink_to(REPO / "carl_assets")
        (root / ".venv").symlink_to(DG.parents[1])
    return root


def dg(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    settings = isolated_env(CARL_HOME=str(tmp_path / "carl"), DAGSTER_HOME=str(tmp_path / "dagster"),
                            CARL_ENV_FILE=str(tmp_path / "none.env"), **env)
    (tmp_path / "dagster").mkdir(exist_ok=True)
    return subprocess.run([str(DG), *args], cwd=_project_root(tmp_path), env=settings, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def listed(tmp_path_factory) -> dict:
    out = dg(["list", "defs", "--json"], tmp_path_factory.mktemp("dg_list"))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout[out.stdout.index("{"):])


def test_dg_check_defs_passes(tmp_path):
    out = dg(["check", "defs"], tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "All definitions loaded successfully" in out.stdout + out.stderr


def test_dg_list_defs_names_every_asset_with_its_group_and_upstreams(listed):
    assets = {a["asset_key"]: a for a in listed["assets"]}
    assert set(assets) == set(EXPECTED)
    for name, (group, upstream) in EXPECTED.items():
        assert assets[name]["group_name"] == group, name
        assert set(assets[name]["dependency_keys"]) >= upstream, name
        assert assets[name]["description"], name
    assert {r["name"] for r in listed["resources"]} >= {"duckdb", "artifacts"}


def test_dg_list_defs_names_the_jobs_schedule_and_sensor(listed):
    assert {j["name"] for j in listed["jobs"]} >= {"carl_all", "retraining", "steering_refresh",
                                                 "carl_all_real", "retraining_real"}
    assert [s["name"] for s in listed["schedules"]] == ["nightly_retraining"]
    assert [s["name"] for s in listed["sensors"]] == ["memory_graph_changed"]
    checks = {c["key"] for c in listed["asset_checks"]}
    assert any(key.startswith("emotion_training_pairs:") for key in checks), checks


def test_dg_launch_materializes_an_asset(tmp_path):
    out = dg(["launch", "--assets", "memory_graph"], tmp_path, CARL_MEMORY_SOURCE="sample")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    nodes = storage.read_table(tmp_path / "carl" / storage.DATABASE_NAME, "memory_nodes")
    assert len(nodes) > 0 and nodes["node_id"].is_unique
