"""Two first runs on an empty MINITRON_HOME, started at the same moment, 10 times: neither fails. Each process goes
through the start-up path of `minitron run` (the embedded Prefect API, which creates and migrates its database, and
the embedded MLflow store, which creates its tables); without the home's init lock they raced ("table
registered_models already exists", "duplicate column name ... Application startup failed"). The stages after the
start-up are the crash tests' business: 20 whole runs would cost minutes of CI."""

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
from flows.environment import embedded_api, prepare_tracking, tracking_uri

with embedded_api():  # returns once the API answers its health check, its database migrated
    prepare_tracking(tracking_uri(None))
    print("start-up done")
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
            assert proc.returncode == 0 and "start-up done" in out, f"attempt {attempt}:\n{out[-3000:]}"
