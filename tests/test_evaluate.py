"""Evaluation: the offline lm-eval tasks on real models, their data, the task errors and the report helpers."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from minitron.data import is_validation, iter_documents
from minitron.errors import UserError
from minitron.eval_data import EvalDataConfig, cloze_items, held_out_documents, write_eval_data
from minitron.evaluate import comparison_table, evaluate, flatten_metrics, parse_tasks
from minitron.report import evaluation_tables
from tests.conftest import build_tiny_model

# Short items keep the tiny model (256 positions) untruncated and SmolLM2 on CPU fast.
DATA = EvalDataConfig(data="shakespeare", ppl_words=48, prefix_words=16, ending_words=8)
RANDOM_ITEMS = 120  # chance ± 0.12 is 3 standard deviations at this size
SMOLLM2_ITEMS = 40  # SmolLM2 scores ~0.66 on this cloze: 40 items put the 0.40 bar > 3 sd below it


@pytest.fixture(scope="module")
def random_results():
    from minitron.models import make_byte_tokenizer

    model = build_tiny_model("llama")  # vocab 320 logits, byte tokenizer of 257 tokens: lm-eval must cope
    return evaluate(model, tokenizer=make_byte_tokenizer(), preset="offline", limit=RANDOM_ITEMS, data=DATA,
                    device="cpu")


def test_offline_tasks_on_random_model_are_finite_and_near_chance(random_results):
    r = random_results
    assert r["params"] > 0 and r["skipped"] == []
    for task in ("corpus_ppl", "corpus_cloze"):
        assert r[task] and all(math.isfinite(v) for v in r[task].values()), r[task]
    assert set(r["corpus_ppl"]) >= {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert set(r["corpus_cloze"]) >= {"acc", "acc_norm", "acc_stderr"}
    assert abs(r["corpus_cloze"]["acc"] - 0.25) < 0.12
    assert abs(r["corpus_cloze"]["acc_norm"] - 0.25) < 0.12
    # A random model spreads its mass over the whole (320-entry) vocabulary.
    vocab = 320
    assert vocab / 4 < r["corpus_ppl"]["perplexity"] < vocab * 4
    # Byte tokenizer: one token per byte, so token and byte perplexity agree, and bits/byte = log2(byte ppl).
    assert r["corpus_ppl"]["perplexity"] == pytest.approx(r["corpus_ppl"]["byte_perplexity"], rel=1e-6)
    assert r["corpus_ppl"]["bits_per_byte"] == pytest.approx(math.log2(r["corpus_ppl"]["byte_perplexity"]), rel=1e-6)


@pytest.mark.slow  # ~1 CPU-minute: 160 choices through a 135M model
def test_smollm2_beats_random_model_on_cloze(smollm2, random_results):
    model, tokenizer = smollm2
    r = evaluate(model, tokenizer=tokenizer, tasks="corpus_cloze", limit=SMOLLM2_ITEMS, data=DATA)
    assert r["corpus_cloze"]["acc"] > random_results["corpus_cloze"]["acc"] + 0.15, r


def test_cli_writes_results_json(tmp_path, capsys):
    from cli.main import main

    out = tmp_path / "r.json"
    assert main(["evaluate", "tiny-random-llama", "--preset", "offline", "--limit", "8", "--device", "cpu",
                 "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["params"] > 0
    assert 0 <= results["corpus_cloze"]["acc"] <= 1
    assert results["corpus_ppl"]["perplexity"] > 1
    assert "corpus_cloze" in capsys.readouterr().out


def test_unknown_task_is_one_line_error_naming_list_tasks(capsys):
    from cli.main import main

    with pytest.raises(UserError, match="--list-tasks"):
        evaluate("tiny-random-llama", tasks="corpus_cloze,no_such_task", limit=2, device="cpu")
    assert main(["evaluate", "tiny-random-llama", "--tasks", "no_such_task"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no_such_task" in err and "minitron evaluate --list-tasks" in err


def test_parse_tasks():
    assert parse_tasks("corpus_cloze, arc_challenge:25") == {"corpus_cloze": None, "arc_challenge": 25}
    assert parse_tasks(preset="paper")["arc_challenge"] == 25
    for bad in (dict(), dict(tasks="a", preset="quick"), dict(preset="nope"), dict(tasks="a:x"), dict(tasks=",")):
        with pytest.raises(UserError):
            parse_tasks(**bad)


@pytest.fixture
def word_corpus(tmp_path):
    """Documents of distinct pseudo-random words, so every passage is unique."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(500)]
    folder = tmp_path / "words"
    folder.mkdir()
    for d in range(40):
        (folder / f"doc{d:02d}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(120)))
    return folder


def test_eval_data_uses_only_held_out_documents_and_is_deterministic(word_corpus, tmp_path):
    cfg = EvalDataConfig(data=str(word_corpus), val_fraction=0.25, seed=3, ppl_words=50, prefix_words=20,
                         ending_words=10)
    docs = list(iter_documents(str(word_corpus)))
    held = [doc for i, doc in enumerate(docs) if is_validation(i, 0.25, 3)]
    assert 2 <= len(held) < len(docs)
    assert held_out_documents(cfg) == held
    owner = {}  # 10-word ending → the held-out document it comes from
    for d, doc in enumerate(held):
        words = doc.split()
        for s in range(0, len(words) - 29, 30):
            owner[" ".join(words[s + 20:s + 30])] = d
    items = cloze_items(held, cfg)
    assert len(items) == len(owner)  # 4 windows of 30 words per 120-word document
    for item in items:
        true = item["endings"][item["label"]]
        assert len(item["endings"]) == 4 and len(set(item["endings"])) == 4
        assert (item["context"] + " " + true) in " ".join(held[owner[true]].split())
        assert all(owner[e] != owner[true] for i, e in enumerate(item["endings"]) if i != item["label"])
    labels = [item["label"] for item in items]
    assert len(set(labels)) > 1  # the true ending is not always in the same place

    a, b = write_eval_data(cfg, tmp_path / "a"), write_eval_data(cfg, tmp_path / "b")
    for name in ("corpus_ppl.jsonl", "corpus_cloze.jsonl"):
        assert (a / name).read_text() == (b / name).read_text()
    ppl = [json.loads(line) for line in (a / "corpus_ppl.jsonl").read_text().splitlines()]
    assert len(ppl) == 2 * len(held)  # 120 words → passages of 50, 50 and 20 (under half of 50: dropped)
    assert all(len(p["text"].split()) == 50 for p in ppl)
    assert "test: " in (a / "corpus_cloze.yaml").read_text()


TEACHER = {"params": 200, "skipped": [], "cloze": {"acc": 0.5, "acc_stderr": 0.05}, "ppl": {"perplexity": 10.0}}
PRUNED = {"params": 100, "skipped": [], "cloze": {"acc": 0.3}, "ppl": {"perplexity": 40.0}}
FINAL = {"params": 100, "skipped": ["arc_easy"], "cloze": {"acc": 0.45}, "ppl": {"perplexity": 12.5}}


def test_comparison_table_by_hand():
    rows = comparison_table({"teacher": TEACHER, "pruned": PRUNED, "final": FINAL})
    by_key = {(r["task"], r["metric"]): r for r in rows}
    assert list(by_key) == [("params", "count"), ("cloze", "acc"), ("ppl", "perplexity")]  # no stderr rows
    params, acc, ppl = by_key.values()
    assert (params["teacher"], params["final"], params["final %"]) == (200, 100, 50.0)
    assert acc["teacher %"] == 100.0 and acc["pruned %"] == pytest.approx(60.0) and acc["final %"] == pytest.approx(90.0)
    assert ppl["pruned %"] == pytest.approx(400.0) and ppl["final %"] == pytest.approx(125.0)
    assert (acc["better"], ppl["better"]) == ("higher", "lower")
    absolute, relative = evaluation_tables(rows, ["teacher", "pruned", "final"], teacher="teacher")
    assert absolute[1] == {"task": "cloze", "metric": "acc", "better": "↑ higher", "teacher": "0.5000",
                           "pruned": "0.3000", "final": "0.4500"}
    assert relative[2] == {"task": "ppl", "metric": "perplexity", "better": "↓ lower", "pruned % of teacher": "400.0",
                           "final % of teacher": "125.0"}
    # a model missing a task gets "-" and no percentage
    rows = comparison_table({"teacher": TEACHER, "other": {"params": 50}})
    absolute, relative = evaluation_tables(rows, ["teacher", "other"], teacher="teacher")
    assert (absolute[1]["other"], relative[1]["other % of teacher"]) == ("-", "-")
    with pytest.raises(UserError):
        comparison_table({"a": TEACHER}, teacher="b")


def test_flatten_metrics():
    assert flatten_metrics(FINAL) == {"eval/params": 100.0, "eval/cloze/acc": 0.45, "eval/ppl/perplexity": 12.5}
    assert flatten_metrics(TEACHER)["eval/cloze/acc"] == 0.5 and "eval/cloze/acc_stderr" not in flatten_metrics(TEACHER)


def test_standard_task_on_local_files(tmp_path, tiny_tokenizer):
    """The README recipe: a YAML that includes an installed task and points it at local files."""
    import lm_eval

    rows = [{"activity_label": "Baking", "ctx_a": f"She mixes flour and water {i}.", "ctx_b": "then she",
             "endings": ["bakes the bread.", "sings loudly.", "flies away.", "reads a map."], "label": str(i % 4)}
            for i in range(4)]
    data = tmp_path / "hellaswag_validation.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    base = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    (tasks / "hellaswag_local.yaml").write_text(
        f"include: {base}\ntask: hellaswag_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\ntraining_split: null\n")
    r = evaluate(build_tiny_model("llama"), tokenizer=tiny_tokenizer, tasks="hellaswag_local",
                 include_path=[str(tasks)], device="cpu")
    assert r["skipped"] == [] and 0 <= r["hellaswag_local"]["acc"] <= 1
    assert r["hellaswag_local"]["acc"] * 4 == pytest.approx(round(r["hellaswag_local"]["acc"] * 4))  # 4 items
