"""bench/findings.py: the verdict logic against hand-computed cases, the students' shapes, and the smoke preset run
for real (a process of its own, every stage, a tiny random teacher) at an even smaller size."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("findings", ROOT / "bench" / "findings.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["findings"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


findings = _load_bench()


# ----------------------------------------------------------------------------------------------------------------
# verdicts, by hand


def test_compare_reproduced_with_the_arms_spread_as_noise():
    # d = [-1.0, -0.9]: mean -0.95, paired SE = stdev(d)/sqrt(2) = 0.0707/1.414 = 0.05; arms' SE =
    # sqrt((var[1.0, 1.2] + var[2.0, 2.1]) / 2) = sqrt((0.02 + 0.005) / 2) = 0.1118 (the larger: the noise)
    c = findings.compare({0: 1.0, 1: 1.2}, {0: 2.0, 1: 2.1})
    assert c["diff"] == pytest.approx(-0.95)
    assert c["noise"] == pytest.approx(math.sqrt(0.0125))
    assert (c["n"], c["verdict"]) == (2, "reproduced")
    flipped = findings.compare({0: 2.0, 1: 2.1}, {0: 1.0, 1: 1.2})
    assert (flipped["diff"], flipped["verdict"]) == (pytest.approx(0.95), "not reproduced")


def test_compare_inconclusive_within_twice_the_noise():
    # d = [-0.2, 0.1]: mean -0.05; arms' SE = sqrt((0.5 + 0.245) / 2) = 0.6103 > paired 0.15
    c = findings.compare({0: 1.0, 1: 2.0}, {0: 1.2, 1: 1.9})
    assert c["diff"] == pytest.approx(-0.05)
    assert c["noise"] == pytest.approx(math.sqrt(0.745 / 2))
    assert c["verdict"] == "inconclusive"
    # the paired SE wins when the seeds disagree on the sign: d = [-0.1, 0.1], paired SE 0.1, arms' SE 0.0707
    c = findings.compare({0: 1.0, 1: 1.1}, {0: 1.1, 1: 1.0})
    assert (c["diff"], c["noise"], c["verdict"]) == (pytest.approx(0.0), pytest.approx(0.1), "inconclusive")
    # d = [-0.45, -0.05]: mean -0.25, paired SE 0.2, arms' SE sqrt((0.08 + 0) / 2) = 0.2: |−0.25| <= 0.4
    assert findings.compare({0: 1.0, 1: 1.4}, {0: 1.45, 1: 1.45})["verdict"] == "inconclusive"
    # three seeds, d = [-0.5, -0.6, -0.4]: paired SE 0.1/sqrt(3) = 0.0577, arms' SE sqrt((0.01 + 0.01) / 3) =
    # 0.0816: |−0.5| > 0.163 -> reproduced
    c = findings.compare({0: 1.0, 1: 1.1, 2: 1.2}, {0: 1.5, 1: 1.7, 2: 1.6})
    assert c["noise"] == pytest.approx(math.sqrt(0.02 / 3))
    assert (c["n"], c["verdict"]) == (3, "reproduced")


def test_compare_one_seed_or_a_nan_decides_nothing():
    one = findings.compare({0: 1.0}, {0: 2.0})
    assert (one["diff"], one["noise"], one["n"], one["verdict"]) == (-1.0, None, 1, "inconclusive")
    nan = findings.compare({0: 1.0, 1: float("nan")}, {0: 2.0, 1: 2.0})
    assert (nan["diff"], nan["verdict"]) == (None, "inconclusive")
    assert findings.compare({0: 1.0}, {1: 2.0})["n"] == 0  # only seeds both arms ran are paired


def test_compare_higher_is_better_for_kendall_tau():
    # d = [0.8, 0.8]: paired SE 0; arms' SE sqrt((0.02 + 0.02) / 2) = 0.1414; 0.8 > 0.283 in the claimed direction
    c = findings.compare({0: 0.8, 1: 1.0}, {0: 0.0, 1: 0.2}, higher_is_better=True)
    assert (c["diff"], c["noise"], c["verdict"]) == (pytest.approx(0.8), pytest.approx(math.sqrt(0.02)),
                                                     "reproduced")
    assert findings.compare({0: 0.8, 1: 1.0}, {0: 0.0, 1: 0.2})["verdict"] == "not reproduced"


def test_combine_needs_every_comparison():
    assert findings.combine(["reproduced", "reproduced"]) == "reproduced"
    assert findings.combine(["reproduced", "inconclusive"]) == "inconclusive"
    assert findings.combine(["inconclusive", "not reproduced", "reproduced"]) == "not reproduced"
    assert findings.combine([]) == "inconclusive"


def test_rank_taus_by_hand():
    # validation CE at steps 0, 1 (a quarter of 4) and 4: A 3/2/1, B 1/2.5/2, C 2/3/3
    curves = {"A": [[0, 3.0, 0.1], [1, 2.0, 0.1], [2, 1.5, 0.1], [4, 1.0, 0.1]],
              "B": [[0, 1.0, 0.1], [1, 2.5, 0.1], [2, 2.2, 0.1], [4, 2.0, 0.1]],
              "C": [[0, 2.0, 0.1], [1, 3.0, 0.1], [2, 3.0, 0.1], [4, 3.0, 0.1]]}
    taus = findings.rank_taus(curves)
    # 0 vs full: AB discordant, AC discordant, BC concordant -> (1 - 2) / 3; a quarter vs full: all concordant
    assert taus == {"0-full": pytest.approx(-1 / 3), "quarter-full": pytest.approx(1.0),
                    "0-quarter": pytest.approx(-1 / 3)}


def _results(smoke: bool, ce: dict, taus: dict) -> dict:
    arms = {name: {"seeds": {s: {"metrics": {"val_ce": v, "val_kl": 0.1, "bpb": 1.0, "cloze": 0.5}}
                             for s, v in values.items()}} for name, values in ce.items()}
    return {"settings": {"smoke": smoke}, "arms": arms, "rank_stability": {"candidates": ["a", "b", "c"],
                                                                         "taus": taus}, "teachers": {}}


def test_judge_and_table_give_verdicts_only_outside_a_smoke_run():
    good = {"0": 3.0, "1": 3.1}
    bad = {"0": 4.0, "1": 4.2}
    ce = {"pruned-kd": good, "random-kd": bad, "random-ce": bad, "depth-kd": {"0": 3.05, "1": 3.0},
          "pruned-ce": {"0": 2.0, "1": 2.1}, "corrected-kd": {"0": 2.9, "1": 3.0}, "agg-l2-mean": good,
          "agg-mean-mean": bad, "agg-l2-l2": {"0": 3.0}}
    taus = {"0": {"0-full": 0.0, "quarter-full": 0.8, "0-quarter": 0.1},
            "1": {"0-full": 0.2, "quarter-full": 1.0, "0-quarter": 0.3}}
    results = _results(False, ce, taus)
    results["judged"] = judged = findings.judge(results)
    verdicts = {c["id"]: c["verdict"] for c in judged}
    assert verdicts == {1: "reproduced", 2: "inconclusive", 3: "not reproduced", 4: "inconclusive",
                        5: "reproduced", 6: "inconclusive"}  # 6: one (L2, L2) seed only
    assert judged[0]["comparisons"][0]["diff"] == pytest.approx(-1.05)
    text = findings.table(results)
    assert text.count("| reproduced |") == 2 and "not reproduced" in text and "Δτ 0.80" in text

    smoke = _results(True, ce, taus)
    smoke["judged"] = findings.judge(smoke)
    assert all(c["verdict"] is None and all(x["verdict"] is None for x in c["comparisons"]) for c in smoke["judged"])
    assert smoke["judged"][0]["comparisons"][0]["diff"] == pytest.approx(-1.05)  # the numbers stay
    text = findings.table(smoke)
    assert text.count("smoke run: no verdict") == 6 and "reproduced" not in text


def test_width_and_depth_students_of_smollm2_have_equal_parameters():
    from minitron.archmath import Shape, count_params, count_shape
    from minitron.models import load_config

    config = load_config("smollm2-135m")  # the shipped config: no weights
    target = int(0.55 * count_params(config))
    depth = findings.depth_shape(config, target)
    assert depth == Shape(13, 576, 1536, 9, 3, 64)  # 13 of 30 layers: 74.3M, the nearest count to 74.0M
    width = findings.width_shape(config, count_shape(config, depth))
    assert (width.layers, width.heads, width.kv_heads) == (30, 9, 3)  # every layer and head kept
    assert width.hidden % 72 == 0 and width.ffn % 64 == 0  # Llama configs need hidden % heads == 0
    assert abs(count_shape(config, width) / count_shape(config, depth) - 1) < 0.01


# ----------------------------------------------------------------------------------------------------------------
# the smoke preset, for real


@pytest.fixture
def heldout_texts(tmp_path) -> tuple[Path, Path]:
    """A held-out corpus (jsonl, other words than `text_corpus`) and a text file for bits per byte."""
    words = "a bright morning comes over the hills and rivers where old ships sail past green islands".split()
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": "\n\n".join(" ".join(words[(d * 5 + p * 2 + i) % len(words)]
                                                                       for i in range(50)) for p in range(3))}) + "\n"
                               for d in range(6)))
    bpb = tmp_path / "bpb.txt"  # two documents of 16k characters at least (the offline tasks cut it so)
    bpb.write_text("\n\n".join(" ".join(words[(p * 3 + i) % len(words)] for i in range(60)) for p in range(80)))
    return heldout, bpb


def test_smoke_preset_runs_every_comparison_through_the_stages(tmp_path, own_token_cache, text_corpus,
                                                              heldout_texts):
    heldout, bpb = heldout_texts
    out = tmp_path / "findings.json"
    args = ["--preset", "smoke", "--out", str(out), "--work", str(tmp_path / "work"),
            "--set", "seeds=1", "--set", "candidates=3", "--set", "eval_limit=8", "--set", f"data={text_corpus}",
            "--set", f"heldout={heldout}", "--set", f"bpb_text={bpb}",
            "--set", "tokens=null", "--set", "max_tokens=2048"]  # sized from measured tokens/s, capped: 8 steps
    probe = ("import runpy, sys; sys.argv = ['findings.py', *sys.argv[1:]]\n"
             "try:\n    runpy.run_path('bench/findings.py', run_name='__main__')\n"
             "finally:\n    print('IMPORTED', sorted({m.split('.')[0] for m in sys.modules} & "
             "{'prefect', 'mlflow', 'tasks', 'flows', 'ray'}))")
    proc = subprocess.run([sys.executable, "-c", probe, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IMPORTED []" in proc.stdout  # only minitron: the GPU image has no prefect, mlflow or ray
    assert "SMOKE RUN" in proc.stdout and proc.stdout.count("smoke run: no verdict") == 6

    r = json.loads(out.read_text())
    assert r["complete"] and r["settings"]["smoke"] and r["device"] == "cpu"
    assert r["budgets"] == {"full": 2048, "short": 1024, "correction": 1024}
    assert r["sizing"]["full_steps"] == 8 and all(v > 0 for v in r["sizing"]["tokens_per_s"].values())
    width, depth = r["shapes"]["width"], r["shapes"]["depth"]
    assert abs(width["params"] / depth["params"] - 1) < 0.01 and width["layers"] > depth["layers"]

    candidates = [f"cand-{n}" for n in r["rank_stability"]["candidates"]]
    assert len(candidates) == 3
    expected = {"pruned-kd", "random-kd", "random-ce", "depth-kd", "pruned-ce", "corrected-kd", "agg-l2-mean",
                "agg-mean-mean", "agg-l2-l2", *candidates}
    assert set(r["arms"]) == expected
    run = {name: arm["seeds"]["0"] for name, arm in r["arms"].items()}
    for name, x in run.items():
        tokens = 2048 if name in ("pruned-kd", "random-kd", "random-ce", "depth-kd", "pruned-ce",
                                  "corrected-kd") else 1024
        assert (x["train"]["tokens"], r["arms"][name]["tokens"]) == (tokens, tokens), name
        numbers = [v for k, v in x["train"].items() if v is not None] + [p[1] for p in x["curve"]]
        if not name.startswith("cand-") or "metrics" in x:
            m = x["metrics"]
            numbers += [m["val_kl"], m["val_ce"], m["bpb"], m["cloze"]]
            assert m["val_kl"] >= 0 and m["bpb"] > 0 and 0 <= m["cloze"] <= 1, name
        assert all(math.isfinite(v) for v in numbers), name
    for name in ("pruned-kd", "random-kd", "depth-kd", "corrected-kd"):  # distillation really trained
        assert run[name]["train"]["val_kl"] < run[name]["train"]["val_kl_before"], name
    for name in ("random-ce", "pruned-ce"):  # and so did CE (the "correct" objective, no teacher)
        assert run[name]["train"]["val_kl"] is None
        assert run[name]["train"]["val_ce"] < run[name]["train"]["val_ce_before"], name
    corrected = r["teachers"]["corrected"]["train"]
    assert (corrected["tokens"], corrected["val_ce"] < corrected["val_ce_before"]) == (1024, True)
    # the same pruned student starts every (L2, mean) arm; a random init starts elsewhere, near ln(vocab)
    assert run["agg-l2-mean"]["train"]["val_kl_before"] == run["pruned-kd"]["train"]["val_kl_before"]
    assert run["random-kd"]["train"]["val_kl_before"] > 2 * run["pruned-kd"]["train"]["val_kl_before"]
    assert run["random-kd"]["train"]["val_ce_before"] == pytest.approx(math.log(320), abs=0.05)
    # claim 5's width candidate is claim 6's (L2, mean) arm, run once; the others have 4 quarters + step 0
    assert run[candidates[0]]["same_run_as"] == "agg-l2-mean"
    assert [p[0] for p in run[candidates[1]]["curve"]] == [0, 1, 2, 3, 4]
    assert set(r["rank_stability"]["taus"]["0"]) == {"0-full", "quarter-full", "0-quarter"}

    assert [c["id"] for c in r["judged"]] == [1, 2, 3, 4, 5, 6]
    for c in r["judged"]:
        assert c["verdict"] is None and c["comparisons"]
        for comp in c["comparisons"]:
            assert comp["n"] == 1 and comp["noise"] is None and comp["verdict"] is None
            assert comp["diff"] is None or math.isfinite(comp["diff"])
    pruned_vs_ce = r["judged"][2]["comparisons"][0]
    assert pruned_vs_ce["diff"] == pytest.approx(run["pruned-kd"]["metrics"]["val_ce"]
                                                 - run["pruned-ce"]["metrics"]["val_ce"])
