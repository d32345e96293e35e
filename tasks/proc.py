"""Child processes (torchrun, lm-eval) in their own process group, killed as a group when the task stops.

Prefect cancels a flow run by signalling its process; a plain `subprocess.run` would leave torchrun's workers (and
their GPU memory) behind. Each child gets a new session, and on any way out of `run_group` that is not a clean exit
(an exception, Prefect's cancellation, Ctrl-C) the whole group gets SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

GRACE_S = 10.0  # between SIGTERM and SIGKILL: time for torchrun to tear down its workers


def child_env() -> dict[str, str]:
    """The environment for a child: ours, minus MLFLOW_RUN_ID (a child must never log into our active run)."""
    env = dict(os.environ)
    env.pop("MLFLOW_RUN_ID", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_group(args: list[str], *, on_line: Callable[[str], None] | None = None,
              poll: Callable[[], None] | None = None, poll_every_s: float = 5.0) -> int:
    """Run `python -m minitron.cli <args>` (or any argv starting with an executable) in a new process group.

    `on_line` sees each output line; `poll` runs every `poll_every_s` while the child lives (to tail metrics).
    Returns the exit code; the group is killed if we leave early."""
    argv = args if os.path.isabs(args[0]) else [sys.executable, "-m", "minitron.cli", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
                            start_new_session=True)
    reader = threading.Thread(target=_pump, args=(proc, on_line), daemon=True)
    reader.start()
    try:
        last = time.monotonic()
        while proc.poll() is None:
            time.sleep(0.5)
            if poll is not None and time.monotonic() - last >= poll_every_s:
                poll()
                last = time.monotonic()
        reader.join(timeout=5)
        if poll is not None:
            poll()
        return proc.returncode
    finally:
        kill_group(proc)


def _pump(proc: subprocess.Popen, on_line) -> None:
    for line in proc.stdout:
        if on_line is not None:
            on_line(line.rstrip("\n"))
