"""Crash safety with real processes: `minitron run` on configs/tiny.yaml is killed (SIGKILL), interrupted (SIGINT,
as Ctrl-C sends it to the terminal's process group), loses its S3 endpoint while publishing, and has its checkpoints
corrupted (a flipped byte on a folder and on S3, an emptied bucket: every manifest missing). Every re-run of the same command resumes and ends
with a final student bit-identical to an uninterrupted run, and never registers a checkpoint that does not verify.

One uninterrupted reference run; the folder-store scenario on the embedded default; the S3 scenario with a moto S3
server and an `mlflow server` (tests/services.py). Budgets are tiny.yaml's, shrunk further below.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from services import FlakyProxy

pytestmark = [pytest.mark.slow, pytest.mark.services]

ROOT = Path(__file__).resolve().parent.parent
# tiny.yaml, shrunk: one candidate, no evaluation, a distillation of 128 steps with a checkpoint every 20
SETTINGS = ["evaluate=false", "search_max_candidates=2", "correction_tokens=4K", "search_tokens=4K", "distill_tokens=64K",
            "checkpoint_every=20", "eval_every=40", "max_corpus_tokens=100K"]
DISTILL_LINE = re.compile(r"Task run 'distill' - distill step=(\d+)")


class Run:
    """One `minitron run` process in its own session (so SIGINT to its group is exactly a terminal's Ctrl-C)."""

    def __init__(self, home: Path, env: dict, log: Path):
        self.home, self.log, self.start = home, log, time.monotonic()
        args = [sys.executable, "-m", "cli", "run", "--config", str(ROOT / "configs" / "tiny.yaml")]
        args += [x for kv in SETTINGS for x in ("--set", kv)]
        self.proc = subprocess.Popen(args, cwd=home.parent, env={**os.environ, "MINITRON_HOME": str(home), **env},
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def text(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def wait_for_checkpoint(self, step: int = 20, timeout: float = 300) -> None:
        """Until the distillation has written `step` (the kill then lands between two checkpoints)."""
        deadline = time.monotonic() + timeout
        while not list(self.home.glob(f"work/*/distill/run/checkpoints/step-{step}.pt")):
            assert self.proc.poll() is None, self.text[-3000:]
            assert time.monotonic() < deadline, self.text[-3000:]
            time.sleep(0.05)

    def finished(self) -> str:
        """The final model URI of a run that succeeded."""
        assert self.wait() == 0, self.text[-4000:]
        assert "Traceback" not in self.text
        return re.search(r"^final model: (\S+)$", self.text, re.M).group(1)

    def first_distill_step(self, timeout: float = 300) -> tuple[int, float]:
        """(step, seconds since the start) of the distillation's first progress line, watched as it appears."""
        deadline = time.monotonic() + timeout
        while not (m := DISTILL_LINE.search(self.text)):
            assert self.proc.poll() is None or DISTILL_LINE.search(self.text), self.text[-3000:]
            assert time.monotonic() < deadline, self.text[-3000:]
            time.sleep(0.1)
        return int(m.group(1)), time.monotonic() - self.start


def sha_of(uri: str, s3=None) -> str:
    if uri.startswith("file://"):
        return hashlib.sha256((Path(uri[len("file://"):]) / "model.safetensors").read_bytes()).hexdigest()
    bucket, key = uri[len("s3://"):].split("/", 1)
    return hashlib.sha256(s3.get_object(Bucket=bucket, Key=f"{key}/model.safetensors")["Body"].read()).hexdigest()


def registered_sources(tracking_uri: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    return [v.source for v in client.search_model_versions("name='minitron-tiny'")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """sha256 of the final student of an uninterrupted run."""
    home = tmp_path_factory.mktemp("reference")
    return sha_of(Run(home, {}, home / "run.log").finished())


def test_sigkill_mid_distillation_then_corruption_on_the_folder_store(reference, tmp_path):
    home = tmp_path / "home"
    killed = Run(home, {}, tmp_path / "killed.log")
    killed.wait_for_checkpoint()
    os.kill(killed.proc.pid, signal.SIGKILL)  # the CLI only: its Prefect API must die with it on its own
    killed.wait()
    deadline = time.monotonic() + 10  # the kernel sends it SIGTERM at once; uvicorn's shutdown takes a moment
    while [p for p in _processes() if f"MINITRON_HOME={home}" in p]:
        assert time.monotonic() < deadline, "the embedded API outlived the kill"
        time.sleep(0.2)

    resumed = Run(home, {}, tmp_path / "resumed.log")
    step, seconds = resumed.first_distill_step()
    final = resumed.finished()
    assert step > 0 and seconds < 60, (step, seconds)  # resumed from a checkpoint at once, not after a slot wait
    assert "its holder 'distill' of run" in resumed.text and "died; the kernel released it" in resumed.text
    assert sha_of(final) == reference

    # one flipped bit in the final weights: distill is recomputed (from its local checkpoints), nothing before it
    weights = Path(final[len("file://"):]) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64] ^= 0x01
    weights.write_bytes(bytes(data))
    flipped = Run(home, {}, tmp_path / "flipped.log")
    final2 = flipped.finished()
    assert re.search(r"distill: its cached result is not trusted \(file://.*/distill: model.safetensors does not "
                     r"match its sha256 in the manifest\): recomputing distill", flipped.text)
    assert "Task run 'correct-teacher" in flipped.text and "Cached(type=COMPLETED)" in flipped.text
    assert final2 != final and sha_of(final2) == reference

    from tasks.storage import open_store

    sources = registered_sources(f"sqlite:///{home / 'mlflow.db'}")
    assert sources.count(final) == 1 and final2 in sources  # the flipped one was never registered again
    assert not (tmp_path / "mlruns").exists()  # MLflow's artifacts live under MINITRON_HOME, not where we ran
    for source in set(sources) - {final}:  # and every other version points at bytes that verify
        open_store(home / "checkpoints").verify(source, "sha256")


def test_s3_outage_sigint_and_an_emptied_bucket(reference, tmp_path, s3_env, mlflow_server, capsys):
    s3 = s3_env.client()
    prefix = f"crash-{os.getpid()}"
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "MINITRON_CHECKPOINT_STORE": f"s3://{s3_env.checkpoint_bucket}/"
           f"{prefix}", "AWS_ENDPOINT_URL_S3": s3_env.url, "MLFLOW_S3_ENDPOINT_URL": s3_env.url}
    home = tmp_path / "home"

    # 1. the S3 endpoint dies while the first checkpoint is uploaded: one line naming it, local work kept
    proxy = FlakyProxy(int(s3_env.url.rsplit(":", 1)[1]))
    try:
        proxy.fail_after(200_000, float("inf"))  # past the start-up checks, inside the teacher's weights
        lost = Run(home, {**env, "AWS_ENDPOINT_URL_S3": proxy.url, "AWS_MAX_ATTEMPTS": "2"}, tmp_path / "lost.log")
        assert lost.wait() == 2, lost.text[-3000:]
    finally:
        proxy.close()
    errors = [line for line in lost.text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"at {proxy.url} failed after 2 attempts" in errors[0], lost.text[-3000:]
    assert "run the same command again" in errors[0] and "Traceback" not in lost.text

    # 2. the store is back: the teacher is published without retraining; Ctrl-C mid-distillation
    interrupted = Run(home, env, tmp_path / "interrupted.log")
    interrupted.wait_for_checkpoint()
    os.killpg(interrupted.proc.pid, signal.SIGINT)
    sent = time.monotonic()
    assert interrupted.wait(timeout=30) == 130
    assert time.monotonic() - sent < 10
    assert not re.search(r"correct-teacher step=\d+ tokens=\d+ loss=", interrupted.text)  # nothing trained again
    assert "Finished in state Cancelled('interrupted (Ctrl-C)" in interrupted.text
    assert "cancelled: interrupted (Ctrl-C)" in interrupted.text and "Traceback" not in interrupted.text
    assert all(not lock.read_text() for lock in (home / "slots").glob("*.lock"))  # released, not left to the kernel

    # 3. the same command resumes the distillation and ends bit-identical to the uninterrupted run
    resumed = Run(home, env, tmp_path / "resumed.log")
    assert resumed.first_distill_step()[0] > 0
    final = resumed.finished()
    assert sha_of(final, s3) == reference

    # 4. the bucket emptied (what a moto restart does): every stage is recomputed, the result is the same
    listing = s3.list_objects_v2(Bucket=s3_env.checkpoint_bucket, Prefix=prefix + "/")
    for obj in listing.get("Contents", []):
        s3.delete_object(Bucket=s3_env.checkpoint_bucket, Key=obj["Key"])
    emptied = Run(home, env, tmp_path / "emptied.log")
    final2 = emptied.finished()
    assert "correct-teacher: its cached result is not trusted (no complete checkpoint at s3://" in emptied.text
    assert sha_of(final2, s3) == reference
    summary_teacher = re.search(r"^- teacher checkpoint: `(s3://[^`]+)`$", emptied.text, re.M).group(1)
    assert s3.head_object(Bucket=s3_env.checkpoint_bucket,
                          Key=summary_teacher.split("/", 3)[3] + "/manifest.json")  # points at something real

    # 5. a flipped byte on S3 (a rewrite changes the ETag): distill is recomputed, never registered as it is
    bucket, key = final2[len("s3://"):].split("/", 1)
    body = bytearray(s3.get_object(Bucket=bucket, Key=f"{key}/model.safetensors")["Body"].read())
    body[-64] ^= 0x01
    s3.put_object(Bucket=bucket, Key=f"{key}/model.safetensors", Body=bytes(body))
    flipped = Run(home, env, tmp_path / "flipped.log")
    final3 = flipped.finished()
    assert "distill: its cached result is not trusted (s3://" in flipped.text and "ETag differs" in flipped.text
    assert sha_of(final3, s3) == reference
    sources = registered_sources(mlflow_server.url)
    assert sources.count(final2) == 1 and final3 in sources

    # the URIs the run prints are model specs: fetched from S3 and verified against their manifest
    from cli.main import main

    capsys.readouterr()
    assert main(["info", final3, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] > 0
    assert main(["info", final2]) == 2
    assert "model.safetensors: sha256 mismatch" in capsys.readouterr().err


def _processes() -> list[str]:
    """Command line plus environment of every process we may see (to find a leftover embedded API)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") + " " + env)
            except OSError:
                pass
    return out
