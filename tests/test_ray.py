"""backend: ray on a real local Ray cluster (one head per module, token auth on, 2 CPUs): tasks ask Ray for their
resources and the state API shows the requests; preflight joins the cluster with the token and refuses, in one line
and before any model work, a cluster that is too small, a wrong token and an address where nothing answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra import stack
from minitron.config import make_config
from minitron.errors import UserError
from tasks.ray_cluster import check_capacity, check_cluster

pytestmark = pytest.mark.services
ROOT = Path(__file__).resolve().parent.parent


def _wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.3)


def test_task_resource_requests_visible_in_state_api(ray_driver, tmp_path):
    """Three 1-CPU candidates on 2 CPUs: two run at once, the third waits for a CPU; a 1-GPU task waits for a GPU
    the cluster does not have. The state API shows each one's request and state."""
    ray = ray_driver
    from ray.util.state import list_tasks

    gate = tmp_path / "go"

    @ray.remote(num_cpus=1)
    def candidate(gate: str) -> int:
        while not os.path.exists(gate):
            time.sleep(0.05)
        return os.getpid()

    @ray.remote(num_gpus=1)
    def evaluation() -> None:
        pass

    job = ray.get_runtime_context().get_job_id()
    refs = [candidate.options(name=f"candidate-{i}").remote(str(gate)) for i in range(3)]
    gpu_ref = evaluation.options(name="evaluation").remote()

    def snapshot():
        rows = {t.name: t for t in list_tasks(filters=[("job_id", "=", job)], detail=True)}
        states = sorted(t.state for n, t in rows.items() if n.startswith("candidate-"))
        ready = states == ["PENDING_NODE_ASSIGNMENT", "RUNNING", "RUNNING"] and "evaluation" in rows
        return rows if ready else None

    rows = _wait_for(snapshot)
    assert rows, "two candidates running and one pending never showed in the state API"
    for i in range(3):
        assert rows[f"candidate-{i}"].required_resources == {"CPU": 1.0}
    assert rows["evaluation"].required_resources == {"CPU": 1.0, "GPU": 1.0}
    assert rows["evaluation"].state == "PENDING_NODE_ASSIGNMENT"  # no GPU anywhere: it waits, it never runs
    running = {rows[f"candidate-{i}"].node_id for i in range(3) if rows[f"candidate-{i}"].state == "RUNNING"}
    assert len(running) == 1  # one node (the head) runs both

    gate.touch()
    pids = ray.get(refs, timeout=60)
    assert len(pids) == 3 and len(set(pids[:2])) == 2  # the first two ran at the same time, in two processes
    ray.cancel(gpu_ref, force=True)


def test_preflight_accepts_a_cluster_that_fits(ray_driver, ray_cluster):
    config = make_config({"backend": "ray", "ray_address": ray_cluster.address, "nproc": 2, "device": "cpu"})
    resources = check_cluster(config, {"each training stage": 2})
    assert resources["CPU"] == 2.0 and resources.get("GPU", 0) == 0


@pytest.mark.parametrize("device, resources, need, message", [
    ("auto", {"CPU": 64.0, "GPU": 8.0}, 16, "has 8 GPUs but distillation needs 16: add GPU nodes"),
    ("auto", {"CPU": 64.0, "GPU": 8.0}, 8, None),
    ("auto", {"CPU": 2.0}, 2, None),  # a CPU cluster runs CPU workers (gloo)
    ("cuda", {"CPU": 64.0}, 1, "has 0 GPUs but distillation needs 1: add GPU nodes to the cluster or lower nproc "
                               "(or use device: cpu)"),
    ("cpu", {"CPU": 4.0, "GPU": 8.0}, 6, "has 4 CPUs but distillation needs 6"),
])
def test_capacity_check(device, resources, need, message):
    config = make_config({"backend": "ray", "device": device})
    if message is None:
        check_capacity(config, resources, {"distillation": need}, "head:6379")
    else:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_capacity(config, resources, {"distillation": need}, "head:6379")


@pytest.mark.parametrize("case", ["too-small", "wrong-token", "nothing-there"])
def test_run_refuses_in_one_line(case, ray_cluster, tmp_path):
    """`minitron run` with backend: ray, as a user runs it: exit 2, one line naming the problem, before any model
    work (no stage output, no checkpoint)."""
    address = ray_cluster.address if case != "nothing-there" else f"127.0.0.1:{stack.free_port()}"
    env = {**os.environ, **ray_cluster.env, "MINITRON_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT),
           "RAY_NUM_REDIS_GET_RETRIES": "3"}  # a refused token fails after 3 tries instead of Ray's 20
    env.pop("RAY_ADDRESS")
    if case == "wrong-token":
        env["RAY_AUTH_TOKEN"] = "0" * 64
    nproc = 3 if case == "too-small" else 2
    result = subprocess.run(
        [sys.executable, "-m", "cli", "run", "--config", str(ROOT / "configs" / "tiny.yaml"),
         "--set", "backend=ray", "--set", f"ray_address={address}", "--set", f"nproc={nproc}", "--set", "device=cpu",
         "--set", "search_tokens=40K"],  # room for one step of 3 ranks per candidate: only the cluster is too small
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    expected = {"too-small": f"error: the Ray cluster at {address} has 2 CPUs but each training stage needs 3: ",
                "wrong-token": f"error: the Ray cluster at {address} refused this process: check that "
                               "RAY_AUTH_TOKEN is that cluster's token",
                "nothing-there": f"error: nothing answers at {address}: "}[case]
    assert result.returncode == 2 and len(errors) == 1 and errors[0].startswith(expected), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not [p for p in (tmp_path / "home").rglob("*") if p.is_file() and "checkpoints" in p.parts]  # nothing ran


def test_empty_address_starts_a_local_cluster_with_token_auth(tmp_path):
    """ray_address empty and no RAY_ADDRESS: a local cluster for the process, with a fresh token that lives only in
    its environment (nothing written to ~/.ray); its dashboard refuses requests without the token."""
    script = """
import json, os
from infra.stack import bearer_header, http_status
from tasks.ray_cluster import connect
resources = connect(None)
import ray._private.worker
url = "http://" + ray._private.worker.get_dashboard_url().removeprefix("http://")
token = os.environ["RAY_AUTH_TOKEN"]
print(json.dumps({"cpu": resources["CPU"], "mode": os.environ["RAY_AUTH_MODE"], "token": len(token), "url": url,
                  "without": http_status(url + "/api/jobs/"), "with": http_status(url + "/api/jobs/", bearer_header(token))}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["cpu"] >= 1 and out["mode"] == "token" and out["token"] == 64
    assert out["url"].startswith("http://127.0.0.1:") and (out["without"], out["with"]) == (401, 200)
    assert not (tmp_path / ".ray").exists()
