"""backend: ray on a real local Ray cluster (one head per module, token auth on, RAY_CPUS CPUs): tasks ask Ray for
their resources and the state API shows the requests; preflight joins the cluster with the token and refuses, in one
line and before any model work, a cluster that is too small, a wrong token and an address where nothing answers.
Training stages run as Ray Train jobs that survive a killed worker, and the tiny flow on Ray matches the local
backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import children_of, tiny
from services import RAY_CPUS

from infra import stack
from minitron.config import load_config_file, make_config
from minitron.errors import UserError
from tasks.ray_cluster import check_capacity, check_cluster

pytestmark = [pytest.mark.services, pytest.mark.usefixtures("one_thread")]
ROOT = Path(__file__).resolve().parent.parent


def _wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.3)


def test_task_resource_requests_visible_in_state_api(ray_driver, tmp_path):
    """RAY_CPUS + 1 1-CPU candidates on RAY_CPUS CPUs: all but one run at once, the last waits for a CPU; a 1-GPU
    task waits for a GPU the cluster does not have. The state API shows each one's request and state."""
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
    n = RAY_CPUS + 1
    refs = [candidate.options(name=f"candidate-{i}").remote(str(gate)) for i in range(n)]
    gpu_ref = evaluation.options(name="evaluation").remote()

    def snapshot():
        rows = {t.name: t for t in list_tasks(filters=[("job_id", "=", job)], detail=True)}
        states = sorted(t.state for n, t in rows.items() if n.startswith("candidate-"))
        ready = states == ["PENDING_NODE_ASSIGNMENT", *["RUNNING"] * RAY_CPUS] and "evaluation" in rows
        return rows if ready else None

    rows = _wait_for(snapshot)
    assert rows, f"{RAY_CPUS} candidates running and one pending never showed in the state API"
    for i in range(n):
        assert rows[f"candidate-{i}"].required_resources == {"CPU": 1.0}
    assert rows["evaluation"].required_resources == {"CPU": 1.0, "GPU": 1.0}
    assert rows["evaluation"].state == "PENDING_NODE_ASSIGNMENT"  # no GPU anywhere: it waits, it never runs
    running = {rows[f"candidate-{i}"].node_id for i in range(n) if rows[f"candidate-{i}"].state == "RUNNING"}
    assert len(running) == 1  # one node (the head) runs them all

    gate.touch()
    pids = ray.get(refs, timeout=60)
    assert len(pids) == n and len(set(pids[:RAY_CPUS])) == RAY_CPUS  # the first ran at the same time, in own processes
    ray.cancel(gpu_ref, force=True)


def test_preflight_accepts_a_cluster_that_fits(ray_driver, ray_cluster):
    config = make_config({"backend": "ray", "ray_address": ray_cluster.address, "nproc": 2, "device": "cpu"})
    resources = check_cluster(config, lambda gpu: {"each training stage": 2})
    assert resources["CPU"] == RAY_CPUS and resources.get("GPU", 0) == 0


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


