"""Where a run keeps its state when no services are configured (the embedded default).

Everything lives under one folder, `MINITRON_HOME` (default `.minitron` in the working directory):
  prefect/       Prefect's ephemeral API database and persisted task results (what makes resume work)
  mlflow.db      MLflow tracking store (SQLite), with artifacts in mlartifacts/
  checkpoints/   the checkpoint store (same manifest format as S3)
  work/          scratch: downloads and stage outputs before upload

Prefect reads its settings when it is first imported, so `use_embedded_defaults()` must run before that.
"""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    from infra.stack import minitron_home  # stdlib only: cheap before Prefect is imported

    return minitron_home()


def use_embedded_defaults() -> None:
    """Point Prefect at a local ephemeral API under the state folder unless a server is configured."""
    home = state_dir()
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
        os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
        # the in-process API migrates its SQLite database on first start: slow on a busy 2-core machine
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry from users' machines
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(home / "prefect" / "storage"))
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    os.environ.setdefault("MINITRON_WORK", str(home / "work"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # per-file progress bars of model loading and saving would drown the stage progress lines in flow logs
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def tracking_uri(configured: str | None) -> str:
    from tasks.tracking import embedded_tracking

    return configured or os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking(state_dir())[0]


def store_uri(configured: str | None) -> str:
    return configured or os.environ.get("MINITRON_CHECKPOINT_STORE") or str(state_dir() / "checkpoints")
