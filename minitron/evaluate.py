"""Benchmarking with LM-Eval-Harness: standard tasks where their data is reachable, and two offline tasks built from
the run's own held-out corpus (`corpus_ppl`, `corpus_cloze`, see `minitron/eval_data.py`) that always run.

`evaluate(model_or_path, tasks=... | preset=...)` → `{"params": N, "skipped": [...], task: {metric: value}}`, with
lm-eval's filter suffix dropped (`acc,none` → `acc`) and standard errors kept as `<metric>_stderr`. `corpus_ppl` also
gets token-level `perplexity`, computed from the logged per-passage log-likelihoods and the model's own tokenisation.

Presets (task → shots):
  paper   the Minitron (2408.11796) benchmark set with its shot counts,
  quick   zero-shot and cheap, to score search candidates: the offline tasks plus standard zero-shot tasks,
  offline the offline tasks only.
Offline behaviour: standard tasks whose data cannot be had (no hub and no local datasets cache) are *skipped* with a
one-line warning and listed under "skipped", never fatal. When the hub is unreachable we switch the datasets client to
offline mode first, so a missing data set costs milliseconds, not a minute of retries. So `--preset quick` offline =
the offline tasks (plus any standard task in the local datasets cache).

Also the pure-python reporting used by the orchestration layer: `comparison_table`, `format_table`, `flatten_metrics`.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from minitron.errors import UserError
from minitron.eval_data import OFFLINE_TASKS, EvalDataConfig, write_eval_data
from minitron.models import hub_host_reachable, hub_offline

log = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, int]] = {  # task → num_fewshot
    "paper": {"winogrande": 5, "arc_challenge": 25, "mmlu": 5, "hellaswag": 10, "gsm8k": 5, "truthfulqa_mc2": 0},
    "quick": {"corpus_ppl": 0, "corpus_cloze": 0, "arc_easy": 0, "hellaswag": 0, "winogrande": 0, "piqa": 0},
    "offline": {"corpus_ppl": 0, "corpus_cloze": 0},
}
LIST_HINT = "list them with `minitron evaluate --list-tasks`"
META_KEYS = ("params", "skipped")  # top-level keys of a results dict that are not tasks
CPU_BATCH = 8  # lm-eval's "auto" batch probing is meant for GPUs; on CPU a fixed small batch is as fast
MAX_LENGTH = 4096  # context cap when the config allows more (25-shot ARC fits; SmolLM2's config says 8192)


# ----------------------------------------------------------------------------------------------------------------
# tasks


def parse_tasks(tasks: str | list[str] | None = None, preset: str | None = None) -> dict[str, int | None]:
    """Task names (a list or "a,b:5,c") or a preset → {task: shots}; `name:N` sets N shots, None = task default."""
    if (tasks is None) == (preset is None):
        raise UserError("give either tasks (e.g. --tasks corpus_cloze,arc_easy) or a preset "
                        f"({', '.join(PRESETS)}), not both or neither")
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"unknown preset '{preset}': use one of {', '.join(PRESETS)}")
        return dict(PRESETS[preset])
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise UserError(f"no task given: {LIST_HINT}")
    out: dict[str, int | None] = {}
    for name in names:
        name, _, shots = name.partition(":")
        if shots and not shots.isdigit():
            raise UserError(f"bad shot count in '{name}:{shots}': use name:N, e.g. arc_challenge:25")
        out[name] = int(shots) if shots else None
    return out


def _go_offline() -> None:
    """Make the datasets/hub clients fail fast (or read their local cache) instead of retrying for a minute."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets.config
    import huggingface_hub.constants

    datasets.config.HF_HUB_OFFLINE = True  # both read the variable at import, so set the constants too
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def task_manager(names, data_dir: Path | None, include_path: list[str] | None = None):
    """lm-eval's TaskManager over the offline tasks' folder and the user's task folders, plus the built-in tasks only
    when a standard task is asked for (indexing them takes seconds). Unknown names → UserError before any model
    is loaded."""
    from lm_eval.tasks import TaskManager

    for folder in include_path or []:
        if not Path(folder).is_dir():
            raise UserError(f"task folder '{folder}' does not exist (--include-path takes folders of task YAML)")
    paths = [str(data_dir)] if data_dir else []
    paths += [str(p) for p in include_path or []]
    standard = [n for n in names if n not in OFFLINE_TASKS]
    manager = TaskManager(include_path=paths or None, include_defaults=bool(standard))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: {LIST_HINT}")
    return manager


