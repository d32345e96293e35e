"""`backend: ray`, the work itself: each training stage as a Ray Train job, the evaluations as Ray tasks.

A training stage needing N workers runs as `TorchTrainer(ScalingConfig(num_workers=N, use_gpu=...))`, on whichever
nodes Ray places them. Every worker runs `minitron.distill.worker.run_job` on the same serialised `TrainJob` that
torchrun's ranks read from job.json; Ray Train has joined the process group (NCCL on GPUs, gloo on CPUs) before.

    stage (the flow's process) ──fit──► Ray Train controller ──► N workers: run_job(job)
          ▲                                                          │ rank 0: step-N.pt, then ray.train.report
          └──── Channel actor: rank 0's metric records, a user error's line, the stage's "stop" ◄┘

Checkpoints and resume files are the loop's own (checkpoints/step-N.pt, metrics.jsonl) and travel through the
checkpoint store, never Ray's object store: Ray Train's storage is `<checkpoint store>/ray/<job>` (S3, or a folder
every node mounts), and each checkpoint rank 0 writes is reported there. When a worker dies (a node lost, an OOM
kill), Ray Train restarts the whole worker group, at most `ray_max_failures` times (FailureConfig), and the new
rank 0 gets the latest checkpoint back from the store (`ray.train.get_checkpoint`): the loop resumes from it exactly
as under torchrun. A re-run of the same config finds the same job name and resumes the same way. The trained model
goes the same road (a last report) and the stage downloads it. Models reach the workers as store URIs, fetched and
verified (sha256 manifest) once per node.

The worker side (`_train_worker`, `_command_task`, `Channel`) imports ray, minitron and tasks/storage (the store
client, boto3 for S3) only: never prefect or mlflow. The driver side imports tasks.common lazily, for the same reason.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from minitron.errors import UserError
from tasks import storage

# Settings of the flow's environment a worker needs to reach the same store and caches. Never secrets: every node
# holds its own S3 credentials (an instance role or AWS_* in its environment), which Ray Train's storage layer
# needs there too.
FORWARDED_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "HF_HUB_OFFLINE",
                 "MINITRON_CACHE")


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def job_name(ctx, stage: str) -> str:
    """A training stage's Ray Train job: one per config and stage, like its scratch folder, so a re-run of the same
    config resumes from the job's last checkpoint in the store."""
    from tasks.common import slug

    return f"{Path(ctx.work_dir).name}-{slug(stage)}"


def train_storage(store_uri: str):
    """(storage_path, filesystem) of Ray Train's storage: the `ray/` folder of the checkpoint store, through the
    pyarrow filesystem Ray Train writes with (S3 at the store's endpoint, path-style like tasks/storage's client)."""
    store = storage.open_store(store_uri)
    if not isinstance(store, storage.S3Store):
        return str(store.folder / "ray"), None
    import pyarrow.fs

    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if not region and not store.endpoint_url:
        region = pyarrow.fs.resolve_s3_region(store.bucket)
    filesystem = pyarrow.fs.S3FileSystem(endpoint_override=store.endpoint_url, region=region or "us-east-1")
    return "/".join(p for p in (store.bucket, store.prefix, "ray") if p), filesystem


def worker_spec(ctx, spec: str, key: str) -> str:
    """A model spec as a Ray worker on any node loads it: a local copy of a store checkpoint becomes that checkpoint's
    URI, another local folder (a pruned candidate, a teacher on this disk) is published to the store once per flow
    run (<run key>/ray-inputs/<key>), and anything else (a hub id, a built-in name) stays as it is."""
    from tasks.common import FETCHED, slug

    if not Path(spec).is_dir():
        return spec
    if spec in FETCHED:
        return FETCHED[spec]
    store = storage.open_store(ctx.store_uri)
    where = f"{ctx.run_key}/ray-inputs/{slug(key)}"
    return store.uri(where) if store.exists(where) else store.put_folder(spec, where)


# ----------------------------------------------------------------------------------------------------------------
# the driver's side


