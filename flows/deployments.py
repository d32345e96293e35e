"""The two deployments users see in the Prefect UI.

- `compress-on-demand`: no schedule; started from the UI's parameter form (the flat `CompressConfig`), the CLI
  (`prefect deployment run compress/compress-on-demand`) or the API.
- `compress-nightly`: cron 02:00 in an explicit timezone (a bare `cron=` string would be UTC).

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


def deployments(on_demand_preset: str = "demo-cpu", nightly_preset: str = "demo-cpu"):
    """The RunnerDeployments, with default parameters taken from the presets."""
    from prefect.schedules import Cron

    from flows.compress import compress

    def preset(name: str) -> dict:
        path = Path(name) if name.endswith(".yaml") else CONFIGS / f"{name}.yaml"
        return {"config": load_config_file(path).model_dump(mode="json")}

    on_demand = compress.to_deployment(
        name="compress-on-demand", parameters=preset(on_demand_preset), tags=["minitron"],
        description="Compress a model on demand: edit the parameters in the form, then Submit.")
    nightly = compress.to_deployment(
        name="compress-nightly", parameters=preset(nightly_preset), tags=["minitron", "nightly"],
        schedules=[Cron(NIGHTLY_CRON, timezone=nightly_timezone())],
        description=f"Nightly compression run at 02:00 {nightly_timezone()}.")
    return on_demand, nightly


def serve(on_demand_preset: str = "demo-cpu", nightly_preset: str = "demo-cpu", limit: int | None = None) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(on_demand_preset, nightly_preset), limit=limit)