def list_tasks(include_path: list[str] | None = None) -> list[str]:
    """Offline tasks first, then every lm-eval task, group and tag name (with the user's task folders)."""
    from lm_eval.tasks import TaskManager

    return list(OFFLINE_TASKS) + [n for n in TaskManager(include_path=include_path or None).all_tasks
                                  if n not in OFFLINE_TASKS]


def _load_tasks(manager, shots: dict[str, int | None]) -> tuple[list, list[str]]:
    """Build the task objects (this loads their data); standard tasks whose data is unavailable are skipped."""
    loaded, skipped = [], []
    for name, n in shots.items():
        try:
            built = manager.load([name])
        except Exception as err:  # noqa: BLE001 - any data-loading failure of a hub task means "not available here"
            if name in OFFLINE_TASKS:
                raise
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            log.warning("skipping task %s: its data is not available here (%s)", name, first)
            skipped.append(name)
            continue
        for task in built["tasks"].values():
            if n is not None:
                task.set_config(key="num_fewshot", value=n)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
        loaded.extend(built["groups"].values() if built["groups"] else built["tasks"].values())
    return loaded, skipped


# ----------------------------------------------------------------------------------------------------------------
# evaluation


def _clean(metrics: dict) -> dict[str, float]:
    """{"acc,none": .5, "acc_stderr,none": .1, "alias": ..} → {"acc": .5, "acc_stderr": .1} (numbers only)."""
    out = {}
    for key, value in metrics.items():
        name = key.split(",")[0]
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if numeric and name not in ("samples", "sample_len"):  # sample_len: items evaluated, not a metric
            out[name] = float(value)
    return out


def _token_perplexity(samples: list[dict], lm) -> float:
    """exp(−Σ log p / Σ tokens) over the evaluated passages, tokens counted exactly as lm-eval's rolling windows."""
    total_ll = sum(float(s["filtered_resps"][0]) if not isinstance(s["filtered_resps"][0], (list, tuple))
                   else float(s["filtered_resps"][0][0]) for s in samples)
    total_tokens = sum(len(lm.tok_encode(s["target"])) for s in samples)
    return math.exp(-total_ll / total_tokens)


