"""The Dagster UI for real: `dagster dev` serves the project's whole asset graph, runs launched from it
succeed, the lineage pages draw every asset, and a `dagster dev` started in another folder sees the
runs made by `carl materialize` (both use the project's persistent DAGSTER_HOME).

The expected graph always comes from `build_definitions()`: assets added later are checked too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dagster_dev import BIN, REPO, DagsterDev, isolated_env, write_dagster_yaml

CHROMIUM = Path("/usr/bin/chromium")
CHEAP_ASSET = "memory_graph"
RUN_TIMEOUT_S = 180
UI_TIMEOUT_MS = 30_000

ASSET_NODES_QUERY = """
{ assetNodes { assetKey { path } groupName dependencyKeys { path }
    assetChecksOrError { __typename ... on AssetChecks { checks { name } } } } }
"""

LAUNCH_MUTATION = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message stack }
    ... on RunConfigValidationInvalid { errors { message path } }
    ... on InvalidSubsetError { message }
    ... on PipelineNotFoundError { message }
    ... on ConflictingExecutionParamsError { message }
  }
}
"""

RUN_STATUS_QUERY = """
query Run($runId: ID!) { runOrError(runId: $runId) { __typename ... on Run { status } } }
"""

RUN_ERRORS_QUERY = """
query RunErrors($runId: ID!) { runOrError(runId: $runId) { ... on Run {
  eventConnection(afterCursor: null) { events { __typename
    ... on ExecutionStepFailureEvent { stepKey error { message stack } }
    ... on RunFailureEvent { message error { message } }
    ... on EngineEvent { message error { message } } } } } } }
"""

RUNS_QUERY = """
query Runs($ids: [String]) { runsOrError(filter: {runIds: $ids}) {
  __typename ... on Runs { results { runId status jobName } } } }
"""

LATEST_MATERIALIZATION_QUERY = """
query Latest($key: AssetKeyInput!) { assetOrError(assetKey: $key) {
  __typename ... on Asset { assetMaterializations(limit: 1) { runId } } } }
"""

INSTANCE_QUERY = "{ instance { info } }"


