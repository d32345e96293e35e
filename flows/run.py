"""`minitron run --config FILE`: the compress flow from the command line, on the embedded default (Prefect's
ephemeral API, MLflow in SQLite, checkpoints in a folder) unless PREFECT_API_URL / MLFLOW_TRACKING_URI /
MINITRON_CHECKPOINT_STORE (or the config) point at services."""

from __future__ import annotations

import re

from minitron.config import CompressConfig


def run_from_cli(config: CompressConfig, args=None) -> int:
    from flows.environment import state_dir, store_uri, tracking_uri, use_embedded_defaults

    use_embedded_defaults()  # before prefect is imported: it reads its settings once
    from flows.preflight import preflight

    preflight(config)  # bad input: one line, before Prefect starts and before any model work
    from flows.compress import compress

    summary = compress(config)
    print()
    print(for_terminal(summary["summary"]))
    print()
    print(f"MLflow:      {tracking_uri(config.tracking_uri)}  (UI: mlflow ui --backend-store-uri "
          f"{tracking_uri(config.tracking_uri)})")
    print(f"checkpoints: {store_uri(config.checkpoint_store)}")
    print(f"final model: {summary['final_uri']}")
    print(f"state:       {state_dir()}")
    return 0


def for_terminal(summary: str) -> str:
    """The run summary without its inline charts (data-URI images, which Prefect renders): their names instead."""
    return re.sub(r"!\[([^\]]*)\]\(data:image/png;base64,[^)]*\)", r"[chart: \1, in the Prefect summary]", summary)