def evaluate(model_or_path, *, tasks: str | list[str] | None = None, preset: str | None = None,
             limit: int | float | None = None, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None, tokenizer=None, batch_size: int | str | None = None,
             max_length: int | None = None, data: EvalDataConfig | str = "shakespeare",
             include_path: list[str] | None = None, bootstrap_iters: int = 1000,
             load_kwargs: dict | None = None) -> dict:
    """Evaluate a model (in-memory model + `tokenizer`, or a spec for `minitron.models.load_model`).

    limit: items per task (int) or fraction of each task (float < 1), as lm-eval's `limit`.
    data: the corpus (spec or EvalDataConfig: val_fraction and seed must match the run) for the offline tasks.
    batch_size: None = "auto" on GPU, CPU_BATCH on CPU. max_length: None = min(config's positions, MAX_LENGTH).
    include_path: extra folders of lm-eval task YAML (e.g. a standard task pointed at local files).
    bootstrap_iters: resamples for the stderr of non-mean metrics (perplexities); 0 skips them.
    load_kwargs: extra `load_model` arguments for a spec (allow_pickle, trust_remote_code).
    Task names, the offline data and the task data are all checked before the model is loaded.
    """
    from minitron.models import count_parameters, load_model, resolve_device

    shots = parse_tasks(tasks, preset)
    if isinstance(data, str):
        data = EvalDataConfig(data=data)
    if limit is not None and limit <= 0:
        raise UserError(f"limit must be positive, got {limit}")
    data_dir = write_eval_data(data) if any(n in OFFLINE_TASKS for n in shots) else None
    if any(n not in OFFLINE_TASKS for n in shots) and (hub_offline() or not hub_host_reachable()):
        _go_offline()
    manager = task_manager(list(shots), data_dir, include_path)
    loaded, skipped = _load_tasks(manager, shots)

    if isinstance(model_or_path, (str, Path)):
        model, tokenizer = load_model(str(model_or_path), dtype=dtype, device=device, **(load_kwargs or {}))
    else:
        model = model_or_path
        if tokenizer is None:
            raise UserError("an in-memory model needs its tokenizer: evaluate(model, tokenizer=...)")
    device = next(model.parameters()).device if device is None else resolve_device(device)
    model.to(device).eval()

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    positions = getattr(model.config, "max_position_embeddings", None) or MAX_LENGTH
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", device=str(device),
              batch_size=batch_size or ("auto" if device.type == "cuda" else CPU_BATCH),
              max_length=max_length or min(positions, MAX_LENGTH))
    results: dict = {"params": count_parameters(model), "skipped": skipped}
    if not loaded:
        return results
    out = simple_evaluate(model=lm, tasks=loaded, task_manager=manager, limit=limit, log_samples=True,
                          bootstrap_iters=bootstrap_iters, confirm_run_unsafe_code=False)
    for name in shots:
        if name in out["results"]:
            results[name] = _clean(out["results"][name])
    if "corpus_ppl" in results:
        results["corpus_ppl"]["perplexity"] = _token_perplexity(out["samples"]["corpus_ppl"], lm)
    return results


# ----------------------------------------------------------------------------------------------------------------
# reporting (pure python: the Prefect task logs these to MLflow and as artifacts)


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """The {task: {metric: value}} part of a results dict (without params/skipped)."""
    return {k: v for k, v in results.items() if k not in META_KEYS and isinstance(v, dict)}


def flatten_metrics(results: dict) -> dict[str, float]:
    """MLflow keys: {"eval/<task>/<metric>": value} (stderr left out: few stable keys), plus "eval/params"."""
    flat = {f"eval/{task}/{metric}": value for task, metrics in task_metrics(results).items()
            for metric, value in metrics.items() if not metric.endswith("_stderr")}
    if "params" in results:
        flat["eval/params"] = float(results["params"])
    return flat


def comparison_table(results_by_model: dict[str, dict], teacher: str | None = None) -> list[dict]:
    """One row per (task, metric) over all models: each model's value and its % of the teacher's value.

    teacher: the reference model's key (default: the first). For lower-is-better metrics (perplexities) a % above
    100 means worse; the row says which direction is better under "better".
    """
    if not results_by_model:
        return []
    teacher = teacher or next(iter(results_by_model))
    if teacher not in results_by_model:
        raise UserError(f"teacher '{teacher}' is not one of the compared models: {', '.join(results_by_model)}")
    keys: list[tuple[str, str]] = [("params", "count")]
    for results in results_by_model.values():
        for task, metrics in task_metrics(results).items():
            keys += [(task, m) for m in metrics if not m.endswith("_stderr") and (task, m) not in keys]
    rows = []
    for task, metric in keys:
        row: dict = {"task": task, "metric": metric,
                     "better": "lower" if "perplexity" in metric or metric in ("bits_per_byte", "count") else "higher"}
        ref = _value(results_by_model[teacher], task, metric)
        for name, results in results_by_model.items():
            value = _value(results, task, metric)
            row[name] = value
            row[f"{name} %"] = 100.0 * value / ref if value is not None and ref else None
        rows.append(row)
    return rows


def _value(results: dict, task: str, metric: str) -> float | None:
    if task == "params":
        return float(results["params"]) if "params" in results else None
    return task_metrics(results).get(task, {}).get(metric)