def fit(ctx, config, stage: str, cluster: dict, job, *, callback=None) -> dict:
    """Run training job `job` of stage `stage` as a Ray Train job on the run's cluster (its `cluster` resources) and
    return the worker's summary, like `launch`; the trained model is in job.out_dir afterwards. `callback` gets rank
    0's metric records as they come. Leaving early (an exception, a timeout) stops the job."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tasks.ray_cluster import uses_gpus

    use_gpu = uses_gpus(config, cluster)
    path, filesystem = train_storage(ctx.store_uri)
    remote = replace(job, model=worker_spec(ctx, job.model, f"{stage}-model"),
                     teacher=job.teacher and worker_spec(ctx, job.teacher, f"{stage}-teacher"))
    channel = ray.remote(num_cpus=0)(Channel).remote()
    name = job_name(ctx, stage)
    trainer = TorchTrainer(
        _train_worker, train_loop_config={"job": remote.to_json(), "name": name, "channel": channel,
                                          "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=job.nproc, use_gpu=use_gpu),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=config.ray_max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=job.train.keep_checkpoints),
                             worker_runtime_env={"env_vars": forwarded_env()}))
    outcome: dict = {}
    runner = threading.Thread(target=_fit_into, args=(trainer, outcome), daemon=True, name=f"ray-train {name}")
    runner.start()
    try:
        while runner.is_alive():
            runner.join(timeout=1.0)
            _deliver(ray.get(channel.drain.remote()), callback)
    except BaseException:
        channel.stop.remote()  # the workers stop at their next record, and a restart returns at once
        raise
    records, error = ray.get(channel.drain.remote())
    _deliver((records, error), callback)
    ray.kill(channel)
    if error:  # a rank's user error: its one line, not Ray's report of the failed worker group
        raise UserError(error)
    if "error" in outcome:
        raise RuntimeError(f"{stage}: {failure_line(outcome['error'], config.ray_max_failures)}") from None
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outcome["result"].checkpoint.to_directory(str(out))  # the model and result.json, from the store
    return json.loads((out / "result.json").read_text())


def _fit_into(trainer, outcome: dict) -> None:
    try:
        outcome["result"] = trainer.fit()
    except BaseException as err:  # noqa: BLE001 (reported by the stage's thread)
        outcome["error"] = err


def _deliver(drained: tuple[list[dict], str | None], callback) -> None:
    if callback is not None:
        for record in drained[0]:
            callback(record)


def failure_line(err: BaseException, max_failures: int) -> str:
    """One line for a Ray Train job that failed for good: how often, and the first worker's error."""
    from ray.train import WorkerGroupError

    cause = err
    if isinstance(err, WorkerGroupError) and err.worker_failures:
        rank, cause = min(err.worker_failures.items())
        cause = f"rank {rank}: {_first_line(cause)}"
    else:
        cause = _first_line(cause)
    return (f"the Ray Train job failed {max_failures + 1} time{'s' * (max_failures > 0)}, retries exhausted "
            f"(ray_max_failures = {max_failures}): {cause}; raise ray_max_failures or see the Ray logs")


def _first_line(err: BaseException) -> str:
    from ray.exceptions import ActorDiedError

    if isinstance(err, ActorDiedError):
        return "its worker process died"
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return text[:200]


def forget(ctx, stage: str) -> None:
    """Delete a published stage's Ray Train job from the store (its checkpoints and the model's second copy)."""
    import pyarrow.fs

    path, filesystem = train_storage(ctx.store_uri)
    filesystem = filesystem or pyarrow.fs.LocalFileSystem()
    target = f"{path}/{job_name(ctx, stage)}"
    if filesystem.get_file_info(target).type != pyarrow.fs.FileType.NotFound:
        filesystem.delete_dir(target)


def run_commands(commands: dict[str, tuple[list[str], int]], *, use_gpu: bool) -> dict[str, dict]:
    """`minitron` commands (each: argv, the index of its --out value) as Ray tasks at once, each requesting a GPU
    (a CPU on a CPU cluster) on whichever node has one free; → each command's JSON output. The command's model
    (argv[1]), a store URI, is fetched on the node. Leaving early cancels the tasks."""
    import ray

    task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1, runtime_env={"env_vars": forwarded_env()})(
        _command_task)
    refs = {name: task.options(name=name).remote(argv, out_at) for name, (argv, out_at) in commands.items()}
    try:
        return dict(zip(refs, ray.get(list(refs.values())), strict=True))
    except BaseException:
        for ref in refs.values():
            ray.cancel(ref, force=True)
        raise


# ----------------------------------------------------------------------------------------------------------------
# the workers' side


class Channel:
    """A training job's line back to its stage (a Ray actor without CPUs): rank 0's metric records, the first user
    error's one line, and the stage's stop."""

    def __init__(self):
        self.records, self.error, self.stopped = [], None, False

    def put(self, record: dict) -> bool:
        self.records.append(record)
        return self.stopped

    def fail(self, line: str) -> None:
        self.error = self.error or line

    def stop(self) -> None:
        self.stopped = True

    def over(self) -> bool:
        return self.stopped or self.error is not None

    def drain(self) -> tuple[list[dict], str | None]:
        records, self.records = self.records, []
        return records, self.error