class Phases:
    """Prints how long each phase took (shown by pytest on failure, or with -s): a slow test says where."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def done(self, what: str) -> None:
        now = time.monotonic()
        print(f"[ui] {what}: {now - self.last:.1f} s", flush=True)
        self.last = now


def expected_graph(home: Path) -> tuple[dict[str, set[str]], dict[str, str], dict[str, set[str]]]:
    """From the project's definitions: each asset's upstream keys, its group and its check names."""
    from carl_assets.defs import build_definitions

    graph = build_definitions(home=home).resolve_asset_graph()
    deps: dict[str, set[str]] = {}
    groups: dict[str, str] = {}
    checks: dict[str, set[str]] = {}
    for key in graph.get_all_asset_keys():
        name = key.to_user_string()
        node = graph.get(key)
        deps[name] = {parent.to_user_string() for parent in node.parent_keys}
        groups[name] = node.group_name or "default"
        checks[name] = set()
    for check_key in graph.asset_check_keys:
        checks[check_key.asset_key.to_user_string()].add(check_key.name)
    return deps, groups, checks


def served_graph(server: DagsterDev) -> tuple[dict[str, set[str]], dict[str, str], dict[str, set[str]]]:
    deps: dict[str, set[str]] = {}
    groups: dict[str, str] = {}
    checks: dict[str, set[str]] = {}
    for node in server.query(ASSET_NODES_QUERY)["assetNodes"]:
        name = "/".join(node["assetKey"]["path"])
        deps[name] = {"/".join(dep["path"]) for dep in node["dependencyKeys"]}
        groups[name] = node["groupName"]
        result = node["assetChecksOrError"]
        checks[name] = (
            {c["name"] for c in result["checks"]} if result["__typename"] == "AssetChecks" else set()
        )
    return deps, groups, checks


def launch_assets(server: DagsterDev, assets: list[str], checks: dict[str, set[str]]) -> str:
    """Launch the implicit asset job on `assets` and their checks, as the UI's Materialize button does;
    returns the run id."""
    params = {
        "selector": {
            "repositoryLocationName": server.location,
            "repositoryName": server.repository,
            "jobName": "__ASSET_JOB",
            "assetSelection": [{"path": asset.split("/")} for asset in assets],
            "assetCheckSelection": [
                {"assetKey": {"path": asset.split("/")}, "name": name}
                for asset in assets
                for name in sorted(checks[asset])
            ],
        },
        "runConfigData": {},  # the project's executor and defaults, as the Materialize button runs them
    }
    result = server.query(LAUNCH_MUTATION, {"params": params})["launchPipelineExecution"]
    assert result["__typename"] == "LaunchRunSuccess", f"launch of {assets} refused: {result}"
    return result["run"]["runId"]


def wait_for_run(server: DagsterDev, run_id: str, timeout: float = RUN_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout
    status = "unknown"
    while time.monotonic() < deadline:
        status = server.query(RUN_STATUS_QUERY, {"runId": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(1.0)
    pytest.fail(
        f"run {run_id} still {status} after {timeout:.0f} s; dagster dev log tail:\n{server.log_tail()}"
    )


def run_errors(server: DagsterDev, run_id: str) -> str:
    events = server.query(RUN_ERRORS_QUERY, {"runId": run_id})["runOrError"]["eventConnection"]["events"]
    lines = []
    for event in events:
        error = event.get("error")
        if error:
            lines.append(
                f"{event['__typename']} {event.get('stepKey') or ''}: {error['message']}\n"
                f"{error.get('stack') or ''}"
            )
    return "\n".join(lines) or "(no error events)"


def chromium_or_skip() -> Path:
    if CHROMIUM.is_file():
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run must install Debian's chromium before the tests")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); the UI check needs a browser")


def drawn_names(page) -> list[str]:
    """Single-word texts drawn inside the lineage graph's SVG nodes: asset names (and small labels)."""
    return page.locator("svg foreignObject").get_by_text(re.compile(r"^\S+$")).all_text_contents()


def shows(name: str, texts: list[str]) -> bool:
    """`name` is drawn whole, or the way zoomed-out nodes shorten it: `crystalliz…_events`."""
    for text in texts:
        if text == name:
            return True
        head, sep, tail = text.partition("…")
        if (
            sep
            and head
            and tail
            and len(head) + len(tail) < len(name)
            and name.startswith(head)
            and name.endswith(tail)
        ):
            return True
    return False


def wait_until_drawn(page, names: list[str], where: str) -> None:
    deadline = time.monotonic() + UI_TIMEOUT_MS / 1000
    while True:
        texts = drawn_names(page)
        missing = [name for name in names if not shows(name, texts)]
        if not missing:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{where}: assets {missing} not drawn; graph texts: {texts}")
        page.wait_for_timeout(250)


def open_first_page(page, url: str, expect, PlaywrightError) -> None:
    """Open `url` and close Dagster's first-visit dialog: on a fresh instance "Join the Dagster
    community" opens about a second after the first page loads; Skip closes it for good (the instance
    remembers). A locator handler catches it should it open later, on any page."""
    skip = page.get_by_role("button", name="Skip")
    page.add_locator_handler(skip, lambda button: button.click())
    page.goto(url)
    try:
        skip.click(timeout=5_000)
    except PlaywrightError:
        pass  # no dialog: nothing to dismiss
    expect(page.get_by_text("Join the Dagster community")).to_have_count(0)


def check_global_lineage(page, server: DagsterDev, groups: dict[str, str], tmp_path: Path, expect) -> None:
    """Every group as a box, then, with all groups expanded, every asset as a node."""
    expect(page.get_by_text("Global asset lineage")).to_be_visible()
    wait_until_drawn(page, sorted(set(groups.values())), "global lineage (collapsed)")
    # Alt+E is the page's "Expand all groups": the whole graph, zoomed to fit (long names shortened).
    page.keyboard.press("Alt+e")
    wait_until_drawn(page, sorted(groups), "global lineage (all groups expanded)")
    page.screenshot(path=str(tmp_path / "global_lineage.png"))


