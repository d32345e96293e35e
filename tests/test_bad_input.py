"""Every bad input of issue #13 fails before any model work, in seconds, with one line that names the field (or
file) and the fix: the flow's preflight for run configs, the command itself for CLI arguments. Loading weights is
booby-trapped, so an error that would only come after model work fails the test instead."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minitron.config import load_config_file
from minitron.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """The bad files: corpora, a corrupt and a pickled teacher, garbage scores, a checkpoint with a flipped bit."""
    from minitron.models import _tiny_random_llama_folder
    from tasks.storage import open_store

    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "short.txt").write_text("hello world\n")
    (d / "one-document.txt").write_text("word " * 2000)  # one paragraph: one document
    (d / "random.txt").write_bytes(random.Random(0).randbytes(200_000))
    (d / "numbers.txt").write_text("\n\n".join(" ".join(str(i * j) for j in range(40)) for i in range(400)))
    (d / "chinese.txt").write_text("\n\n".join("机器学习是人工智能的一个分支，它使计算机能够从数据中学习。" * 20
                                               for _ in range(50)))
    (d / "bad.jsonl").write_text('{"text": "a fine first record"}\n{not json\n')
    teacher = _tiny_random_llama_folder()
    corrupt = Path(shutil.copytree(teacher, d / "corrupt-teacher"))
    weights = bytearray((corrupt / "model.safetensors").read_bytes())
    weights[:8] = b"\xff" * 8  # the header length
    (corrupt / "model.safetensors").write_bytes(bytes(weights))
    truncated = Path(shutil.copytree(teacher, d / "truncated-teacher"))
    (truncated / "model.safetensors").write_bytes((teacher / "model.safetensors").read_bytes()[:-1000])
    pickled = d / "pickled-teacher"
    pickled.mkdir()
    for f in teacher.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, pickled / f.name)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (d / "scores.safetensors").write_text("not safetensors")
    uri = open_store(d / "store").put_folder(teacher, "run/distill")
    stored = d / "store" / "run" / "distill" / "model.safetensors"
    flipped = bytearray(stored.read_bytes())
    flipped[-100] ^= 0x01
    stored.write_bytes(bytes(flipped))
    paths = {p.stem: str(p) for p in d.iterdir()}
    return {**paths, "corrupt-teacher": str(corrupt), "truncated-teacher": str(truncated),
            "pickled-teacher": str(pickled), "flipped-uri": uri, "scores": str(d / "scores.safetensors")}


@pytest.fixture(scope="module")
def good_scores(tmp_path_factory) -> str:
    from cli.main import main

    out = tmp_path_factory.mktemp("scores") / "scores.safetensors"
    assert main(["importance", "tiny-random-llama", "--data", "shakespeare", "--samples", "4", "--seq-len", "32",
                 "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture
def no_model_work(monkeypatch, home):
    """Reading weights raises: every error here must come before it."""
    import transformers

    def trap(*args, **kwargs):
        raise AssertionError("model work started before the error")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", trap)
    monkeypatch.setenv("MINITRON_HOME", str(home))
    monkeypatch.setenv("MINITRON_WORK", str(home / "work"))
    for name in ("MLFLOW_TRACKING_URI", "MINITRON_CHECKPOINT_STORE", "PREFECT_API_URL"):
        monkeypatch.delenv(name, raising=False)


# (case, config overrides; {name} is a path from `inputs`, expected message)
RUN_CASES = [
    ("invalid-jsonl", {"data": "{bad}"}, r"bad.jsonl:2 is not valid JSON .*: fix or drop that line"),
    ("corrupt-safetensors-teacher", {"teacher": "{corrupt-teacher}"},
     r"model.safetensors is not a readable safetensors file \(its header length is out of range\): re-download"),
    ("truncated-teacher", {"teacher": "{truncated-teacher}"}, r"file holds .* \(truncated\?\)"),
    ("pickled-only-teacher", {"teacher": "{pickled-teacher}"}, r"holds only pickled weights .* --allow-pickle"),
    ("cuda-without-gpu", {"device": "cuda"}, r"no CUDA GPU is visible: set device to cpu or auto"),
    ("nproc-over-visible-gpus", {"nproc": 4, "search_tokens": "100K"},  # a search budget that fits 4 ranks
     r"this machine has 0 GPUs but .*distillation needs 4 .*lower nproc, or set device: cpu"),
    ("empty-corpus", {"data": "{empty}"}, r"data '.*empty.txt' has no text"),
    ("one-document-corpus", {"data": "{one-document}"},
     r"one-document.txt': it holds 1 document, but the document-level .* at least 2 .*: add text"),
    ("too-short-corpus", {"data": "{short}"},
     r"short.txt': it holds \d+ tokens, fewer than the [\d,]+ this run needs .*: add text, or lower"),
    ("random-bytes-corpus", {"data": "{random}"}, r"does not look like text: \d+% of the characters .* not printable"),
    ("numbers-corpus", {"data": "{numbers}"}, r"only \d+% of its tokens carry letters"),
    ("byte-fallback-corpus", {"data": "{chinese}"}, r"\d+% of its tokens are byte fallbacks"),
    ("hidden-not-multiple-of-heads", {"target_hidden": 50},
     r"target shape: llama configs need the hidden size \(50\) to be a multiple of the query heads \(4\)"),
    ("kv-groups-named", {"target_kv_groups": 3},
     r"kv groups 3 must be between 1 and the parent model's 2 .*: change target_kv_groups"),
    ("negative-correction-tokens", {"correction_tokens": -5}, r"bad value for 'correction_tokens' \(-5\): use a count"),
    ("drop-layers-outside", {"drop_layers": "3-9"}, r"drop_layers 3-9 must lie within layers 1-4"),
    ("calibration-larger-than-corpus", {"calib_samples": 10**6}, r"fewer than the 64,000,064 this run needs"),
    ("max-corpus-tokens-too-small", {"max_corpus_tokens": "1K"},
     r"max_corpus_tokens 1K reads 1 document, but .*: raise max_corpus_tokens"),
    ("s3-endpoint-down", {"checkpoint_store": "s3://minitron-checkpoints/x"}, r"cannot reach the S3 endpoint"),
]


@pytest.mark.parametrize("case, overrides, message", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_config_fails_in_preflight(case, overrides, message, inputs, no_model_work, monkeypatch):
    from flows.preflight import preflight

    if case == "cuda-without-gpu" or case == "nproc-over-visible-gpus":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    if case == "s3-endpoint-down":
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s" * 10)
    sets = [f"{k}={str(v).format(**{n: inputs[n] for n in inputs if '{' + n + '}' in str(v)})}"
            for k, v in overrides.items()]
    start = time.monotonic()
    with pytest.raises(UserError, match=message) as err:
        preflight(load_config_file(TINY, sets))
    assert "\n" not in str(err.value)
    assert time.monotonic() - start < 30


CLI_CASES = [
    ("scores-not-safetensors", ["prune", "tiny-random-llama", "--scores", "{scores}", "--hidden", "32"],
     r"cannot read scores '.*' \(.*\): give the scores.safetensors that `minitron importance` wrote"),
    ("prune-drop-layers-outside", ["prune", "tiny-random-llama", "--scores", "{good}", "--drop-layers", "3-9"],
     r"drop block 3-9 is outside layers 1-4"),
    ("corrupt-teacher-in-a-command", ["info", "{corrupt-teacher}"], r"not a readable safetensors file"),
    ("flipped-checkpoint-uri", ["info", "{flipped-uri}"], r"model.safetensors does not match its sha256"),
    ("serve-timezone", ["serve"], r"MINITRON_TIMEZONE='Mars/Olympus' is not an IANA timezone name"),
]


@pytest.mark.parametrize("case, argv, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_command_fails_with_one_line(case, argv, message, inputs, good_scores, no_model_work, monkeypatch, capsys,
                                     tmp_path):
    from cli.main import main

    monkeypatch.setenv("MINITRON_TIMEZONE", "Mars/Olympus")
    names = {**inputs, "good": good_scores}
    argv = [a.format(**{n: names[n] for n in names if "{" + n + "}" in a}) for a in argv]
    if argv[0] == "prune":
        argv += ["--out", str(tmp_path / "out")]
    start = time.monotonic()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    import re

    assert re.search(message, err[0]), err[0]
    assert time.monotonic() - start < 30


def test_fresh_home_error_is_one_line(tmp_path):
    """A real `minitron run` in an empty MINITRON_HOME: the error alone, no Prefect home warning before it."""
    proc = subprocess.run([sys.executable, "-m", "cli", "run", "--config", str(TINY), "--set",
                           f"data={tmp_path / 'missing.txt'}"], cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "MINITRON_HOME": str(tmp_path / "fresh" / "home")},
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: data path '{tmp_path / 'missing.txt'}' does not exist"]