def _train_worker(loop: dict) -> None:
    """One Ray Train worker: this rank's part of the job, as under torchrun. Rank 0 restores the latest checkpoint
    from the store, reports every checkpoint it writes and, at the end, the trained model."""
    import ray
    import ray.train
    from ray.train import Checkpoint

    from minitron.distill.worker import TrainJob, run_job

    channel = loop["channel"]
    if ray.get(channel.over.remote()):  # restarted after a user error or the stage's stop: nothing to redo
        return
    rank = ray.train.get_context().get_world_rank()
    job = TrainJob.from_json(loop["job"])
    out = node_dir("jobs") / loop["name"]  # this node's copy of the job folder (rank 0 writes it, as under torchrun)
    job = replace(job, out_dir=str(out), model=localise(job.model), teacher=job.teacher and localise(job.teacher))
    if loop["use_gpu"]:
        import ray.train.torch

        job = replace(job, train=replace(job.train, device=str(ray.train.torch.get_device())))
    finished = _broadcast(_restore(out, ray.train.get_checkpoint()) if rank == 0 else None)
    if finished:  # trained before, but its stage never published it: report the model again, train nothing
        ray.train.report({"final": 1}, checkpoint=Checkpoint.from_directory(str(out / "restored")) if rank == 0
                         else None)
        return

    def report(folder: Path | None, metrics: dict, dir_name: str | None = None) -> None:
        checkpoint = Checkpoint.from_directory(str(folder)) if folder is not None else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def on_checkpoint(path: Path) -> None:  # every rank: a report is a barrier
        folder = _staged(out, path.stem, [path, out / "metrics.jsonl"]) if rank == 0 else None
        report(folder, {"step": int(path.stem.split("-")[1])}, path.stem)

    def send(record: dict) -> None:
        if ray.get(channel.put.remote(record)):
            raise RuntimeError("the stage was stopped")

    try:
        run_job(job, send if rank == 0 else None, on_checkpoint=on_checkpoint)
    except UserError as err:
        ray.get(channel.fail.remote(str(err)))
        raise
    files = [f for f in out.iterdir() if f.is_file()] if rank == 0 else []  # the model, result.json, metrics
    report(_staged(out, "final", files) if rank == 0 else None, {"final": 1})
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)


def _restore(out: Path, checkpoint) -> bool:
    """Rank 0's job folder from the store: empty, or the latest reported checkpoint's files in place. True when that
    is a finished job's model (in out/restored)."""
    shutil.rmtree(out, ignore_errors=True)
    (out / "checkpoints").mkdir(parents=True)
    if checkpoint is None:
        return False
    restored = Path(checkpoint.to_directory(str(out / "restored")))
    if (restored / "result.json").is_file():
        return True
    for file in restored.iterdir():
        file.rename(out / ("checkpoints" if file.name.startswith("step-") else "") / file.name)
    return False


def _broadcast(value):
    """Rank 0's value on every rank (Ray Train joined the process group before the worker function runs)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _staged(out: Path, name: str, files: list[Path]) -> Path:
    """A folder of hard links to `files` (those that exist): what one report uploads."""
    folder = out / "report" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for file in files:
        if file.is_file():
            os.link(file, folder / file.name)
    return folder


def node_dir(kind: str) -> Path:
    """This node's folder for Ray work (job folders, fetched inputs), per user."""
    folder = Path(tempfile.gettempdir()) / f"minitron-ray-{os.getuid()}" / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def localise(spec: str) -> str:
    """A model spec loadable on this node: a store URI becomes a verified local copy (fetched once per node, under a
    lock the ranks of a node share); other specs stay as they are."""
    if not spec.startswith(("s3://", "file://")):
        return spec
    root = node_dir("inputs")
    dest = root / hashlib.sha256(spec.encode()).hexdigest()[:16]
    with open(root / f"{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / "manifest.json").is_file():
            storage.open_store(spec).get_folder("", dest)  # a store rooted at the checkpoint: sha256 verified
    return str(dest)


def _command_task(argv: list[str], out_at: int) -> dict:
    """A `minitron` command in its own process group on this node (its model URIs fetched here), → its JSON."""
    import sys

    from minitron.proc import run_group

    argv = [argv[0], localise(argv[1]), *argv[2:]]
    tail: list[str] = []
    with tempfile.TemporaryDirectory(dir=node_dir("commands")) as work:
        argv[out_at] = str(Path(work) / "out.json")
        code = run_group([sys.executable, "-m", "cli", *argv],
                         on_line=lambda line: (tail.append(line), tail.__delitem__(slice(0, -20))))
        if code != 0:
            raise RuntimeError(f"`minitron {argv[0]}` exited with status {code}: {tail[-1] if tail else ''}")
        return json.loads(Path(argv[out_at]).read_text())