def check_group_page(page, server: DagsterDev, groups: dict[str, str], tmp_path: Path, expect) -> None:
    """The cheap asset's group page draws its assets full size, and the node shows the run's result."""
    group = groups[CHEAP_ASSET]
    page.goto(f"{server.url}/locations/{server.repository}@{server.location}/asset-groups/{group}")
    for asset in sorted(a for a, g in groups.items() if g == group):
        expect(page.locator("svg foreignObject").get_by_text(asset, exact=True)).to_be_visible()
    expect(page.get_by_text("Materialized", exact=True).first).to_be_visible()
    expect(page.get_by_text("Join the Dagster community")).to_have_count(0)
    page.screenshot(path=str(tmp_path / f"group_{group}.png"))


@pytest.fixture
def homes(tmp_path: Path) -> dict[str, Path]:
    """Fresh CARL_HOME and DAGSTER_HOME, and an empty env file so the project's real `.env` is never read."""
    carl_home, dagster_home = tmp_path / "carl_home", tmp_path / "dagster_home"
    carl_home.mkdir()
    write_dagster_yaml(dagster_home)
    env_file = tmp_path / "empty.env"
    env_file.write_text("# the test sets every variable itself\n")
    return {"carl_home": carl_home, "dagster_home": dagster_home, "env_file": env_file}


@pytest.mark.slow
def test_ui_graph_and_materialization(tmp_path: Path, homes: dict[str, Path]) -> None:
    browser_path = chromium_or_skip()
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=UI_TIMEOUT_MS)  # a busy 2-core box renders slowly; the default is 5 s

    phases = Phases()
    env = isolated_env(
        CARL_HOME=str(homes["carl_home"]),
        DAGSTER_HOME=str(homes["dagster_home"]),
        CARL_ENV_FILE=str(homes["env_file"]),
        CARL_MEMORY_SOURCE="sample",
    )
    server = DagsterDev(env, cwd=tmp_path / "cwd", log_path=tmp_path / "dagster_dev.log")
    try:
        server.launch()
        # Build the expected graph here while dagster dev starts (both import torch & co).
        expected_deps, expected_groups, expected_checks = expected_graph(homes["carl_home"])
        assert CHEAP_ASSET in expected_deps, f"{CHEAP_ASSET} is no longer an asset: pick another cheap one"
        server.wait_until_loaded()
        phases.done("definitions + dagster dev start")
        # The whole graph: every asset, every edge, every check, every group.
        deps, groups, checks = served_graph(server)
        assert sorted(deps) == sorted(expected_deps), "assets served differ from build_definitions()"
        for asset, parents in expected_deps.items():
            assert deps[asset] == parents, f"{asset}: served upstreams {deps[asset]} != defined {parents}"
        assert groups == expected_groups
        assert checks == expected_checks

        run_id = launch_assets(server, [CHEAP_ASSET], checks)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(browser_path), headless=True)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.set_default_timeout(UI_TIMEOUT_MS)
                # The lineage pages need no run: check them while the run starts up.
                open_first_page(page, f"{server.url}/asset-groups", expect, PlaywrightError)
                check_global_lineage(page, server, groups, tmp_path, expect)
                phases.done("graph check + global lineage page")

                status = wait_for_run(server, run_id)
                assert status == "SUCCESS", f"run {run_id} ended {status}:\n{run_errors(server, run_id)}"
                latest = server.query(LATEST_MATERIALIZATION_QUERY, {"key": {"path": [CHEAP_ASSET]}})
                assert latest["assetOrError"]["assetMaterializations"][0]["runId"] == run_id
                assert (homes["carl_home"] / "carl.duckdb").is_file(), (
                    "no carl.duckdb in the test's CARL_HOME"
                )
                phases.done(f"run of {CHEAP_ASSET} finished")

                check_group_page(page, server, groups, tmp_path, expect)
            finally:
                browser.close()
        phases.done("group page")
    finally:
        server.stop()
    phases.done("dagster dev stop")


