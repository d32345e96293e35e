"""Child processes (torchrun, lm-eval) in their own process group, stopped as a group when their caller stops.

Prefect cancels a flow run by signalling its process; a plain `subprocess.run` would leave torchrun's workers (and
their GPU memory) behind. Each child gets a new session, and on any way out of `run_group` that is not a clean exit
(an exception, Prefect's cancellation or timeout, Ctrl-C) the whole group gets SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable

GRACE_S = 10.0  # between SIGTERM and SIGKILL: time for torchrun to tear down its workers


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: ours plus `extra`, minus MLFLOW_RUN_ID (a child must never log into our active
    run)."""
    env = {**os.environ, **(extra or {})}
    env.pop("MLFLOW_RUN_ID", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def physical_ids(indices: tuple[int, ...]) -> list[str]:
    """What the CUDA indices of this process are on the machine: CUDA_VISIBLE_DEVICES renumbers them, and two
    processes that see different subsets must still lock the same GPU under the same name."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return [visible[i] if i < len(visible) else str(i) for i in indices]


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


def run_group(argv: list[str], *, env: dict[str, str] | None = None, on_line: Callable[[str], None] | None = None,
              poll: Callable[[], None] | None = None, poll_every_s: float = 5.0) -> int:
    """Run `argv` in a new process group with `env` added to ours; return its exit code (the group is killed if we
    leave early). `on_line` sees each output line (stdout and stderr together); without it the child writes to our
    terminal (a progress bar stays a bar). `poll` runs every `poll_every_s` while the child lives (to tail metrics)
    and once after it ends."""
    piped = on_line is not None
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE if piped else None,
                            stderr=subprocess.STDOUT if piped else None, text=True, env=child_env(env),
                            start_new_session=True)
    reader = threading.Thread(target=_pump, args=(proc, on_line), daemon=True) if piped else None
    if reader is not None:
        reader.start()
    try:
        last = time.monotonic()
        while proc.poll() is None:
            time.sleep(0.2)
            if poll is not None and time.monotonic() - last >= poll_every_s:
                poll()
                last = time.monotonic()
        if reader is not None:
            reader.join(timeout=5)
        if poll is not None:
            poll()
        return proc.returncode
    finally:
        kill_group(proc)


def _pump(proc: subprocess.Popen, on_line) -> None:
    for line in proc.stdout:
        on_line(line.rstrip("\n"))


def die_with_parent(sig: signal.Signals) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux PR_SET_PDEATHSIG), so a torchrun
    agent or worker never outlives the process that started it, even when that one is SIGKILLed. Elsewhere a
    no-op. If the parent is already gone, exit now."""
    import ctypes
    import sys

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(sig), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        sys.exit(1)
