"""Versioned artifacts: a folder per materialization, `current` swapped atomically, the last N kept,
failures leave nothing visible, a home from before versions is adopted, rollback by name."""

from __future__ import annotations

import json
import os

import pytest

from carl_assets.artifacts import (
    CURRENT,
    LEGACY_VERSION,
    VERSION_FILE,
    ArtifactVersionError,
    ArtifactVersions,
    all_versions,
    new_version_name,
)


def write(versions: ArtifactVersions, text: str, run_id: str = "run") -> str:
    with versions.write(run_id=run_id, parents={"base_model": "b1"}) as (folder, name):
        (folder / "weights.txt").write_text(text)
    return name


def test_each_write_is_a_new_version_and_current_points_at_the_newest(tmp_path):
    versions = ArtifactVersions(tmp_path / "sft_checkpoint", "sft_checkpoint", keep=3)
    first = write(versions, "one", run_id="aaaa1111-rest")
    second = write(versions, "two")
    assert versions.names() == [first, second] and first < second  # names sort by time
    assert "Z-aaaa1111" in first
    assert os.readlink(tmp_path / "sft_checkpoint" / CURRENT) == second  # relative link
    assert (versions.path() / "weights.txt").read_text() == "two"
    assert (versions.path(first) / "weights.txt").read_text() == "one"  # an old version stays readable
    info = versions.info(first)
    assert info.run_id == "aaaa1111-rest" and info.parents == {"base_model": "b1"} and info.created_at


def test_only_the_last_n_are_kept_and_never_the_current(tmp_path):
    versions = ArtifactVersions(tmp_path / "a", "a", keep=2)
    names = [write(versions, str(i)) for i in range(4)]
    assert versions.names() == names[2:]
    versions.promote(names[2])  # rolled back to the older one
    write(versions, "4")
    kept = versions.names()
    assert len(kept) == 2 and names[2] not in kept  # the newest write is current; the rest pruned
    versions.promote(kept[0])  # an older version current, one beyond keep: nothing to prune
    assert versions.prune() == [] and versions.names() == kept


def test_a_failed_write_changes_nothing(tmp_path):
    versions = ArtifactVersions(tmp_path / "a", "a")
    good = write(versions, "good")
    with pytest.raises(RuntimeError), versions.write() as (folder, _):
        (folder / "weights.txt").write_text("half")
        raise RuntimeError("training died")
    assert versions.names() == [good] and versions.current_name() == good
    assert [p.name for p in (tmp_path / "a").iterdir() if p.name.startswith(".")] == []  # no temp left


def test_record_adds_fields_and_listing_counts_files(tmp_path):
    versions = ArtifactVersions(tmp_path / "a", "a")
    name = write(versions, "x" * 100)
    versions.record(name, data_version="abc123", dream_cycle=2)
    meta = json.loads((versions.path(name) / VERSION_FILE).read_text())
    assert meta["data_version"] == "abc123" and meta["extra"] == {"dream_cycle": 2}
    (row,) = versions.listing()
    assert row["current"] and row["data_version"] == "abc123" and row["files"] == 2 and row["bytes"] > 100


def test_all_versions_lists_every_asset(tmp_path):
    base = tmp_path / "artifacts"
    write(ArtifactVersions(base / "a", "a"), "1")
    write(ArtifactVersions(base / "b", "b"), "2")
    write(ArtifactVersions(base / "b", "b"), "3")
    rows = all_versions(tmp_path)
    assert sorted((r["asset"], r["current"]) for r in rows) == [("a", True), ("b", False), ("b", True)]


def test_unknown_versions_and_empty_assets_are_named(tmp_path):
    versions = ArtifactVersions(tmp_path / "grpo_checkpoint", "grpo_checkpoint")
    with pytest.raises(ArtifactVersionError, match="materialize the asset 'grpo_checkpoint'"):
        versions.path()
    write(versions, "1")
    with pytest.raises(ArtifactVersionError, match="no version '../etc'"):
        versions.path("../etc")
    with pytest.raises(ValueError, match="keep"):
        ArtifactVersions(tmp_path, "x", keep=0)


def test_a_home_from_before_versions_is_adopted_as_a_legacy_version(tmp_path):
    folder = tmp_path / "base_model"
    folder.mkdir()
    (folder / "model.safetensors").write_text("old weights")
    versions = ArtifactVersions(folder, "base_model")
    new = write(versions, "new")
    assert versions.names() == [LEGACY_VERSION, new]
    assert (versions.path(LEGACY_VERSION) / "model.safetensors").read_text() == "old weights"
    assert versions.current_name() == new


def test_version_names_are_unique_and_sortable():
    names = [new_version_name("same-run") for _ in range(50)]
    assert len(set(names)) == 50
    times = [n.split("Z-")[0] for n in names]
    assert times == sorted(times)
