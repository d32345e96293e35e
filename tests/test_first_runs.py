"""Two first runs on an empty MINITRON_HOME, started at the same moment, 10 times: neither fails. Each process goes
through the start-up path of `minitron run` (the embedded Prefect API, which creates and migrates its database, and
the embedded MLflow store, which creates its tables) and records a flow run; without the home's init lock they
raced ("table registered_models already exists", "duplicate column name ... Application startup failed")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
START = """
from flows.environment import use_embedded_defaults
use_embedded_defaults()
from prefect import flow
from flows.environment import embedded_api, prepare_tracking, tracking_uri
from tasks.tracking import start_parent_run

@flow
def first_run() -> str:
    uri = tracking_uri(None)
    prepare_tracking(uri)
    return start_parent_run("first runs", "run", tracking_uri=uri).run_id

with embedded_api():
    print("run", first_run())
"""


@pytest.mark.slow
def test_two_first_runs_on_an_empty_home_never_race(tmp_path):
    for attempt in range(10):
        home = tmp_path / f"home-{attempt}"
        env = {**os.environ, "MINITRON_HOME": str(home)}
        procs = [subprocess.Popen([sys.executable, "-c", START], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        for proc, out in zip(procs, outputs, strict=True):
            assert proc.returncode == 0 and "\nrun " in f"\n{out}", f"attempt {attempt}:\n{out[-3000:]}"
        assert not list(Path.cwd().glob("mlruns"))  # MLflow's artifacts stay under the home
        assert not (ROOT / "mlruns").exists()
