"""Jobs, the nightly schedule and the memory-change sensor: retraining that runs by itself.

- `carl_all`: everything. `retraining`: one dream cycle (memory -> dreams -> SFT -> crystallization ->
  GRPO -> evaluation), starting from the previous cycle's checkpoint. `steering_refresh`: pairs -> vectors.
- `carl_all_real`, `retraining_real`: the same with the `real` preset (carl_assets/defs/presets.py) as
  their config: the packaged SmolLM2-135M-Instruct with budgets for a 2-core CPU.
- `nightly_retraining` runs `retraining` (or `retraining_real`, with `CARL_RETRAIN_PRESET=real`) at an
  off-hours cron in the user's timezone; STOPPED by default: a nightly training run costs compute the
  user should opt into, and the sensor below already retrains when the memories change.
- `memory_graph_changed` requests `steering_refresh` and the same retraining job once per change of the memory
  source's fingerprint (its cursor), for every source kind, and records the new fingerprint as an
  observation of the `memory_source` asset (so the lineage shows what changed). RUNNING by default: its
  first evaluation only records the current fingerprint, so opening `dagster dev` never starts training;
  a later change of the user's memories does, which is the point of a living system.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg

from carl_assets.defs.memory_source import memory_source_observation
from carl_assets.defs.presets import PRESET_TAG, PRESETS, REAL_MODEL, preset_run_config
from carl_assets.memory.graph import MemorySourceError
from carl_assets.project_env import (
    MEMORY_SOURCE_VAR,
    clean_value,
    env_int,
    memory_source_setting,
    setting,
    warn_setting,
)

ALL_JOB = "carl_all"
RETRAINING_JOB = "retraining"
STEERING_JOB = "steering_refresh"
RETRAINING_ASSETS = (
    "memory_graph",
    "emotion_tags",
    "dream_scenarios",
    "sft_dataset",
    "sft_checkpoint",
    "crystallization_events",
    "grpo_checkpoint",
    "agent_evaluation",
)
STEERING_ASSETS = ("emotion_tags", "emotion_training_pairs", "steering_vectors")
CRON_VAR = "CARL_RETRAIN_CRON"
TIMEZONE_VAR = "CARL_TIMEZONE"
DEFAULT_CRON = "30 3 * * *"  # 03:30 every night
SENSOR_INTERVAL_VAR = "CARL_SENSOR_INTERVAL_S"
# Which preset's retraining job the schedule and the sensor request: a user on the real model sets `real`
# (in the project's .env), so that unattended cycles run with the budgets sized for it.
RETRAIN_PRESET_VAR = "CARL_RETRAIN_PRESET"
DEFAULT_RETRAIN_PRESET = "offline"


def local_timezone() -> str:
    """The user's IANA timezone: $CARL_TIMEZONE, else $TZ, else the system's (/etc/localtime), else UTC."""
    for var in (TIMEZONE_VAR, "TZ"):
        candidate = clean_value(os.environ.get(var)).lstrip(":")
        if candidate and _known_timezone(candidate):
            return candidate
        if (
            candidate and var == TIMEZONE_VAR
        ):  # TZ may hold a POSIX rule ('CET-1CEST'): no IANA name, no warning
            warn_setting(
                var, os.environ[var], "an IANA timezone such as 'Europe/Berlin'", "TZ or the system's"
            )
    try:
        target = os.path.realpath("/etc/localtime")
        if "zoneinfo/" in target:
            return target.split("zoneinfo/", 1)[1]
    except OSError:
        pass
    timezone_file = Path("/etc/timezone")
    if timezone_file.is_file():
        name = timezone_file.read_text().strip()
        if name:
            return name
    return "UTC"


def _known_timezone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ValueError, KeyError, OSError):  # ZoneInfoNotFoundError is a KeyError; a bad path a ValueError
        return False
    return True


def retrain_cron() -> str:
    """`$CARL_RETRAIN_CRON` if Dagster accepts it (5 cron fields or `@daily`-style), else the default with a
    warning naming the value: a bad setting must not stop the definitions from loading."""
    raw = os.environ.get(CRON_VAR)
    cron = clean_value(raw)
    if not cron:
        return DEFAULT_CRON
    try:
        dg.ScheduleDefinition(name="cron_probe", job_name="cron_probe", cron_schedule=cron)
    except dg.DagsterInvalidDefinitionError:
        warn_setting(CRON_VAR, str(raw), "a cron expression of 5 fields such as '30 3 * * *'", DEFAULT_CRON)
        return DEFAULT_CRON
    return cron


def retrain_preset() -> str:
    """The preset of the unattended retraining job: $CARL_RETRAIN_PRESET, 'offline' (the default) or 'real';
    another value is ignored with a warning naming the choices."""
    raw = setting(RETRAIN_PRESET_VAR)
    if not raw:
        return DEFAULT_RETRAIN_PRESET
    if raw.lower() not in PRESETS:
        warn_setting(RETRAIN_PRESET_VAR, raw, f"one of {sorted(PRESETS)}", DEFAULT_RETRAIN_PRESET)
        return DEFAULT_RETRAIN_PRESET
    return raw.lower()


def memory_source_string() -> str:
    return memory_source_setting()


def memory_graph_changed_sensor(jobs: Iterable[dg.UnresolvedAssetJobDefinition]) -> dg.SensorDefinition:
    jobs = list(jobs)

    @dg.sensor(
        name="memory_graph_changed",
        jobs=jobs,
        minimum_interval_seconds=env_int(SENSOR_INTERVAL_VAR, 300),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Fingerprints the memory source (${MEMORY_SOURCE_VAR}) and requests "
        f"{', '.join(j.name for j in jobs)} once per change; the first evaluation only records it.",
    )
    def _sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        source = memory_source_string()
        try:
            version, observation = memory_source_observation(source)  # the one observation of the source
        except MemorySourceError as exc:
            return dg.SkipReason(f"cannot read the memory source: {exc}")
        previous = context.cursor
        if previous == version:
            return dg.SkipReason(f"{source} unchanged (fingerprint {version})")
        if not previous:
            # First look: remember the source as it is; retrain only when it changes from here on.
            return dg.SensorResult(cursor=version, asset_events=[observation])
        requests = [
            dg.RunRequest(
                run_key=f"{job.name}:{version}", job_name=job.name, tags={"carl/memory_fingerprint": version}
            )
            for job in jobs
        ]
        context.log.info(f"{source} changed: {previous} -> {version}")
        return dg.SensorResult(run_requests=requests, cursor=version, asset_events=[observation])

    return _sensor


def build_jobs_schedules_sensors(asset_names: Iterable[str]) -> tuple[list, list, list]:
    known = set(asset_names)
    everything = dg.define_asset_job(
        ALL_JOB, selection=dg.AssetSelection.all(), description="Materialize the whole default graph."
    )
    retraining = dg.define_asset_job(
        RETRAINING_JOB,
        selection=dg.AssetSelection.assets(*[a for a in RETRAINING_ASSETS if a in known]),
        description="One dream cycle on the user's memories: memory graph -> dreams -> SFT until "
        "crystallization -> GRPO -> evaluation, starting from the previous cycle's checkpoint.",
    )
    steering = dg.define_asset_job(
        STEERING_JOB,
        selection=dg.AssetSelection.assets(*[a for a in STEERING_ASSETS if a in known]),
        description="Emotion training pairs -> amygdala readout vectors (after the memory graph changes).",
    )
    presets = preset_jobs(known)
    unattended = retraining if retrain_preset() == "offline" else _named(presets, f"{RETRAINING_JOB}_real")
    nightly = dg.ScheduleDefinition(
        name="nightly_retraining",
        job=unattended,
        cron_schedule=retrain_cron(),
        execution_timezone=local_timezone(),
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Runs `{unattended.name}` every night (cron ${CRON_VAR}, default '{DEFAULT_CRON}', in "
        f"${TIMEZONE_VAR} or the system timezone; the job: ${RETRAIN_PRESET_VAR}). Off by default: turn it "
        "on in the UI.",
    )
    return (
        [everything, retraining, steering, *presets],
        [nightly],
        [memory_graph_changed_sensor([steering, unattended])],
    )


def _named(jobs: Iterable[dg.UnresolvedAssetJobDefinition], name: str) -> dg.UnresolvedAssetJobDefinition:
    return next(job for job in jobs if job.name == name)


def preset_jobs(known: set[str]) -> list[dg.UnresolvedAssetJobDefinition]:
    """`carl_all_real` and `retraining_real`: the same selections as `carl_all` and `retraining`, with the
    `real` preset as their config. Dagster makes a job's `config=` the default of its run config, so the
    launchpad opens pre-filled and every value stays editable (one job per preset, as dagster-nanochat's
    tiers; Dagster has no preset object since 1.0)."""
    retraining_assets = [a for a in RETRAINING_ASSETS if a in known]
    return [
        dg.define_asset_job(
            f"{ALL_JOB}_real",
            selection=dg.AssetSelection.all(),
            config=preset_run_config("real", known),
            tags={PRESET_TAG: "real"},
            description=f"The whole graph on the packaged real model ({REAL_MODEL}) with the `real` preset's "
            "budgets (about 15 minutes on 2 CPU cores); edit any value in the launchpad.",
        ),
        dg.define_asset_job(
            f"{RETRAINING_JOB}_real",
            selection=dg.AssetSelection.assets(*retraining_assets),
            config=preset_run_config("real", retraining_assets),
            tags={PRESET_TAG: "real"},
            description="One dream cycle (as `retraining`) with the `real` preset's budgets; refused (by "
            "dream_scenarios) when the current base_model is the offline model.",
        ),
    ]
