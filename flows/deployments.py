"""The two deployments users see in the Prefect UI.

- `compress-on-demand`: no schedule; started from the UI's parameter form (the flat `CompressConfig`), the CLI
  (`prefect deployment run compress/compress-on-demand`) or the API.
- `compress-nightly`: cron 02:00 in an explicit timezone (a bare `cron=` string would be UTC), named in words on
  the deployment page ("nightly at 02:00 Europe/Berlin").

`minitron serve` serves both from one long-lived process (`prefect.serve`); `infra/prefect.yaml` declares the same
two for work-pool workers (process or Kubernetes), for more than one machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from minitron.config import load_config_file
from minitron.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
NIGHTLY_CRON = "0 2 * * *"


def nightly_timezone() -> str:
    """`MINITRON_TIMEZONE` (IANA name, e.g. Europe/Berlin), else UTC stated explicitly."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    name = os.environ.get("MINITRON_TIMEZONE", "UTC")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise UserError(f"MINITRON_TIMEZONE={name!r} is not an IANA timezone name: use one like Europe/Berlin or "
                        "America/New_York, or unset it for UTC") from None
    return name


def schedule_label(timezone: str) -> str:
    """The nightly schedule in words, timezone included: "nightly at 02:00 Europe/Berlin". It is the schedule's
    slug, which the deployment page shows in place of the cron's "At 02:00 AM every day" (whose timezone the UI
    shows only on hover, next to upcoming runs in the browser's own timezone)."""
    minute, hour = NIGHTLY_CRON.split()[:2]
    return f"nightly at {int(hour):02d}:{int(minute):02d} {timezone}"


def deployments(on_demand_preset: str = "demo-cpu", nightly_preset: str | None = None):
    """The RunnerDeployments, with default parameters taken from the presets (nightly: the on-demand preset
    unless given its own)."""
    from prefect.schedules import Cron

    from flows.compress import compress

    def preset(name: str) -> dict:
        path = Path(name) if name.endswith(".yaml") else CONFIGS / f"{name}.yaml"
        return {"config": load_config_file(path).model_dump(mode="json")}

    on_demand = compress.to_deployment(
        name="compress-on-demand", parameters=preset(on_demand_preset), tags=["minitron"],
        description="Compress a model on demand: edit the parameters in the form, then Submit.")
    label = schedule_label(nightly_timezone())
    nightly = compress.to_deployment(
        name="compress-nightly", parameters=preset(nightly_preset or on_demand_preset), tags=["minitron", "nightly"],
        schedules=[Cron(NIGHTLY_CRON, timezone=nightly_timezone(), slug=label)],
        description=f"Compression run {label}.")
    return on_demand, nightly


def replace_old_schedule(nightly) -> None:
    """Prefect identifies a deployment's schedules by slug and keeps those an update does not name: the nightly
    schedule registered under another timezone's label would go on running beside the new one. Name it as the one
    the new schedule replaces."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    (schedule,) = nightly.schedules
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_deployment_by_name(f"{nightly.flow_name}/{nightly.name}").schedules
        except ObjectNotFound:
            return
    old = [s.slug for s in existing if s.slug and s.slug.startswith("nightly at ") and s.slug != schedule.slug]
    if old:
        schedule.replaces = old[0]


def serve(on_demand_preset: str = "demo-cpu", nightly_preset: str | None = None, limit: int | None = None) -> None:
    from prefect import serve as prefect_serve

    on_demand, nightly = deployments(on_demand_preset, nightly_preset)
    replace_old_schedule(nightly)
    prefect_serve(on_demand, nightly, limit=limit)
