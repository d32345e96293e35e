"""Where a run keeps its state when no services are configured (the embedded default).

Everything lives under one folder, `MINITRON_HOME` (default `.minitron` in the working directory):
  prefect/       Prefect's ephemeral API database and persisted task results (what makes resume work)
  mlflow.db      MLflow tracking store (SQLite), with artifacts in mlartifacts/
  checkpoints/   the checkpoint store (same manifest format as S3)
  work/          scratch: downloads and stage outputs before upload
  slots/         one lock file per device of the machine (tasks/slots.py)
  .init.lock     held while a process creates or migrates the two databases: first runs started together queue

Prefect reads its settings when it is first imported, so `use_embedded_defaults()` must run before that.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path


def state_dir() -> Path:
    from infra.stack import minitron_home  # stdlib only: cheap before Prefect is imported

    return minitron_home()


def use_embedded_defaults() -> None:
    """Point Prefect at a local ephemeral API under the state folder unless a server is configured."""
    home = state_dir()
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
        # Prefect creates its home without parents, and warns on every command in a fresh MINITRON_HOME
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
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


class _UserErrorTracebacks(logging.Filter):
    """A UserError is reported as its one line: the traceback Prefect's engine attaches to a failed task goes to the
    DEBUG level (PREFECT_LOGGING_LEVEL=DEBUG shows it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from minitron.errors import UserError

        if record.exc_info and isinstance(record.exc_info[1], UserError) and not hasattr(record, "debug_copy"):
            exc_info, record.exc_info, record.exc_text = record.exc_info, None, None
            logging.getLogger(record.name).debug("traceback of: %s", exc_info[1], exc_info=exc_info,
                                                 extra={"debug_copy": True})
        return True


def quiet_user_errors() -> None:
    """Install the filter above on the handlers of Prefect's run loggers and the console (idempotent)."""
    for name in ("prefect.flow_runs", "prefect.task_runs", ""):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _UserErrorTracebacks) for f in handler.filters):
                handler.addFilter(_UserErrorTracebacks())


def tracking_uri(configured: str | None) -> str:
    from tasks.tracking import embedded_tracking

    return configured or os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking(state_dir())[0]


def artifact_location(tracking: str) -> str | None:
    """Where a new experiment keeps its artifacts: under MINITRON_HOME for the embedded store (MLflow's default
    would be ./mlruns in whatever folder the run started from); a server picks its own."""
    from tasks.tracking import embedded_tracking

    uri, artifacts = embedded_tracking(state_dir())
    return artifacts if tracking == uri else None


def prepare_tracking(tracking: str) -> None:
    """Create the embedded MLflow store's tables (once, under the init lock) before the run's first MLflow call."""
    if artifact_location(tracking) is not None:
        _create_embedded_mlflow(tracking, artifact_location(tracking))


@contextmanager
def init_lock(home: Path | None = None) -> Iterator[None]:
    """Held while this process creates or migrates the embedded databases: two first runs on a fresh home would
    otherwise both create the same tables ("table ... already exists", "duplicate column name")."""
    home = home or state_dir()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".init.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or by the kernel if we die
        yield


@cache
def _create_embedded_mlflow(uri: str, artifacts: str) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    with init_lock():
        SqlAlchemyStore(uri, artifacts).engine.dispose()  # creates and migrates the tables


@contextmanager
def embedded_api() -> Iterator[None]:
    """Prefect's ephemeral API for this process (unless PREFECT_API_URL names a server), started under the init lock
    and in its own session.

    Its own session: Ctrl-C in a terminal signals the whole foreground process group, and Prefect starts its
    temporary server in ours, so the API died first and the run could neither record that it was cancelled nor
    release anything (the CLI then hung for minutes). Shielded from the terminal's SIGINT, the server stays up
    while the run winds down, and it still dies with us (PR_SET_PDEATHSIG) when we are killed."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    import functools
    import signal
    import subprocess
    import types

    from prefect.server.api import server as api_server

    from minitron.proc import die_with_parent

    class ShieldedServer(api_server.SubprocessASGIServer):
        def _run_uvicorn_command(self):
            real = api_server.subprocess
            dies_with_us = functools.partial(die_with_parent, signal.SIGTERM)
            api_server.subprocess = types.SimpleNamespace(Popen=functools.partial(
                subprocess.Popen, start_new_session=True, preexec_fn=dies_with_us))
            try:
                return super()._run_uvicorn_command()
            finally:
                api_server.subprocess = real

    previous = api_server.SubprocessASGIServer._instances.pop(None, None)
    server = ShieldedServer()
    api_server.SubprocessASGIServer._instances[None] = server  # what Prefect's clients use (as its test harness does)
    try:
        with init_lock():
            server.start()  # migrates the database on a fresh home
        yield
    finally:
        _drain_workers()  # logs and events still queued would be sent to a server that is gone
        server.stop()
        if previous is not None:
            api_server.SubprocessASGIServer._instances[None] = previous


def _drain_workers() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=10)
        except RuntimeError:  # never started
            pass


def store_uri(configured: str | None) -> str:
    return configured or os.environ.get("MINITRON_CHECKPOINT_STORE") or str(state_dir() / "checkpoints")
