"""Offline evaluation data built from the run's own corpus: held-out passages for the lm-eval tasks `corpus_ppl` and
`corpus_cloze` (their YAML lives in `minitron/lm_eval_tasks/`).

Only validation documents are used (`minitron.data.is_validation`, the document-level split every stage shares), so
no passage was seen in calibration, correction or distillation. The folder written here holds
  - `corpus_ppl.jsonl`: {"text"}: passages of whole words (original whitespace kept) for rolling log-likelihood,
  - `corpus_cloze.jsonl`: {"context", "endings", "label"}: a passage prefix and four continuations, the true one and
    three continuations of other held-out documents, in a seeded random order (chance = 25%),
  - `corpus_ppl.yaml`, `corpus_cloze.yaml`: tasks that `include` the shipped YAML and point `data_files` at the jsonl,
    so `TaskManager(include_path=folder)` (or `lm_eval --include_path folder`) finds them by name.
Everything is deterministic in (corpus, val_fraction, seed, sizes); the folder is cached under that key.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from minitron.data import is_validation, iter_documents, source_fingerprint
from minitron.errors import UserError
from minitron.models import cache_dir

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"  # the shipped base YAML of the offline tasks
OFFLINE_TASKS = ("corpus_ppl", "corpus_cloze")
FORMAT = 1  # bump when the files written here change, so cached folders are rebuilt


@dataclass(frozen=True)
class EvalDataConfig:
    """Where the held-out text comes from and how it is cut into evaluation items."""

    data: str = "shakespeare"  # corpus spec, as for `minitron.data.iter_documents`
    val_fraction: float = 0.05  # must match the run's split so that only unseen documents are used
    seed: int = 0  # split seed (as the run's) and seed for the distractors and label order
    hf_config: str | None = None  # hub dataset config, for hub corpora
    hf_split: str = "train"
    text_field: str = "text"
    # Sizes are kept small for CPU: lm-eval scores each of the 4 choices with the whole prefix in front of it.
    ppl_words: int = 64  # words per perplexity passage (the tail of a document shorter than half of it is dropped)
    prefix_words: int = 32  # words of passage shown before the blank
    ending_words: int = 12  # words per continuation (true and distractors)
    max_items: int = 1000  # cap per task; evaluation usually takes fewer through `limit`


_WORD = re.compile(r"\S+\s*")  # a word with its trailing whitespace, so passages keep line breaks


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lstrip())


def _join(words: list[str]) -> str:
    return "".join(words).strip()


def _squeeze(text: str) -> str:
    """Runs of spaces (verse indentation) → one space: cloze items keep line breaks but waste no tokens."""
    return re.sub(r"[ \t]+", " ", text)


def held_out_documents(cfg: EvalDataConfig) -> list[str]:
    """The validation documents of the corpus, exactly those `load_token_data` puts in `val` for the same split."""
    docs = iter_documents(cfg.data, hf_config=cfg.hf_config, hf_split=cfg.hf_split, text_field=cfg.text_field)
    held, last = [], None
    for i, doc in enumerate(docs):
        if is_validation(i, cfg.val_fraction, cfg.seed):
            held.append(doc)
        last = doc
    if not held and last is not None:  # as in load_token_data: tiny corpora move their last document to validation
        held.append(last)
    return held


def ppl_passages(docs: list[str], cfg: EvalDataConfig) -> list[dict]:
    items = []
    for doc in docs:
        words = _words(doc)
        for start in range(0, len(words), cfg.ppl_words):
            piece = words[start:start + cfg.ppl_words]
            if len(piece) >= cfg.ppl_words // 2:
                items.append({"text": _join(piece)})
    return items[:cfg.max_items]


def cloze_items(docs: list[str], cfg: EvalDataConfig) -> list[dict]:
    """Cut each document into windows of prefix + ending words; distractors are endings of other documents."""
    window = cfg.prefix_words + cfg.ending_words
    windows = []  # (document index, prefix, true ending)
    for d, doc in enumerate(docs):
        words = _words(doc)
        for start in range(0, len(words) - window + 1, window):
            windows.append((d, _squeeze(_join(words[start:start + cfg.prefix_words])),
                            _squeeze(_join(words[start + cfg.prefix_words:start + window]))))
    if len({d for d, _, _ in windows}) < 2:
        raise UserError(f"the held-out split of '{cfg.data}' has fewer than 2 documents with {window} words: the "
                        "cloze needs distractors from other documents; use a larger corpus or val_fraction")
    rng = random.Random(cfg.seed)
    order = list(range(len(windows)))
    rng.shuffle(order)  # items come from all documents even when `limit` takes only the first few
    items = []
    for i in order[:cfg.max_items]:
        d, prefix, ending = windows[i]
        pool = sorted({e for od, _, e in windows if od != d and e != ending})  # sorted: set order is not seeded
        if len(pool) < 3:
            raise UserError(f"the held-out split of '{cfg.data}' has too few distinct passages for cloze "
                            "distractors; use a larger corpus or val_fraction")
        distractors = rng.sample(pool, 3)
        label = rng.randrange(4)
        endings = distractors[:label] + [ending] + distractors[label:]
        items.append({"context": prefix, "endings": endings, "label": label})
    return items


def _write_task(folder: Path, task: str, items: list[dict]) -> None:
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    # The per-folder task inherits the shipped YAML and only adds where its data is.
    (folder / f"{task}.yaml").write_text(
        f"include: {json.dumps(str(TASKS_DIR / f'{task}.yaml'))}\n"
        f"task: {task}\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n")


def write_eval_data(cfg: EvalDataConfig, out_dir: str | Path | None = None) -> Path:
    """Write the offline tasks' data and YAML for `cfg` into `out_dir` (default: a cache folder keyed by `cfg`) and
    return the folder, to pass as lm-eval's include path. A finished folder is reused."""
    # the generated YAML includes the shipped one by absolute path: another install location gets its own folder
    key = hashlib.sha256(json.dumps([FORMAT, asdict(cfg), str(TASKS_DIR), source_fingerprint(
        cfg.data, cfg.hf_config, cfg.hf_split, cfg.text_field)]).encode()).hexdigest()[:20]
    folder = Path(out_dir) if out_dir else cache_dir() / "eval-data" / key
    done = folder / "meta.json"
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        return folder
    docs = held_out_documents(cfg)
    ppl, cloze = ppl_passages(docs, cfg), cloze_items(docs, cfg)
    if not ppl:
        raise UserError(f"the held-out split of '{cfg.data}' has no passage of {cfg.ppl_words // 2}+ words")
    folder.mkdir(parents=True, exist_ok=True)
    _write_task(folder, "corpus_ppl", ppl)
    _write_task(folder, "corpus_cloze", cloze)
    done.write_text(json.dumps({"key": key, "config": asdict(cfg), "documents": len(docs),
                                "corpus_ppl": len(ppl), "corpus_cloze": len(cloze)}, indent=2))
    return folder
