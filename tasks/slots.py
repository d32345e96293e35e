"""The machine's compute slot: which devices a stage holds, released by the kernel when its holder dies.

Every device of the machine (each visible GPU, or the one CPU slot on a machine without GPUs) is a lock file in
`<MINITRON_HOME>/slots/`, held with `flock` for as long as a stage computes on that device. The kernel drops the
lock when the holding process exits for any reason (SIGKILL, a power cut of the process, an OOM kill), so a dead
run can never keep a device: the next run gets it at once. While it holds a lock, the holder writes who it is
(run, stage, PID, host, since) into the file, so a waiting stage can say every 30 s whom it waits for.

A stage that asks for k devices gets k disjoint indices, or waits until k are free. The first waiter is head of the
queue (it holds `queue.lock` while it waits), so a stage that needs many devices is not starved by a stream of
stages that need one. `flock` locks belong to an open file, not to a process, so threads of one flow run (mapped
candidates) exclude each other as well as other processes do.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from minitron.errors import UserError
from minitron.proc import physical_ids

WAIT_LOG_EVERY_S = 30.0  # a waiting stage names the holders this often
POLL_S = 0.5  # how often a waiting stage tries again (flock cannot wait for k locks at once)


def visible_gpus(device: str) -> tuple[int, ...]:
    """The inventory of this machine for a run on `device`: the visible CUDA indices, () when it runs on CPU."""
    import torch

    from minitron.models import resolve_device

    return tuple(range(torch.cuda.device_count())) if resolve_device(device).type == "cuda" else ()


def _lock_file(folder: Path, device: str) -> Path:
    return folder / f"{device.replace('/', '-')}.lock"


def _try_lock(path: Path) -> object | None:
    """The open, exclusively locked file, or None when another open file holds the lock."""
    f = open(path, "a+")  # noqa: SIM115 (kept open for as long as the lock is held)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _unlock(f) -> None:
    f.seek(0)
    f.truncate()  # a free lock file holds nobody: what it held would otherwise read as a dead holder
    f.flush()
    f.close()  # closing the last descriptor of the file drops the flock


def read_holder(path: Path) -> dict | None:
    try:
        text = path.read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):  # written right now, or never
        return None


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "a stage that is starting"
    return (f"{holder.get('stage')!r} of run {holder.get('run')!r} (pid {holder.get('pid')} on "
            f"{holder.get('host')}, since {holder.get('since')})")


class Slots:
    """The devices of one machine, as lock files in `folder`. `inventory` is the visible GPU indices (tests pass a
    simulated one); () means a machine without GPUs, whose one CPU slot is the whole machine."""

    def __init__(self, folder: str | Path, inventory: tuple[int, ...] = ()):
        self.folder = Path(folder)
        self.inventory = tuple(inventory)

    def _names(self) -> list[tuple[int | None, str]]:
        if not self.inventory:
            return [(None, "cpu")]
        return [(i, f"gpu-{p}") for i, p in zip(self.inventory, physical_ids(self.inventory), strict=True)]

    def holders(self) -> dict[str, dict | None]:
        """device name → who holds it now (None: free), read from the lock files."""
        out = {}
        for _, name in self._names():
            path = _lock_file(self.folder, name)
            f = _try_lock(path) if path.exists() else None
            if f is not None or not path.exists():
                if f is not None:
                    f.close()
                out[name] = None
            else:
                out[name] = read_holder(path) or {}
        return out

    @contextmanager
    def hold(self, count: int, holder: dict, *, timeout_s: float | None = None,
             log: Callable[[str], None] | None = None, stop: threading.Event | None = None
             ) -> Iterator[tuple[int, ...]]:
        """Hold `count` devices (the one CPU slot on a machine without GPUs) for the block; yields their CUDA indices
        (() on CPU). Waits while they are taken, logging the holders every WAIT_LOG_EVERY_S; raises UserError after
        `timeout_s`, KeyboardInterrupt when `stop` is set."""
        names = self._names()
        if self.inventory and count > len(names):
            raise UserError(f"{holder.get('stage')} needs {count} GPUs but this machine has {len(names)}: lower "
                            "nproc")
        want = count if self.inventory else 1
        self.folder.mkdir(parents=True, exist_ok=True)
        log = log or logging.getLogger(__name__).info
        record = {**holder, "pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.now().astimezone().isoformat(timespec="seconds")}
        start = last_log = time.monotonic()
        queue = None
        try:
            while True:
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt
                queue = queue or _try_lock(self.folder / "queue.lock")
                got = self._grab(names, want, record, log) if queue is not None else None
                if got is not None:
                    _unlock(queue)
                    queue = None
                    break
                now = time.monotonic()
                if timeout_s is not None and now - start > timeout_s:
                    raise UserError(f"{holder.get('stage')} waited {timeout_s / 60:.0f} min for {want} of "
                                    f"{', '.join(n for _, n in names)} on {socket.gethostname()}: "
                                    f"{self._busy_text()}: stop that run or raise queue_timeout_min")
                if now - last_log >= WAIT_LOG_EVERY_S:
                    log(f"{holder.get('stage')} waits for {want} device(s): {self._busy_text()}")
                    last_log = now
                time.sleep(POLL_S)
        finally:
            if queue is not None:
                _unlock(queue)
        indices, files = got
        try:
            yield indices
        finally:
            for f in files:
                _unlock(f)

    def _grab(self, names, want: int, record: dict, log) -> tuple[tuple[int, ...], list] | None:
        """Lock `want` free devices and write `record` into them, or lock none."""
        taken = []
        for index, name in names:
            path = _lock_file(self.folder, name)
            f = _try_lock(path)
            if f is None:
                continue
            left = read_holder(path)
            if left:  # its holder died holding it (a live one clears the file before it unlocks)
                log(f"{name}: its holder {describe_holder(left)} died; the kernel released it")
                f.seek(0)
                f.truncate()
                f.flush()
            taken.append((index, f))
            if len(taken) == want:
                break
        if len(taken) < want:
            for _, f in taken:
                f.close()
            return None
        for _, f in taken:
            f.seek(0)
            f.truncate()
            f.write(json.dumps(record))
            f.flush()
        return tuple(i for i, _ in taken if i is not None), [f for _, f in taken]

    def _busy_text(self) -> str:
        busy = {n: h for n, h in self.holders().items() if h is not None}
        return "; ".join(f"{n} held by {describe_holder(h)}" for n, h in busy.items()) or "all free now"

