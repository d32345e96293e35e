"""`minitron distill` end to end through the CLI: 2 gloo processes under torchrun (re-launched by `--nproc 2`)
follow the same validation trajectory as 1 process at the same global batch; bad inputs exit 2 with one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model

from cli.main import main
from minitron.models import save_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*argv, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "cli", *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, folders, corpus):
    """The 1-process reference run at global batch 4."""
    out = tmp_path_factory.mktemp("one")
    res = cli(*distill_args(*folders, corpus, out, 6 * 64, 4, 1))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def distill_args(teacher, student, corpus, out, tokens, batch, nproc, parallel="ddp"):
    return ["distill", "--teacher", teacher, "--student", student, "--data", corpus, "--val-fraction", "0.3",
            "--tokens", tokens, "--seq-len", 16, "--batch", batch, "--lr", 3e-3, "--eval-every", 1,
            "--val-batches", 2, "--nproc", nproc, "--parallel", parallel, "--checkpoint-every", 3, "--no-progress",
            "--device", "cpu", "--out", out]


def trajectory(out: Path) -> list[tuple[float, float]]:
    return [(r["val_kl"], r["val_ce"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_at_the_same_global_batch(tmp_path, folders, corpus, one_process, parallel):
    two = cli(*distill_args(*folders, corpus, tmp_path / "two", 6 * 64, 2, 2, parallel))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = trajectory(one_process), trajectory(tmp_path / "two")
    assert len(a) == len(b) == 7  # before the first step and after each of the 6
    assert a[-1][0] < a[0][0]  # it trained
    for (kl1, ce1), (kl2, ce2) in zip(a, b, strict=True):
        assert kl2 == pytest.approx(kl1, rel=1e-5, abs=1e-7)
        assert ce2 == pytest.approx(ce1, rel=1e-5)
    assert "val_kl" in two.stdout
    # rank 0 wrote a full (unsharded) checkpoint and a plain model folder equal to the 1-process result
    ckpt = torch.load(tmp_path / "two" / "checkpoints" / "step-3.pt", weights_only=True)
    assert ckpt["model"]["student.model.embed_tokens.weight"].shape == (320, 64)
    from transformers import AutoModelForCausalLM

    m1, m2 = (AutoModelForCausalLM.from_pretrained(d) for d in (one_process, tmp_path / "two"))
    for (name, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        torch.testing.assert_close(p2, p1, rtol=0, atol=1e-5, msg=name)  # 1e-5 = 0.3% of one Adam step


def test_two_processes_resume_with_the_next_batch(tmp_path, folders, corpus):
    """A 2-process run resumed from its step-3 checkpoint (model, optimizer, RNG and the data position: the global
    micro-batch counter) repeats the uninterrupted run's last 3 steps bit for bit, each rank reading its rows of the
    same global batches from the token store."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run = cli(*distill_args(*folders, corpus, full, 6 * 64, 2, 2))
    assert run.returncode == 0, run.stderr[-3000:]
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step-3.pt", resumed / "checkpoints")  # as if killed after step 3
    assert torch.load(resumed / "checkpoints" / "step-3.pt", weights_only=True)["data"]["micro_batches"] == 3
    again = cli(*distill_args(*folders, corpus, resumed, 6 * 64, 2, 2), "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert trajectory(resumed) == trajectory(full)[4:]  # steps 4, 5, 6: the same floats
    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_exit_with_one_line(tmp_path, folders, corpus, tiny_tokenizer, capsys):
    teacher, student = folders
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    other_vocab = save_model(build_tiny_model("llama", vocab_size=300), tiny_tokenizer, tmp_path / "v300")
    cases = {
        "smaller than one optimizer step": distill_args(teacher, student, corpus, tmp_path / "o", 63, 4, 1),
        "has no config.json": distill_args(teacher, not_a_model, corpus, tmp_path / "o", 640, 4, 1),
        "vocabularies differ": distill_args(teacher, other_vocab, corpus, tmp_path / "o", 640, 4, 1),
    }
    for message, argv in cases.items():
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err
    assert not (tmp_path / "o").exists()


def test_correct_teacher_cli(tmp_path, folders, corpus, capsys):
    teacher, _ = folders
    out = tmp_path / "corrected"
    argv = ["correct-teacher", teacher, "--data", corpus, "--val-fraction", "0.3", "--tokens", 8 * 64,
            "--seq-len", 16, "--batch", 4, "--lr", 3e-3, "--eval-every", 4, "--no-progress", "--device", "cpu",
            "--out", out]
    assert main([str(a) for a in argv]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    before, after = (float(x) for x in summary.split("val_ce ")[1].split(",")[0].split(" -> "))
    assert after < before
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 4, 8] and records[0]["val_kl"] is None
    assert records[-1]["val_ce"] == pytest.approx(after, abs=1e-4)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_killed_two_process_distillation_resumes_from_its_last_checkpoint(tmp_path, folders, corpus):
    """SIGKILL of the process that launched 2 FSDP ranks mid-run takes the ranks down with it (no orphan keeps
    training into the folder); the same command with --resume continues from the last checkpoint and ends where
    one process at the same global batch ends."""
    import signal

    import psutil
    from transformers import AutoModelForCausalLM

    def argv(out, batch, nproc, *extra):  # 60 steps of 4 sequences, a checkpoint every 10, validation every 20
        return [*distill_args(*folders, corpus, out, 60 * 4 * 16, batch, nproc, "fsdp"), "--eval-every", 20,
                "--checkpoint-every", 10, *extra]

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    launcher = subprocess.Popen([sys.executable, "-m", "cli", *map(str, argv(tmp_path / "two", 2, 2))],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    checkpoints = tmp_path / "two" / "checkpoints"
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("step-*.pt")) and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    ranks = psutil.Process(launcher.pid).children(recursive=True)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert len(ranks) == 3  # the torchrun agent and its two ranks
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive
    last = max(int(p.stem.split("-")[1]) for p in checkpoints.glob("step-*.pt"))
    assert 10 <= last < 60

    resumed = cli(*argv(tmp_path / "two", 2, 2, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads((tmp_path / "two" / "result.json").read_text())
    assert (result["start_step"], result["steps"], result["world"]) == (last, 60, 2)
    assert [r["step"] for r in map(json.loads, (tmp_path / "two" / "metrics.jsonl").read_text().splitlines())] \
        == [0, 20, 40, 60]

    assert main([str(a) for a in argv(tmp_path / "one", 4, 1)]) == 0  # the reference: one process, same batch
    one, two = (AutoModelForCausalLM.from_pretrained(tmp_path / d) for d in ("one", "two"))
    for (name, p1), p2 in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        torch.testing.assert_close(p2, p1, rtol=0, atol=1e-5, msg=name)


def test_a_user_error_on_the_ranks_is_one_line(tmp_path, folders, corpus, tiny_tokenizer):
    """Found by the ranks (the vocabularies are compared once the models are loaded): exit 2 and one line, not
    torchrun's failure report."""
    other_vocab = save_model(build_tiny_model("llama", vocab_size=300), tiny_tokenizer, tmp_path / "v300")
    res = cli(*distill_args(folders[0], other_vocab, corpus, tmp_path / "o", 640, 2, 2, "fsdp"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: teacher and student vocabularies differ")
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr
