"""Data versions name content and config, never the run: the same config on the same inputs gives the same
data version in two fresh homes, so an identical rerun does not look new nor mark downstream stale.

The whole offline graph (tests/tiny_run.TINY) is materialized twice, each time in its own fresh CARL home
and Dagster instance, and every asset's data version is compared. Also the unit under it: the content hash
of an artifact version folder leaves out the store's per-run bookkeeping (`_version.json`) but not the
content (a weights file)."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from carl_assets import storage
from carl_assets.artifacts import VERSION_FILE, ArtifactVersions
from carl_assets.defs import build_definitions
from tests.tiny_run import TINY


def _data_versions(home) -> dict[str, str | None]:
    """Materialize every asset and check of the graph on `home` in a fresh ephemeral instance; each asset's
    data version as that instance recorded it."""
    defs = build_definitions(home)
    assets = [a for a in defs.assets or [] if isinstance(a, dg.AssetsDefinition)]
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [*assets, *(defs.asset_checks or [])],
        resources=defs.resources,
        run_config=TINY,
        instance=instance,
        raise_on_error=False,
    )
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    out = {}
    for key in instance.get_asset_keys():
        event = instance.get_latest_materialization_event(key)
        if event is not None and event.asset_materialization is not None:
            tags = dict(event.asset_materialization.tags or {})
            out[key.to_user_string()] = tags.get("dagster/data_version")
    return out


@pytest.mark.slow
def test_two_fresh_homes_give_every_asset_the_same_data_version(tmp_path):
    first = _data_versions(tmp_path / "a")
    second = _data_versions(tmp_path / "b")
    materialized = [a for a in build_definitions(tmp_path / "c").resolve_all_asset_keys()
                    if a.to_user_string() != "memory_source"]
    assert sorted(first) == sorted(second) == sorted(k.to_user_string() for k in materialized)
    assert all(first.values()), first
    differing = {name: (first[name], second[name]) for name in first if first[name] != second[name]}
    assert not differing, f"{len(differing)} assets name their run in their data version: {sorted(differing)}"


def _version_folder(root, weights: bytes, run_id: str) -> ArtifactVersions:
    versions = ArtifactVersions(root, "policy")
    with versions.write(run_id=run_id) as (folder, _):
        (folder / "model.safetensors").write_bytes(weights)
        (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))
    return versions


def test_a_folders_content_hash_leaves_out_the_stores_bookkeeping_but_not_the_weights(tmp_path):
    one = _version_folder(tmp_path / "one", b"\x01\x02\x03", run_id="run-one")
    two = _version_folder(tmp_path / "two", b"\x01\x02\x03", run_id="run-two")
    other = _version_folder(tmp_path / "other", b"\x01\x02\x04", run_id="run-one")
    # the bookkeeping really differs (its run id, its time) ...
    meta_one = json.loads((one.path() / VERSION_FILE).read_text())
    meta_two = json.loads((two.path() / VERSION_FILE).read_text())
    assert meta_one["run_id"] != meta_two["run_id"] and one.current_name() != two.current_name()
    # ... and is not content; one changed byte of the weights is
    assert storage.content_hash(one.path()) == storage.content_hash(two.path())
    assert storage.content_hash(one.path()) != storage.content_hash(other.path())
    # the rule is by name, wherever the folder lives: a bookkeeping file in a plain folder is left out too
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes(b"\x01\x02\x03")
    (plain / "config.json").write_text(json.dumps({"hidden_size": 8}))
    bare = storage.content_hash(plain)
    (plain / VERSION_FILE).write_text('{"run_id": "x"}')
    assert storage.content_hash(plain) == bare == storage.content_hash(one.path())


def test_run_records_are_left_out_by_name_and_the_content_id_is_kept_in_the_version_file(tmp_path):
    versions = _version_folder(tmp_path / "v", b"\x05\x06", run_id="run-one")
    folder = versions.path()
    before = storage.content_hash(folder)
    # a trainer log (wall-clock seconds) and a datasets map cache (a per-run name) are the run's, not content
    (folder / "training_log.json").write_text('{"seconds": 1.5}')
    (folder / "dataset").mkdir()
    (folder / "dataset" / "cache-0123abcd.arrow").write_bytes(b"rows again")
    # nor is another process's write in progress (atomic_write_bytes's temporary beside _version.json)
    (folder / "._version.json.k3j2h1.tmp").write_text('{"run_id": "run-two"}')
    assert storage.content_hash(folder) == before
    (folder / "._version.json.k3j2h1.tmp").unlink()
    (folder / "dataset" / "data-00000-of-00001.arrow").write_bytes(b"rows")
    with_data = storage.content_hash(folder)
    assert with_data != before
    # computed once, then read from _version.json: a changed cached value is what comes back
    assert versions.content_id() == with_data
    assert versions.info().content_hash == with_data
    meta = json.loads((folder / VERSION_FILE).read_text())
    assert meta["content_hash"] == with_data and meta["run_id"] == "run-one"
    meta["content_hash"] = "cached"
    (folder / VERSION_FILE).write_text(json.dumps(meta))
    assert versions.content_id() == "cached"
    assert VERSION_FILE in storage.RUN_RECORD_FILES