@pytest.mark.parametrize("gpus, card, message", [
    (8, "H100", None),
    (4, "H100", "has 4 GPUs but teacher correction needs 8: add GPU nodes"),
    (16, "A100-40G", "distillation on the cluster's a100-40gb: does not fit: "),  # no number of them holds it
])
def test_preflight_sizes_the_stages_for_the_cluster_gpus(gpus, card, message):
    """The 8B→4B width preset on a GPU cluster: each training stage needs the GPUs the dry run plans on the cluster's
    card (8 H100s; make_plan is the reference), and preflight refuses a cluster with fewer in one line."""
    from flows.preflight import cluster_needs
    from minitron.models import load_config
    from minitron.plan import make_plan
    from tasks.ray_cluster import cluster_gpu

    config = load_config_file(ROOT / "configs" / "llama-3.1-8b-minitron-4b-width.yaml", ["backend=ray"])
    teacher = load_config(config.teacher)
    resources = {"CPU": 64.0, "GPU": float(gpus), f"accelerator_type:{card}": 1.0}
    try:
        needs = cluster_needs(config, teacher, cluster_gpu(config, resources))
        check_capacity(config, resources, needs, "head:6379")
    except UserError as err:
        assert message and message in str(err) and "\n" not in str(err), err
        return
    assert message is None
    plan = make_plan(config, "h100-80gb", teacher_config=teacher)
    assert needs == {"teacher correction": 8, "distillation": 8} == {
        st.name.split(" ", 1)[1]: st.gpus for st in plan.stages if st.kind == "train"}


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
    nproc = RAY_CPUS + 1 if case == "too-small" else 2
    result = subprocess.run(
        [sys.executable, "-m", "cli", "run", "--config", str(ROOT / "configs" / "tiny.yaml"),
         "--set", "backend=ray", "--set", f"ray_address={address}", "--set", f"nproc={nproc}", "--set", "device=cpu",
         "--set", "search_tokens=80K"],  # room for one step of RAY_CPUS + 1 ranks per candidate: only the cluster is too small
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    expected = {"too-small": f"error: the Ray cluster at {address} has {RAY_CPUS} CPUs but each training stage needs "
                             f"{RAY_CPUS + 1}: ",
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


# -- training stages as Ray Train jobs ------------------------------------------------------------------------------


def ray_run(tmp_path, store: str, **overrides):
    """A RunContext and a run config for calling the Ray training path directly (the flow builds the same)."""
    from tasks.common import RunContext

    ctx = RunContext(parent_run_id="", tracking_uri="", store_uri=store, run_key="test/run", work_dir=str(tmp_path /
                     "work"), slot="cpu:test", slot_timeout_s=1.0, stage_timeout_s=None, refresh=False)
    return ctx, make_config({"backend": "ray", "device": "cpu", "seq_len": 16, "val_fraction": 0.3,
                             "batch_size": 2, "lr": 3e-3, "eval_every": 50, "val_batches": 2, "checkpoint_every": 20,
                             **overrides})


def distill_job(config, folders, corpus, out: Path, nproc: int):
    from minitron.cost import Parallelism
    from tasks.common import training_job

    config = config.model_copy(update={"data": str(corpus), "nproc": nproc})
    teacher, student = folders
    return training_job(config, "distill", "distill_tokens", Parallelism(nproc, "ddp", False), out,
                        model=str(student), teacher=str(teacher))


def registered_step(storage: Path) -> int | None:
    """The step of the latest checkpoint Ray Train has registered in the store for the one job under `storage`."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            return json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"].get("step")
        except (ValueError, KeyError, TypeError):  # being written, or nothing registered yet
            return None
    return None


def kill_a_worker_once_checkpointed(storage: Path, killed: dict) -> threading.Thread:
    """Watch Ray Train's storage folder; once a checkpoint of the job is registered there, SIGKILL one of its worker
    processes (found through the state API) and record the step, PID and placement group."""
    from ray.util.state import list_actors

    def watch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if step := registered_step(storage):
                workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                                      detail=True)
                if workers:
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    killed.update(step=step, pid=workers[-1].pid, group=workers[-1].placement_group_id)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_killed_worker_restarts_the_job_from_its_last_checkpoint(ray_driver, folders, corpus, tmp_path):
    """A 2-worker Ray Train distillation: once a checkpoint is in the store, one worker process gets SIGKILL. Ray
    Train restarts the worker group (ray_max_failures = 1), rank 0 gets the checkpoint back from the store and the
    loop resumes from it; the student ends where one process at the same global batch ends (atol 1e-5, 0.3% of an
    Adam step, as the torchrun resume test)."""
    from ray.util.state import get_placement_group
    from transformers import AutoModelForCausalLM

    from minitron.distill.worker import launch
    from tasks import ray_train

    ctx, config = ray_run(tmp_path, str(tmp_path / "store"), ray_max_failures=1, distill_tokens=200 * 4 * 16)
    job = distill_job(config, folders, corpus, tmp_path / "two", 2)
    killed, records = {}, []
    watcher = kill_a_worker_once_checkpointed(tmp_path / "store" / "ray", killed)
    result = ray_train.fit(ctx, config, "distill", {"CPU": float(RAY_CPUS)}, job, callback=records.append)
    watcher.join(timeout=5)
    assert killed, "no checkpoint reached the store"
    # the job's request, as the state API shows it: one placement group, a bundle of 1 CPU per worker
    assert [b["unit_resources"] for b in get_placement_group(killed["group"]).bundles] == [{"CPU": 1.0}] * 2
    assert result["world"] == 2 and result["steps"] == 200 and 20 <= result["start_step"] < 200, result
    assert result["start_step"] >= killed["step"]  # from a checkpoint in the store, not from step 0
    assert records[-1]["step"] == 200  # rank 0's records reached the stage's callback, across the restart

    one = launch(distill_job(config.model_copy(update={"batch_size": 4}), folders, corpus, tmp_path / "one", 1))
    assert one["steps"] == 200
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / d) for d in ("one", "two"))
    for (name, p1), p2 in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p2, p1, rtol=0, atol=1e-5, msg=name)


def test_a_job_out_of_retries_fails_in_one_line(ray_driver, folders, corpus, tmp_path):
    """ray_max_failures = 0: the first dead worker ends the stage, with one line that says so."""
    from tasks import ray_train

    ctx, config = ray_run(tmp_path, str(tmp_path / "store"), ray_max_failures=0, distill_tokens=200 * 4 * 16)
    killed = {}
    watcher = kill_a_worker_once_checkpointed(tmp_path / "store" / "ray", killed)
    with pytest.raises(RuntimeError) as failed:
        ray_train.fit(ctx, config, "distill", {"CPU": float(RAY_CPUS)},
                      distill_job(config, folders, corpus, tmp_path / "o", 2))
    watcher.join(timeout=5)
    assert killed
    line = str(failed.value)
    assert "\n" not in line and line.startswith("distill: the Ray Train job failed 1 time, retries exhausted "
                                                "(ray_max_failures = 0): rank "), line


def test_a_user_error_on_a_ray_worker_is_one_line(ray_driver, folders, corpus, tmp_path, tiny_tokenizer):
    """Found on the workers once the models are loaded: the stage fails with that line (a UserError), not with Ray's
    report of a failed worker group, and no retry trains anything."""
    from conftest import build_tiny_model

    from minitron.models import save_model
    from tasks import ray_train

    ctx, config = ray_run(tmp_path, str(tmp_path / "store"), ray_max_failures=2, distill_tokens=640)
    other_vocab = save_model(build_tiny_model("llama", vocab_size=300), tiny_tokenizer, tmp_path / "v300")
    with pytest.raises(UserError, match="^teacher and student vocabularies differ"):
        ray_train.fit(ctx, config, "distill", {"CPU": float(RAY_CPUS)},
                      distill_job(config, (folders[0], other_vocab), corpus, tmp_path / "o", 2))


# -- the tiny flow on Ray against the local backend -----------------------------------------------------------------


def watch_training_groups(seen: list, stop: threading.Event) -> threading.Thread:
    """Poll the state API for the Ray Train jobs' placement groups while the flow runs: each poll appends the
    bundles of every placement group that holds its resources (CREATED) at that moment."""
    from ray.util.state import list_placement_groups

    def watch():
        while not stop.is_set():
            groups = list_placement_groups(filters=[("state", "=", "CREATED")], detail=True)
            seen.append({g.placement_group_id: [b["unit_resources"] for b in g.bundles] for g in groups})
            stop.wait(0.5)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_tiny_flow_on_ray_matches_the_local_backend(ray_driver, ray_cluster, services):  # noqa: F811
    """configs/tiny.yaml with nproc 2 (DDP, gloo) under backend local (torchrun) and backend ray (every training
    stage a 2-worker Ray Train job): the same final validation KL, and the search's two candidates trained as
    concurrent Ray Train jobs, each requesting 1 CPU per worker as the state API shows; under ray the three
    evaluations run as Ray tasks and their metrics reach the models' runs.

    Both backends run the same run_job on the same TrainJob with the same 2-rank gloo all-reduce, so the students
    agree to fp32 reduction order: rel 1e-4 (the torchrun-vs-one-process test allows 1e-3 for FSDP's
    reduce-scatter); distillation moves the KL by more than half, so a lost rank or data slice would not pass."""
    from mlflow import MlflowClient

    from flows.compress import compress

    common = dict(evaluate=False, axes="width", tolerance=0.2, search_max_candidates=2, device="cpu",
                  nproc=2, parallel="ddp", batch_size=4)
    local = compress(tiny(name="local", **common))
    seen, stop = [], threading.Event()
    watcher = watch_training_groups(seen, stop)
    try:
        on_ray = compress(tiny(name="on-ray", backend="ray", ray_address=ray_cluster.address,
                               **{**common, "evaluate": True}))
    finally:
        stop.set()
        watcher.join(timeout=10)
    client = MlflowClient()
    kl = {k: client.get_run(v["parent_run_id"]).data.metrics["final_val_kl"] for k, v in
          {"local": local, "ray": on_ray}.items()}
    assert kl["ray"] == pytest.approx(kl["local"], rel=1e-4), kl
    trained = {name: run for name, run in children_of(on_ray["parent_run_id"]).items()
               if name in ("correct-teacher", "distill") or name.startswith("candidate ")}
    assert len(trained) == 4 and all(r.info.status == "FINISHED" for r in trained.values())
    assert all(r.data.params["parallelism"] == "DDP x2" for r in trained.values())
    # the candidates ran side by side: two training jobs held their placement groups at once, 1 CPU per worker
    assert max(len(poll) for poll in seen) == 2, seen
    assert all(bundles == [{"CPU": 1.0}] * 2 for poll in seen for bundles in poll.values()), seen
    # the three evaluations ran as Ray tasks, 1 CPU each, and their results reached the models' MLflow runs
    from ray.util.state import list_tasks

    names = [f"evaluate {m}" for m in ("teacher", "pruned", "final")]
    tasks = {name: list_tasks(filters=[("name", "=", name)], detail=True) for name in names}
    assert all(len(runs) == 1 and runs[0].state == "FINISHED" and runs[0].required_resources == {"CPU": 1.0}
               for runs in tasks.values()), tasks
    children = children_of(on_ray["parent_run_id"])
    assert all("eval/corpus_cloze/acc" in children[name].data.metrics for name in names)
