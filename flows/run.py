"""`minitron run --config FILE`: the compress flow from the command line, on the embedded default (Prefect's
ephemeral API, MLflow in SQLite, checkpoints in a folder) unless PREFECT_API_URL / MLFLOW_TRACKING_URI /
MINITRON_CHECKPOINT_STORE (or the config) point at services.

Ctrl-C stops the run within seconds: the flow run ends Cancelled, every stage leaves its devices as its block
unwinds (the kernel would free them anyway when we exit), and the finished stages and local checkpoints stay for
the next run of the same command."""

from __future__ import annotations

import os
import re
import sys
import threading
import time

from minitron.config import CompressConfig

EXIT_GRACE_S = 5.0  # after a cancellation, how long stages in other threads get to reach their next stop point


def run_from_cli(config: CompressConfig, args=None) -> int:
    from flows.environment import embedded_api, state_dir, store_uri, tracking_uri, use_embedded_defaults

    use_embedded_defaults()  # before prefect is imported: it reads its settings once
    from flows.preflight import preflight

    preflight(config)  # bad input: one line, before Prefect starts and before any model work
    from prefect.exceptions import CancelledRun

    from flows.compress import compress

    with embedded_api():
        try:
            summary = compress(config)
        except CancelledRun as cancelled:
            summary = None
            print(f"cancelled: {cancelled}", file=sys.stderr)
    if summary is None:
        _exit_now(130)
    print()
    print(for_terminal(summary["summary"]))
    print()
    print(f"MLflow:      {tracking_uri(config.tracking_uri)}  (UI: mlflow ui --backend-store-uri "
          f"{tracking_uri(config.tracking_uri)})")
    print(f"checkpoints: {store_uri(config.checkpoint_store)}")
    print(f"final model: {summary['final_uri']}")
    print(f"state:       {state_dir()}")
    return 0


def _exit_now(code: int) -> None:
    """Leave at once after a cancellation: the run's state is recorded, its logs are sent and its API is stopped,
    and an interpreter shutting down torch, transformers, MLflow and Prefect takes seconds more (9 s measured on a
    busy 2-core machine), while stage threads still on their way out hold nothing the kernel does not free."""
    deadline = time.monotonic() + EXIT_GRACE_S
    for thread in threading.enumerate():  # a stage thread reaches its next stop point within seconds
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def for_terminal(summary: str) -> str:
    """The run summary without its inline charts (data-URI images, which Prefect renders): their names instead."""
    return re.sub(r"!\[([^\]]*)\]\(data:image/png;base64,[^)]*\)", r"[chart: \1, in the Prefect summary]", summary)
