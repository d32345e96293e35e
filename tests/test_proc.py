"""minitron/proc.py with real processes: a child's environment, its process group killed as a whole when the caller
leaves early, and a child that dies with its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from minitron import proc


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): it is dead for our purposes
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def wait_dead(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_child_env_never_carries_our_mlflow_run(monkeypatch):
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc")
    monkeypatch.setenv("KEEP_ME", "1")
    env = proc.child_env({"EXTRA": "x"})
    assert "MLFLOW_RUN_ID" not in env and env["KEEP_ME"] == "1" and env["EXTRA"] == "x"
    assert os.environ["MLFLOW_RUN_ID"] == "abc"  # ours is untouched


@pytest.mark.parametrize("visible, indices, expected", [
    ("3,5", (0, 1), ["3", "5"]),  # renumbered by CUDA_VISIBLE_DEVICES: the machine's names
    ("3,5", (1,), ["5"]),
    ("", (0, 2), ["0", "2"]),  # nothing set: the indices are the machine's
])
def test_physical_ids(monkeypatch, visible, indices, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert proc.physical_ids(indices) == expected


def test_run_group_returns_the_exit_code_and_every_line():
    lines = []
    code = proc.run_group([sys.executable, "-c", "import sys; print('one'); print('two', file=sys.stderr); "
                                                 "sys.exit(3)"], on_line=lines.append)
    assert code == 3 and sorted(lines) == ["one", "two"]


def test_leaving_early_kills_the_whole_group():
    """The caller's poll raises (as Prefect's cancellation does): the child and its own child are both gone."""
    lines = []

    def poll():
        if len(lines) >= 1:
            raise KeyboardInterrupt

    script = "import subprocess, sys, time; c = subprocess.Popen(['sleep', '120']); print(c.pid, flush=True); " \
             "time.sleep(120)"
    with pytest.raises(KeyboardInterrupt):
        proc.run_group([sys.executable, "-c", script], on_line=lines.append, poll=poll, poll_every_s=0.2)
    grandchild = int(lines[0])
    assert wait_dead(grandchild, 15)


def test_a_child_dies_with_its_parent():
    """The parent is SIGKILLed (no chance to clean up): the kernel ends the child that asked for it."""
    parent_code = textwrap.dedent("""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; from minitron.proc import die_with_parent; "
            "die_with_parent(signal.SIGKILL); print('armed', flush=True); time.sleep(120)"],
            stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "armed"
        print(child.pid, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert wait_dead(child, 10)
    finally:
        parent.kill()
