"""Jobs, schedules and sensors."""

from __future__ import annotations

import dagster as dg

ALL_JOB = "carl_all"


def build_jobs_schedules_sensors() -> tuple[list, list, list]:
    everything = dg.define_asset_job(
        ALL_JOB, selection=dg.AssetSelection.all(), description="Materialize the whole default graph."
    )
    readout = dg.define_asset_job(
        "amygdala_readout",
        selection=dg.AssetSelection.groups("memory", "steering") | dg.AssetSelection.assets("base_model"),
        description="Memory graph -> training pairs -> base model -> steering vectors.",
    )
    jobs = [everything, readout]
    # Retraining is opt-in: a researcher turns the schedule on in the UI.
    weekly = dg.ScheduleDefinition(
        name="weekly_retrain",
        job=everything,
        cron_schedule="0 3 * * 1",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Re-materialize everything each Monday at 03:00 (off by default).",
    )
    return jobs, [weekly], []
