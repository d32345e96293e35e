"""The one launch path of every training stage: teacher correction, a candidate's short distillation, distillation.

A stage hands over one `TrainJob`: the resolved `DistillConfig`, the corpus as `load_token_data` keyword arguments,
the model specs and the output folder. `launch(job)` runs it in this process when it uses one device, or under
torchrun on `job.nproc` processes. The job reaches the ranks as one JSON file, `<out>/job.json`, and

    python -m minitron.distill.worker <out>/job.json

is what `launch` starts (it becomes the torchrun agent) and what torchrun starts on every rank: the one command line
in minitron/ that parses input, and it reads nothing but that file. No setting is rebuilt from flags, so every rank
runs exactly what the stage decided.

Beside the loop's files (the model, checkpoints/, metrics.jsonl) the output folder gets job.json, progress.jsonl
(every metric record of rank 0, which `launch` tails into the caller's callback), and result.json (the summary
`launch` returns) or error.json (a user error's one line).

Lifetime: the agent and its ranks run in their own session. Leaving `launch` other than by a clean exit (an
exception, a timeout, Ctrl-C) stops the group: SIGTERM, which torchrun forwards to its ranks, then SIGKILL. If the
caller dies outright, the kernel sends the agent SIGTERM, and each rank gets SIGKILL when its agent dies, so no rank
outlives the stage that started it.

Host memory: the frozen teacher loads in its compute dtype straight to the rank's device. The trained model loads in
fp32 straight to the device (one process, DDP) or, under FSDP, is built on the meta device on every rank while rank 0
alone reads the checkpoint's tensors in their stored dtype; the loop broadcasts them into each rank's shards.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from minitron.config import DistillConfig
from minitron.errors import UserError


@dataclass
class TrainJob:
    """Everything one training stage's ranks need, JSON-serialisable."""

    objective: Literal["distill", "correct"]  # distil `teacher` into `model`, or fine-tune `model` with CE
    model: str  # the trained model (the student, or the teacher being corrected): a spec `load_model` reads
    data: dict  # `load_token_data` keyword arguments, with `spec` and `seq_len`
    train: DistillConfig
    out_dir: str  # model, checkpoints/, metrics.jsonl and the files above
    teacher: str | None = None  # the frozen teacher (distillation only)
    nproc: int = 1  # processes: 1 runs in the caller's process, more under torchrun
    resume: bool = True  # continue from the latest checkpoint in out_dir
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.objective not in ("distill", "correct") or (self.objective == "distill") != bool(self.teacher):
            raise ValueError(f"a {self.objective!r} job needs a teacher exactly when it distils")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainJob:
        values = json.loads(text)
        return cls(**{**values, "train": DistillConfig(**values["train"])})


# ----------------------------------------------------------------------------------------------------------------
# the caller's side


def launch(job: TrainJob, *, devices: tuple[int, ...] = (), callback: Callable[[dict], None] | None = None,
           on_line: Callable[[str], None] | None = None) -> dict:
    """Run `job` and return its summary (`run_job`). `devices`: the CUDA indices the stage holds (none on a CPU
    machine), one per process; `callback` gets every metric record of rank 0; `on_line` every output line of the
    torchrun processes (without it they write to this terminal)."""
    if job.nproc == 1 or "LOCAL_RANK" in os.environ:  # one device, or a user's own torchrun around the CLI
        if devices and job.train.device in ("auto", "cuda"):
            job = replace(job, train=replace(job.train, device=f"cuda:{devices[0]}"))
        return run_job(job, callback)
    if devices and len(devices) != job.nproc:
        raise ValueError(f"{job.nproc} processes need {job.nproc} devices, got {list(devices)}")
    from minitron.proc import physical_ids, run_group

    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("progress.jsonl", "result.json", "error.json"):
        (out / name).unlink(missing_ok=True)
    (out / "job.json").write_text(job.to_json())
    env = {"CUDA_VISIBLE_DEVICES": ",".join(physical_ids(devices))} if devices else {}  # as the machine numbers them
    code = run_group([sys.executable, "-m", "minitron.distill.worker", str(out / "job.json")], env=env,
                     on_line=on_line, poll=_Tail(out / "progress.jsonl", callback), poll_every_s=1.0)
    if (out / "error.json").is_file():
        raise UserError(json.loads((out / "error.json").read_text())["error"])
    if code != 0 or not (out / "result.json").is_file():
        raise RuntimeError(f"training under torchrun ({job.nproc} processes) exited with status {code}: see the "
                           f"output above and {out}")
    return json.loads((out / "result.json").read_text())


class _Tail:
    """Feeds the complete lines appended to a JSONL file since the last call to `callback`."""

    def __init__(self, path: Path, callback: Callable[[dict], None] | None):
        self.path, self.callback, self.offset = path, callback, 0

    def __call__(self) -> None:
        if self.callback is None or not self.path.is_file():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            self.callback(json.loads(line))


# ----------------------------------------------------------------------------------------------------------------
# the ranks' side


