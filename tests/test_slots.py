"""The machine's compute slot on a simulated 8-GPU inventory: stages get disjoint devices, get them back on failure,
cancellation and SIGKILL of their process, and queue (naming the holders) when every device is taken."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from minitron.errors import UserError
from minitron.proc import physical_ids
from tasks import slots
from tasks.common import INTERRUPTED, RunContext, hold_devices

GPUS = tuple(range(8))


def context(tmp_path, inventory=GPUS, timeout_s=30.0) -> RunContext:
    return RunContext(parent_run_id="", tracking_uri="", store_uri=str(tmp_path / "store"), run_key="k",
                      work_dir=str(tmp_path / "work"), slot="gpu:test", slot_timeout_s=timeout_s, stage_timeout_s=None,
                      refresh=False, slot_dir=str(tmp_path / "slots"), inventory=inventory, run_name="test run")


def hold_in_threads(ctx, counts, *, release: threading.Event) -> tuple[list, list[threading.Thread]]:
    """Start one thread per count, each holding that many devices until `release` is set."""
    got, ready = [], threading.Barrier(len(counts) + 1)

    def holder(i, n):
        with hold_devices(ctx, f"stage {i}", n) as devices:
            got.append(devices)
            ready.wait()
            release.wait()

    threads = [threading.Thread(target=holder, args=(i, n)) for i, n in enumerate(counts)]
    for t in threads:
        t.start()
    ready.wait(timeout=30)
    return got, threads


@pytest.mark.parametrize("counts", [[1] * 8, [2] * 4, [4, 2, 1, 1]], ids=["8x1", "4x2", "4+2+1+1"])
def test_concurrent_stages_get_disjoint_devices(tmp_path, counts):
    ctx, release = context(tmp_path), threading.Event()
    got, threads = hold_in_threads(ctx, counts, release=release)
    try:
        assert sorted(len(d) for d in got) == sorted(counts)
        flat = [i for d in got for i in d]
        assert sorted(flat) == list(GPUS)  # every device handed out once: disjoint and all used
        holders = slots.Slots(ctx.slot_dir, GPUS).holders()
        assert all(h and h["run"] == "test run" and h["stage"].startswith("stage ") for h in holders.values())
    finally:
        release.set()
        for t in threads:
            t.join()
    assert set(slots.Slots(ctx.slot_dir, GPUS).holders().values()) == {None}  # all returned


def test_queued_when_exhausted_and_the_wait_names_the_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(slots, "WAIT_LOG_EVERY_S", 0.2)
    ctx, release = context(tmp_path, timeout_s=60), threading.Event()
    _, threads = hold_in_threads(ctx, [4, 4], release=release)
    waited, lines = {}, []
    monkeypatch.setattr("tasks.common._log", lambda message, warning=False: lines.append(message))

    def late():
        start = time.monotonic()
        with hold_devices(ctx, "late stage", 2) as devices:
            waited["s"], waited["devices"] = time.monotonic() - start, devices

    t = threading.Thread(target=late)
    t.start()
    time.sleep(1.0)
    assert "s" not in waited  # queued while all 8 are held
    release.set()
    t.join(timeout=30)
    for holder in threads:
        holder.join()
    assert waited["s"] >= 1.0 and len(waited["devices"]) == 2
    assert any("late stage waits for 2 device(s)" in line and "held by 'stage 0' of run 'test run' (pid" in line
               for line in lines), lines


def test_timeout_is_one_line_naming_the_holders(tmp_path):
    ctx, release = context(tmp_path, inventory=(0,), timeout_s=0.5), threading.Event()
    _, threads = hold_in_threads(ctx, [1], release=release)
    try:
        with pytest.raises(UserError, match=r"waited 0 min for 1 of gpu-0 .* held by 'stage 0' of run 'test run'"):
            with hold_devices(ctx, "second", 1):
                pass
    finally:
        release.set()
        threads[0].join()


def test_devices_return_on_failure_and_cancellation(tmp_path):
    ctx = context(tmp_path)
    with pytest.raises(RuntimeError):
        with hold_devices(ctx, "fails", 8):
            raise RuntimeError("stage failed")
    with pytest.raises(KeyboardInterrupt):  # Prefect's cancellation and Ctrl-C unwind the block the same way
        with hold_devices(ctx, "cancelled", 8):
            raise KeyboardInterrupt
    with hold_devices(ctx, "after", 8) as devices:  # all eight are free again, at once
        assert devices == GPUS


def test_a_waiting_stage_stops_on_interrupt(tmp_path):
    ctx, release = context(tmp_path, inventory=(0,)), threading.Event()
    _, threads = hold_in_threads(ctx, [1], release=release)
    INTERRUPTED.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            with hold_devices(ctx, "waiting", 1):
                pass
    finally:
        INTERRUPTED.clear()
        release.set()
        threads[0].join()


def test_sigkill_of_the_holder_frees_its_devices_at_once(tmp_path):
    """The kernel drops a dead process's locks: a killed run never blocks the next one (no timeout, no cleanup)."""
    code = textwrap.dedent(f"""
        import time
        from tasks import slots
        with slots.Slots({str(tmp_path / 'slots')!r}, {GPUS!r}).hold(8, {{"run": "doomed", "stage": "distill"}}):
            print("held", flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        holders = slots.Slots(tmp_path / "slots", GPUS).holders()
        assert {h["run"] for h in holders.values()} == {"doomed"}
        proc.kill()
        proc.wait()
        lines = []
        with slots.Slots(tmp_path / "slots", GPUS).hold(8, {"run": "next", "stage": "distill"}, timeout_s=5,
                                                        log=lines.append) as devices:
            assert devices == GPUS
        assert any("its holder 'distill' of run 'doomed'" in line and "died" in line for line in lines)
    finally:
        proc.kill()


def test_cpu_machine_has_one_slot(tmp_path):
    ctx, release = context(tmp_path, inventory=()), threading.Event()
    got, threads = hold_in_threads(ctx, [1], release=release)
    try:
        assert got == [()]
        with pytest.raises(UserError, match="waited"):
            with hold_devices(context(tmp_path, inventory=(), timeout_s=0.3), "second", 1):
                pass
    finally:
        release.set()
        threads[0].join()


def test_more_devices_than_the_machine_has(tmp_path):
    with pytest.raises(UserError, match="needs 9 GPUs but this machine has 8"):
        with hold_devices(context(tmp_path), "huge", 9):
            pass


def test_physical_ids_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert physical_ids((0, 2)) == ["4", "6"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert physical_ids((0, 2)) == ["0", "2"]
