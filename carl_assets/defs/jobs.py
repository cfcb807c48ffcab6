"""Jobs, schedules and sensors."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

ALL_JOB = "carl_all"
MEMORY_SOURCE_ENV = "CARL_MEMORY_SOURCE"


def memory_file_sensor(job: dg.UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    """Re-run the graph when the memory-graph JSONL named by `$CARL_MEMORY_SOURCE=jsonl:PATH` changes."""

    @dg.sensor(
        name="memory_file_changed",
        job=job,
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=f"Watches the jsonl: memory source in ${MEMORY_SOURCE_ENV}; a changed file starts a run.",
    )
    def _sensor(context: dg.SensorEvaluationContext):
        source = os.environ.get(MEMORY_SOURCE_ENV, "")
        if not source.startswith("jsonl:"):
            return dg.SkipReason(f"set {MEMORY_SOURCE_ENV}=jsonl:PATH to watch a memory file")
        path = Path(source.removeprefix("jsonl:"))
        if not path.is_file():
            return dg.SkipReason(f"{path} does not exist")
        stat = path.stat()
        stamp = f"{stat.st_mtime_ns}:{stat.st_size}"
        if stamp == context.cursor:
            return dg.SkipReason(f"{path} unchanged")
        context.update_cursor(stamp)
        return dg.RunRequest(
            run_key=stamp,
            run_config={"ops": {"memory_graph": {"config": {"source": source}}}},
        )

    return _sensor


def build_jobs_schedules_sensors() -> tuple[list, list, list]:
    everything = dg.define_asset_job(
        ALL_JOB, selection=dg.AssetSelection.all(), description="Materialize the whole default graph."
    )
    readout = dg.define_asset_job(
        "amygdala_readout",
        selection=dg.AssetSelection.groups("memory", "steering") | dg.AssetSelection.assets("base_model"),
        description="Memory graph -> training pairs -> base model -> steering vectors.",
    )
    # Retraining is opt-in: a researcher turns the schedule or the sensor on in the UI.
    weekly = dg.ScheduleDefinition(
        name="weekly_retrain",
        job=everything,
        cron_schedule="0 3 * * 1",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Re-materialize everything each Monday at 03:00 (off by default).",
    )
    return [everything, readout], [weekly], [memory_file_sensor(everything)]