def run_job(job: TrainJob, callback: Callable[[dict], None] | None = None,
            on_checkpoint: Callable[[Path], None] | None = None) -> dict:
    """Run `job` on this process: all of it, or this rank's part under torchrun or Ray Train (which joined the
    process group before). Returns (and rank 0 writes to result.json) the summary: the corpus tokens read, steps,
    tokens, where a resume started, validation before and after, tokens/s, and every rank's peak host RSS in MiB
    once the models and data are loaded and at the end. `on_checkpoint(path)` runs on every rank after each
    checkpoint (rank 0 wrote it)."""
    import torch.distributed as dist

    from minitron.data import load_token_data
    from minitron.distill.loop import check_compatible, correct_teacher, distill, setup_distributed
    from minitron.models import load_model, resolve_dtype

    rank, world, device, joined = setup_distributed(job.train.device)
    try:
        model, tokenizer, weights = _load_trained(job, device, rank, world)
        teacher = None
        if job.objective == "distill":  # frozen: in the compute dtype, straight to this rank's device
            teacher, teacher_tokenizer = load_model(
                job.teacher, dtype=resolve_dtype(job.train.dtype, device), device=device,
                allow_pickle=job.allow_pickle, trust_remote_code=job.trust_remote_code)
            check_compatible(teacher, model, teacher_tokenizer, tokenizer)
        kwargs = {k: v for k, v in job.data.items() if k not in ("spec", "seq_len")}
        if world > 1 and rank > 0:  # rank 0 opens (or builds) the token store first, then the others read it
            dist.barrier()
        data = load_token_data(job.data["spec"], tokenizer, job.data["seq_len"], **kwargs)
        if world > 1 and rank == 0:
            dist.barrier()
        loaded = _peak_rss_mib()
        train = distill if teacher is not None else correct_teacher
        result = train(*((teacher, model) if teacher is not None else (model,)), data, job.train,
                       out_dir=job.out_dir, tokenizer=tokenizer, callback=callback, resume=job.resume,
                       init_weights=weights, on_checkpoint=on_checkpoint)
        peaks = [(loaded, _peak_rss_mib())]
        if world > 1:
            peaks = [None] * world
            dist.all_gather_object(peaks, (loaded, _peak_rss_mib()))
        summary = {"objective": job.objective, "world": world, "corpus_tokens": data.tokens,
                   "steps": result.steps, "tokens": result.tokens,
                   "start_step": result.start_step, "val_kl_before": result.first_val_kl,
                   "val_ce_before": result.val_loss_before, "val_kl": result.last_val_kl,
                   "val_ce": result.val_loss_after, "tokens_per_s": result.metrics.get("tokens_per_s"),
                   "load_peak_rss_mib": [p[0] for p in peaks], "peak_rss_mib": [p[1] for p in peaks]}
        if rank == 0:
            _write_atomic(Path(job.out_dir) / "result.json", summary)
        return summary
    finally:
        if joined:
            dist.destroy_process_group()


def _load_trained(job: TrainJob, device, rank: int, world: int):
    """(model, tokenizer, weights): the trained model in fp32 on this rank's device (weights None), or under FSDP
    built on the meta device with its weights read by rank 0 alone ({} on the others)."""
    from minitron.data import load_tokenizer
    from minitron.models import build_meta_model, load_config, load_model, read_weights

    if world == 1 or job.train.parallel != "fsdp":
        model, tokenizer = load_model(job.model, dtype="fp32", device=device, allow_pickle=job.allow_pickle,
                                      trust_remote_code=job.trust_remote_code)
        return model, tokenizer, None
    model = build_meta_model(load_config(job.model, trust_remote_code=job.trust_remote_code))
    tokenizer = load_tokenizer(job.model)
    return model, tokenizer, read_weights(job.model) if rank == 0 else {}


def _peak_rss_mib() -> float:
    """This process's peak resident memory so far (the kernel's high-water mark), in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _write_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.rename(path)


# ----------------------------------------------------------------------------------------------------------------
# python -m minitron.distill.worker JOB.json


def main(argv: list[str] | None = None) -> int:
    """As a torchrun rank (LOCAL_RANK set): run this rank's part. Otherwise: become the torchrun agent of
    `job.nproc` ranks (or run a one-process job here)."""
    from minitron.proc import die_with_parent

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m minitron.distill.worker JOB.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    job = TrainJob.from_json(path.read_text())
    out = Path(job.out_dir)
    if "LOCAL_RANK" not in os.environ and job.nproc > 1:
        die_with_parent(signal.SIGTERM)  # torchrun stops its ranks on SIGTERM
        return _agent(job, path)
    die_with_parent(signal.SIGKILL)
    try:
        run_job(job, callback=_append_to(out / "progress.jsonl"))
    except UserError as err:
        if os.environ.get("RANK", "0") == "0":
            _write_atomic(out / "error.json", {"error": str(err)})
        return 2
    return 0


def _agent(job: TrainJob, path: Path) -> int:
    """torchrun in this process: `job.nproc` local ranks (a free rendezvous port, so stages on one machine never
    collide), each running this module on the same job file."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # ranks report their own errors
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={job.nproc}", "--module",
                                         "minitron.distill.worker", str(path)])
    try:
        run(args)
    except ChildFailedError:
        return 2 if (Path(job.out_dir) / "error.json").is_file() else 1
    except SignalException as err:
        return 128 + int(err.sigval)
    return 0


def _append_to(path: Path) -> Callable[[dict], None]:
    def append(record: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    return append


if __name__ == "__main__":
    sys.exit(main())
