"""Benchmark: peak RSS of the flow process of the CPU demo (`minitron run --config configs/demo-cpu.yaml`), per stage.

The CLI runs the flow and every one-device stage in its own process (Prefect's temporary API and lm-eval are child
processes, measured apart), so its RSS is what the stages hold: the models, optimizer state and data of the stage
that runs, plus what earlier stages failed to release. The process's RSS is sampled every 0.5 s from /proc, each
sample attributed to the stage whose task run was the last to start; the high-water mark (VmHWM) is the peak.

    python bench/demo_memory.py                       # the demo as the README runs it (~15 min on 2 cores)
    python bench/demo_memory.py --set distill_tokens=8K --set evaluate=false   # quicker: peaks come in the first steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK_LINE = re.compile(r"Task run '([^']+)' - ")


def kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], help="config overrides, as for `minitron run`")
    args = p.parse_args()
    home = Path(tempfile.mkdtemp(prefix="demo-memory-"))
    argv = [sys.executable, "-m", "cli", "run", "--config", str(ROOT / "configs/demo-cpu.yaml")]
    argv += [x for s in args.set for x in ("--set", s)]
    proc = subprocess.Popen(argv, cwd=home, env={**os.environ, "MINITRON_HOME": str(home / "home")},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stage, peaks, hwm = "start-up", {}, 0
    lines: list[str] = []

    def read() -> None:
        nonlocal stage
        for line in proc.stdout:
            lines.append(line)
            if m := TASK_LINE.search(line):
                stage = m.group(1).split(" ")[0]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    start = time.monotonic()
    while proc.poll() is None:
        try:
            rss, hwm = kib(proc.pid, "VmRSS"), kib(proc.pid, "VmHWM")
        except (OSError, ValueError):
            break
        peaks[stage] = max(peaks.get(stage, 0), rss)
        time.sleep(0.5)
    proc.wait()
    reader.join(timeout=5)
    if proc.returncode != 0:
        sys.exit("".join(lines[-40:]) + f"\nthe demo exited with status {proc.returncode}")
    print("".join(lines[-30:]))  # the demo's own closing summary, for the README's figures
    rows = [{"stage": name, "peak_rss_mib": round(value / 1024, 1)} for name, value in peaks.items()]
    print(f"{'stage':<24} peak RSS (MiB)")
    for row in rows:
        print(f"{row['stage']:<24} {row['peak_rss_mib']:>10}")
    print(f"{'flow process (VmHWM)':<24} {hwm / 1024:>10.1f}    wall {time.monotonic() - start:.0f} s")
    out = ROOT / "bench/results/demo_memory-cpu.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"bench": "demo_memory", "device": "cpu", "cpu": platform.machine(),
                               "config": "configs/demo-cpu.yaml", "overrides": args.set, "stages": rows,
                               "peak_rss_mib": round(hwm / 1024, 1),
                               "wall_s": round(time.monotonic() - start)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
