"""Re-launch a `minitron` command under torchrun, so callers ask for `--nproc N` and never spell torchrun.

torchrun and its workers run in their own process group (session): on SIGINT/SIGTERM the whole group is stopped,
so a cancelled Prefect run or a Ctrl-C never leaves workers holding GPUs.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


def argv_of(parser: argparse.ArgumentParser, args: argparse.Namespace, skip: tuple[str, ...] = ("nproc",)
            ) -> list[str]:
    """The command line that parses back to `args` (positionals first, then every option that is set), less
    `skip`. `--nproc` must go: torchrun's own argparse rejects it as an ambiguous prefix of --nproc-per-node,
    and workers learn the world size from the environment anyway."""
    out = [str(getattr(args, a.dest)) for a in parser._actions if not a.option_strings and a.dest != "help"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help" or action.dest in skip:
            continue
        value = getattr(args, action.dest, None)
        if isinstance(action, argparse._StoreTrueAction):
            out += [action.option_strings[-1]] if value else []
        elif value is not None:
            out += [action.option_strings[-1], str(value)]
    return out


def run_under_torchrun(command: str, argv: list[str], nproc: int, grace_s: float = 30.0) -> int:
    """Run `minitron <command> <argv>` on `nproc` local processes; return torchrun's exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "minitron.cli", command, *argv]
    proc = subprocess.Popen(cmd, start_new_session=True)

    def stop(signum, _frame):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:  # interrupted while waiting: give workers a grace period, then kill the group
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