@pytest.mark.slow
def test_dagster_dev_from_another_folder_sees_cli_runs(tmp_path: Path) -> None:
    # The env file names the homes with paths relative to its own folder; the child processes get no
    # CARL_HOME / DAGSTER_HOME at all, only CARL_ENV_FILE, like a user's shell with the project's .env.
    env_file = tmp_path / "project" / "carl.env"
    env_file.parent.mkdir()
    env_file.write_text(
        "# test project settings\nCARL_HOME=homes/carl\nDAGSTER_HOME=homes/dagster\n"
        "CARL_MEMORY_SOURCE=sample\n"
    )
    carl_home = (env_file.parent / "homes" / "carl").resolve()
    dagster_home = (env_file.parent / "homes" / "dagster").resolve()
    env = isolated_env(CARL_ENV_FILE=str(env_file))
    assert "CARL_HOME" not in env and "DAGSTER_HOME" not in env

    phases = Phases()
    cli = subprocess.run(
        [str(BIN / "carl"), "materialize", "--select", CHEAP_ASSET],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = cli.stdout + cli.stderr
    assert cli.returncode == 0, f"carl materialize failed ({cli.returncode}):\n{output[-4000:]}"
    match = re.search(r"Runs:\s+(\S+) \(run ([0-9a-f-]{36})\)", output)
    assert match, f"no 'Runs: <home> (run <id>)' line in:\n{output[-2000:]}"
    assert Path(match.group(1)) == dagster_home, (
        f"the CLI used DAGSTER_HOME {match.group(1)}, not {dagster_home}"
    )
    run_id = match.group(2)
    assert (carl_home / "carl.duckdb").is_file(), f"the CLI did not write {carl_home}/carl.duckdb"

    phases.done("carl materialize")
    elsewhere = tmp_path / "somewhere_else"
    with DagsterDev(env, cwd=elsewhere, log_path=tmp_path / "dagster_dev.log") as server:
        phases.done("dagster dev start")
        info = server.query(INSTANCE_QUERY)["instance"]["info"] or ""
        assert str(dagster_home) in info, (
            f"dagster dev in {elsewhere} is not on {dagster_home}:\n{info[:2000]}"
        )
        runs = server.query(RUNS_QUERY, {"ids": [run_id]})["runsOrError"]
        assert runs["__typename"] == "Runs", runs
        assert [(r["runId"], r["status"]) for r in runs["results"]] == [(run_id, "SUCCESS")], (
            f"run {run_id} of `carl materialize` not served as SUCCESS: {runs['results']}"
        )
        latest = server.query(LATEST_MATERIALIZATION_QUERY, {"key": {"path": [CHEAP_ASSET]}})["assetOrError"]
        assert latest["__typename"] == "Asset", f"{CHEAP_ASSET} has no materialization: {latest}"
        assert [m["runId"] for m in latest["assetMaterializations"]] == [run_id]
        phases.done("queries")
    phases.done("dagster dev stop")
    # Nothing was written where dagster dev was started (no temporary instance, no stray homes).
    assert sorted(p.name for p in elsewhere.iterdir()) == []


def test_shortened_node_names_match_only_their_asset() -> None:
    texts = ["base_model", "crystalliz…_events", "DuckDB"]
    assert shows("crystallization_events", texts)
    assert shows("base_model", texts)
    assert not shows("crystallization_log", texts)  # right head, wrong tail
    assert not shows("base_mode", texts)  # a prefix is not the name
    assert not shows("c_events", ["c…_events"])  # the short form must hide something
    assert not shows("steering_vectors", [])


def test_missing_chromium_fails_in_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ui = sys.modules[__name__]  # chromium_or_skip reads this module's CHROMIUM
    monkeypatch.setattr(ui, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="missing in CI"):
        ui.chromium_or_skip()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        ui.chromium_or_skip()
    monkeypatch.setattr(ui, "CHROMIUM", Path("/bin/sh"))  # any existing file stands in for the browser
    assert ui.chromium_or_skip() == Path("/bin/sh")
