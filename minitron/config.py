"""The run configuration: one flat, typed model that is at once the YAML preset, the CLI's `--set key=value`
target, and the Prefect UI form (flat fields, `Literal` choices, a description on every field).

Budgets are given in tokens, the unit the papers and users speak in. Secrets never live here: credentials come from
the environment (AWS_*, MLFLOW_TRACKING_PASSWORD, PREFECT_API_AUTH_STRING, HF_TOKEN).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from minitron.errors import UserError

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
# A count: a number with an optional K/M/B/T suffix. The same regex is the form's and the server's pattern (a JSON
# schema `pattern`, which the server quotes when it refuses a value: kept short, in syntax every regex engine reads).
_NUMBER = r"[0-9]*\.?[0-9]+"
COUNT_PATTERN = rf"^ *{_NUMBER} *[KMBGTkmbgt]? *$"
TARGET_PATTERN = rf"^( *{_NUMBER} *[KMBGTkmbgt%]? *)(,( *{_NUMBER} *[KMBGTkmbgt%]? *))*$"  # 70M, 55%, 8B,4B
COUNT_FORMS = "a count with an optional K/M/B suffix (70M, 4.5B, 2048)"
TARGET_FORMS = ("a parameter count (70M, 4.5B), a percentage of the teacher (55%) or a comma list for iterative "
                "pruning (8B,4B)")


def parse_count(value: str | int | float) -> int:
    """'70M' → 70_000_000, '4.5B' → 4_500_000_000, '2048' → 2048 (parameters or tokens)."""
    if isinstance(value, int | float):
        if value < 0:
            raise UserError(f"count {value} is negative: use a number with an optional K/M/B suffix, e.g. 70M")
        return int(value)
    match = re.fullmatch(rf"({_NUMBER}) *([KMBGTkmbgt]?)", str(value).strip())
    if not match:
        raise UserError(f"cannot read '{value}' as a count: use a number with an optional K/M/B suffix, e.g. 70M")
    return int(round(float(match.group(1)) * _SUFFIX[match.group(2).upper()]))


def _as_count(value):
    """A count field's value as text (YAML may give 2000000 or 4.5e9); a ValueError names the accepted forms (pydantic
    turns it into an error that names the field)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not re.fullmatch(COUNT_PATTERN, value):
        raise ValueError(f"use {COUNT_FORMS}")
    return value


def _as_target(value):
    """target_params as text: counts or percentages (strictly between 0 and 100), comma separated."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not re.fullmatch(TARGET_PATTERN, value):
        raise ValueError(f"use {TARGET_FORMS}")
    for part in value.split(","):
        if part.strip().endswith("%") and not 0 < float(part.strip()[:-1]) < 100:
            raise ValueError("a percentage target must be between 0 and 100")
    return value


def format_count(n: int) -> str:
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


# A count with an optional K/M/B suffix (validated by parse_count); its pattern makes the Prefect server refuse
# "banana" before a run exists. Target: one or more counts or percentages of the teacher.
Count = Annotated[str, StringConstraints(pattern=COUNT_PATTERN), BeforeValidator(_as_count)]
Target = Annotated[str, StringConstraints(pattern=TARGET_PATTERN), BeforeValidator(_as_target)]

# A Ray head as ray.init() takes it: host:port of the GCS (10.0.0.5:6379, ray-head:6379) or a Ray Client URL.
RAY_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9._-]+:\d{1,5}$")


# Fields every command that loads a model (MODEL_FIELDS) or reads a corpus (DATA_FIELDS, beside `data` itself) takes
# as options of the same name: the stage commands and the tasks that build their arguments read these two lists.
MODEL_FIELDS = ("device", "dtype", "allow_pickle", "trust_remote_code")
DATA_FIELDS = ("data_config", "data_split", "text_field", "val_fraction", "seed", "token_store")


# The Prefect form lists the fields in pipeline order under short group headings ("3 search · target_params").
# A group opens at the field named here and runs, in declaration order, to the next opening field: a field added to
# a section joins that section's group. FORM_REQUIRED: what a run cannot go without (the form marks the rest
# "(Optional)": left out, they take their defaults).
FORM_GROUPS = {"run": ("name",), "data": ("data",), "1 correct": ("correct_teacher",),
               "2 importance": ("calib_samples",), "3 search": ("target_params", "memory_cap_gib"),
               "4 distill": ("distill_tokens",), "training": ("batch_size",), "5 evaluate": ("evaluate",),
               "runtime": ("seed",), "results": ("tracking_uri",)}
FORM_REQUIRED = ("name", "teacher", "data", "target_params")


def _form_schema(schema: dict) -> None:
    """JSON schema of CompressConfig as the Prefect UI renders it: group titles, pipeline order, required fields."""
    opens = {field: i for i, fields in enumerate(FORM_GROUPS.values()) for field in fields}
    headings, group = list(FORM_GROUPS), 0
    for declared, (name, prop) in enumerate(schema["properties"].items()):
        group = opens.get(name, group)
        prop["title"] = f"{headings[group]} · {name}"
        prop["position"] = 1000 * group + declared  # the UI sorts fields by `position`
    schema["required"] = [name for name in schema["properties"] if name in FORM_REQUIRED]


class CompressConfig(BaseModel):
    """A compression run: teacher → (correct) → importance → search → distill → evaluate → export."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, json_schema_extra=_form_schema)

    # --- what to compress --------------------------------------------------------------------------------------
    name: str = Field("minitron", description="Run name: prefixes the flow-run name, the MLflow experiment and "
                      "the checkpoint folder.")
    teacher: str = Field("smollm2-135m", description="Teacher model: local HF folder, .gguf file, hub id "
                         "(org/name) or alias (smollm2-135m, tiny-random-llama).")
    trust_remote_code: bool = Field(False, description="Run the model repository's own Python code. Off: only "
                                    "turn on for repositories you trust.")
    allow_pickle: bool = Field(False, description="Allow pickled (.bin) weights, which can run code when loaded. "
                               "Off: safetensors only.")

    # --- data --------------------------------------------------------------------------------------------------
    data: str = Field("shakespeare", description="Corpus: alias 'shakespeare', local .txt/.jsonl/.parquet files or "
                      "folders, or a hub dataset id.")
    data_config: str | None = Field(None, description="Hub dataset config name, e.g. wikitext-2-raw-v1.")
    data_split: str = Field("train", description="Hub dataset split to read.")
    text_field: str = Field("text", description="Field holding the text in .jsonl/.parquet/hub records.")
    val_fraction: float = Field(0.05, gt=0, lt=0.5, description="Fraction of documents held out for validation "
                                "(document-level, deterministic).")
    max_corpus_tokens: Count | None = Field(None, description="Read at most this many corpus tokens (e.g. 20M); "
                                            "empty reads all.")
    token_store: str | None = Field(None, description="Where tokenised corpora are kept, one store per corpus and "
                                    "tokenizer, shared by every stage and later runs: a folder or "
                                    "s3://bucket/prefix (for several nodes); empty = the cache folder.")
    seq_len: int = Field(1024, ge=16, le=131072, description="Tokens per training/validation sequence.")

    # --- importance (stage 2) ----------------------------------------------------------------------------------
    calib_samples: int = Field(1024, ge=1, description="Calibration sequences for importance (the papers: 1024).")
    calib_seq_len: int | None = Field(None, ge=16, description="Tokens per calibration sequence; empty = seq_len.")
    seq_agg: Literal["mean", "l2", "var"] = Field("mean", description="Aggregation of activations over the "
                                                  "sequence (papers' best: mean).")
    batch_agg: Literal["l2", "mean", "var"] = Field("l2", description="Aggregation over samples (papers' best: l2).")
    layer_metric: Literal["loss", "bi"] = Field("loss", description="Layer ranking for depth pruning: LM-loss "
                                                "increase when the layer is skipped, or Block Influence (bi).")

    # --- target (stage 3) --------------------------------------------------------------------------------------
    target_params: Target = Field("55%", description="Student size: parameters (70M, 4.5B), a percentage of the "
                                 "teacher (55%), or a comma list for iterative pruning (8B,4B).")
    tolerance: float = Field(0.05, gt=0, lt=1, description="Relative tolerance around each target parameter count.")
    axes: Literal["all", "width", "depth"] = Field("all", description="Which shapes the search may use: mixed, "
                                                   "width only or depth only.")
    prune_kv_groups: bool = Field(False, description="Also allow fewer KV groups (the papers keep them).")
    target_layers: int | None = Field(None, ge=1, description="Explicit shape: layers (skips the search).")
    target_hidden: int | None = Field(None, ge=1, description="Explicit shape: hidden size.")
    target_ffn: int | None = Field(None, ge=1, description="Explicit shape: MLP intermediate size.")
    target_heads_per_group: int | None = Field(None, ge=1, description="Explicit shape: query heads per KV group.")
    target_kv_groups: int | None = Field(None, ge=1, description="Explicit shape: KV groups.")
    drop_layers: str | None = Field(None, description="Explicit depth pruning: contiguous 1-indexed block 'A-B' "
                                    "to remove (the 4B-Depth recipe drops 16-31).")
    target_shapes: str | None = Field(None, description="Explicit shapes for iterative pruning, one per step, comma "
                                      "separated: L<layers>-H<hidden>-F<ffn>-A<query heads>-KV<kv groups>, parts "
                                      "left out keep the previous model's (e.g. 'H4096-F16384,H3072-F9216-A24').")

    # --- stage switches and budgets (tokens) ---------------------------------------------------------------------
    correct_teacher: bool = Field(True, description="Stage 1: fine-tune the teacher on the corpus first.")
    correction_tokens: Count = Field("1M", description="Teacher-correction budget in tokens.")
    memory_cap_gib: float = Field(0.0, ge=0, description="Only shapes whose bf16 weights plus the KV cache of one "
                                  "seq_len sequence fit in this many GiB (inference memory); 0 = no cap.")
    search_max_candidates: int = Field(32, ge=1, description="Candidates in the first round of successive "
                                       "halving: the whole space when it is smaller, else an even sample of it (or "
                                       "the best by the zero-shot proxy when search_proxy is on).")
    search_tokens: Count = Field("8M", description="Token budget of the whole search, every round and candidate "
                                 "together: successive halving splits it so that each round costs about the same "
                                 "and the last few candidates train longest (the dry run prints the schedule).")
    search_eta: int = Field(2, ge=2, le=8, description="Successive halving: each round keeps the best 1/eta of its "
                            "candidates and trains them eta times longer.")
    search_metric: Literal["val_loss", "val_kl"] = Field("val_loss", description="Ranking after each round: "
                                                         "validation LM loss (the first paper's choice) or KL to "
                                                         "the teacher.")
    search_proxy: bool = Field(False, description="Zero-shot proxy as a first filter: score every shape by the "
                               "validation KL of the pruned, untrained model and keep the best "
                               "search_max_candidates (off: an even sample of the space).")
    proxy_batches: int = Field(2, ge=1, description="Validation batches for the zero-shot proxy.")
    max_width_pruning: float | None = Field(None, ge=0, lt=1, description="Fraction of each width axis (hidden, "
                                            "MLP, query heads per group) the search may prune; empty = 40%, or "
                                            "down to the target's share of the teacher for stronger compression.")
    max_depth_pruning: float | None = Field(None, ge=0, lt=1, description="Fraction of the layers the search may "
                                            "prune; empty = 20% with width (axes all), any for axes depth.")
    depth_block_metric: Literal["loss", "cloze"] = Field("loss", description="Depth and mixed shapes remove the "
                                                         "contiguous block of layers that hurts least: by "
                                                         "validation LM loss, or by the offline cloze task.")
    distill_tokens: Count = Field("10M", description="Final distillation budget in tokens.")
    evaluate: bool = Field(True, description="Stage 5: benchmark teacher, pruned and final student with lm-eval.")
    eval_preset: Literal["quick", "paper", "offline"] = Field("offline", description="lm-eval task preset: "
                                                              "offline (corpus perplexity + cloze), quick, paper.")
    eval_limit: int = Field(200, ge=0, description="Examples per eval task (0 = all).")

    # --- optimisation (shared by correction and distillation) -----------------------------------------------------
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (papers: 1e-4 for 4B-8B students).")
    min_lr: float = Field(1e-5, ge=0, description="Final learning rate of the cosine schedule.")
    warmup_frac: float = Field(0.02, ge=0, lt=1, description="Fraction of steps spent in linear warmup.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clipping.")
    kd_temperature: float = Field(1.0, gt=0, description="Softmax temperature of the logit KL (papers: 1).")
    kd_top_k: int | None = Field(None, ge=1, description="Restrict the KL to the teacher's top-k logits (empty = "
                                 "full vocabulary).")
    ce_weight: float = Field(0.0, ge=0, description="Weight of the next-token CE term (papers: 0, logit-only KD).")
    intermediate_weight: float = Field(0.0, ge=0, description="Weight of the intermediate-state loss (for heavy "
                                       "depth pruning; 0 = off).")
    eval_every: int = Field(50, ge=1, description="Validate every N optimizer steps.")
    val_batches: int = Field(4, ge=1, description="Validation batches per evaluation.")
    checkpoint_every: int = Field(200, ge=1, description="Save a resumable checkpoint every N steps.")

    # --- runtime ----------------------------------------------------------------------------------------------
    seed: int = Field(0, description="Seed for data order, splits and initialisation.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to compute.")
    dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU.")
    compile: bool = Field(False, description="torch.compile the student and teacher (GPU).")
    activation_checkpointing: bool = Field(False, description="Recompute each student decoder layer in backward: "
                                           "far less activation memory for ~1/3 more student compute (8B-class "
                                           "students at long sequences need it).")
    nproc: int = Field(1, ge=1, description="GPUs (processes) per training stage: >1 runs teacher correction, "
                       "each candidate's short distillation and distillation under torchrun.")
    parallel: Literal["auto", "ddp", "fsdp"] = Field("auto", description="How a training stage uses its GPUs: ddp "
                                                 "replicates the trained model, fsdp shards it (FSDP2); auto picks "
                                                 "per stage what the dry run prints (DDP when it fits one GPU, "
                                                 "else FSDP over as many GPUs as it needs, activation checkpointing "
                                                 "when nothing fits without it).")
    backend: Literal["local", "ray"] = Field("local", description="Where training stages and mapped work run: "
                                             "local (this machine: in-process or torchrun) or ray (a Ray "
                                             "cluster: Ray Train jobs across nodes, Ray tasks for candidates and "
                                             "evaluations).")
    ray_address: str | None = Field(None, pattern=RAY_ADDRESS.pattern, description="backend ray: the cluster's "
                                    "head, host:port (GCS) or ray://host:port; empty = $RAY_ADDRESS (`minitron "
                                    "stack up --ray` prints it), else start or join a local cluster. The token "
                                    "comes from RAY_AUTH_TOKEN.")
    ray_max_failures: int = Field(2, ge=0, description="backend ray: times a training job is restarted from its "
                                  "last checkpoint after a worker dies (a lost node, an OOM kill) before the stage "
                                  "fails.")
    queue_timeout_min: int = Field(720, ge=1, description="Minutes a stage waits for this machine's GPU (or CPU) "
                                   "while another run holds it, before failing.")
    stage_timeout_hours: float = Field(0.0, ge=0, description="A stage running longer than this is stopped (its "
                                       "last checkpoint stays); 0 = no limit.")
    resume: bool = Field(True, description="Reuse stages a previous run of the same config finished (off: "
                         "recompute every stage).")
    cache_check: Literal["auto", "sha256", "size"] = Field("auto", description="Before a finished stage is "
                                                           "reused, its checkpoint is checked in the store: manifest "
                                                           "and sizes always; content by sha256 on a folder store and "
                                                           "by S3's ETag on S3 (auto), by sha256 everywhere (sha256: "
                                                           "S3 downloads), or not (size). A bad one is recomputed.")

    # --- where results go ---------------------------------------------------------------------------------------
    tracking_uri: str = Field("", description="MLflow tracking URI; empty = MLFLOW_TRACKING_URI, else local SQLite "
                              "under .minitron/.")
    checkpoint_store: str = Field("", description="Checkpoint store: s3://bucket/prefix or a folder; empty = "
                                  "MINITRON_CHECKPOINT_STORE, else .minitron/checkpoints.")

    @field_validator("memory_cap_gib", "eval_limit", "stage_timeout_hours", "tracking_uri", "checkpoint_store",
                     mode="before")
    @classmethod
    def _null_is_none(cls, v, info):
        """Older presets and `--set key=` say null for "none" (no cap, all examples, the environment's store): these
        fields say it with a concrete 0 or "" now, which the form shows as a plain value, not a None switch."""
        if v is not None:
            return v
        return "" if cls.model_fields[info.field_name].annotation is str else 0

    @field_validator("drop_layers")
    @classmethod
    def _block(cls, v):
        if v is not None and not re.fullmatch(r"\d+-\d+", v):
            raise ValueError("use A-B, 1-indexed inclusive, e.g. 16-31")
        return v

    @field_validator("target_shapes")
    @classmethod
    def _shapes(cls, v):
        if v is not None:
            from minitron.archmath import Shape

            for step in v.split(","):  # read against any parent: only the form is checked here
                try:
                    Shape.from_spec(step, Shape(1, 1, 1, 1, 1, 1))
                except UserError as err:
                    raise ValueError(str(err)) from None
        return v

    @field_validator("ray_address", mode="before")
    @classmethod
    def _ray_address(cls, v):
        if v is not None and not RAY_ADDRESS.fullmatch(str(v)):
            raise ValueError(f"'{v}' is not a Ray head address: use host:port of its GCS (10.0.0.5:6379) or "
                             "ray://host:port, or leave it empty")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.min_lr > self.lr:
            raise ValueError("min_lr must not exceed lr")
        return self

    # ---- derived values ----------------------------------------------------------------------------------------
    def targets(self, teacher_params: int) -> list[int]:
        """The target parameter counts in order (iterative pruning has several)."""
        out = []
        for part in self.target_params.split(","):
            part = part.strip()
            out.append(int(teacher_params * float(part[:-1]) / 100) if part.endswith("%") else parse_count(part))
        return out

    def tokens(self, field: str) -> int:
        return parse_count(getattr(self, field))

    def explicit_shape(self) -> bool:
        return any(getattr(self, f) is not None for f in (
            "target_layers", "target_hidden", "target_ffn", "target_heads_per_group", "target_kv_groups",
            "drop_layers", "target_shapes"))


# ----------------------------------------------------------------------------------------------------------------
# the settings of one training stage


def run_default(name: str):
    """The default of a run-config field, written once above: DistillConfig, the CLI flags and the loss read it."""
    return CompressConfig.model_fields[name].default


@dataclass
class DistillConfig:
    """One training run (teacher correction, a candidate's short distillation, distillation): the run config's
    optimisation and runtime fields under the same names and defaults (described in CompressConfig), plus the budget
    and the knobs only the loop has. `parallel` and `activation_checkpointing` hold the stage's decision
    (`minitron.cost.choose_parallelism`): never "auto"."""

    tokens: int  # training budget in tokens, all ranks together (the unit the papers use)
    batch_size: int = run_default("batch_size")  # sequences per micro-batch on each rank
    grad_accum: int = run_default("grad_accum")
    lr: float = run_default("lr")
    min_lr: float = run_default("min_lr")
    warmup_frac: float = run_default("warmup_frac")
    weight_decay: float = run_default("weight_decay")  # AdamW decay, on matrices only (not norms, biases)
    grad_clip: float = run_default("grad_clip")
    kd_temperature: float = run_default("kd_temperature")
    kd_top_k: int | None = run_default("kd_top_k")
    ce_weight: float = run_default("ce_weight")
    intermediate_weight: float = run_default("intermediate_weight")
    eval_every: int = run_default("eval_every")  # also before the first and after the last step
    val_batches: int = run_default("val_batches")  # validation micro-batches (of batch_size x world sequences)
    checkpoint_every: int = run_default("checkpoint_every")
    seed: int = run_default("seed")  # data order and initialisation of the intermediate projection
    compile: bool = run_default("compile")
    activation_checkpointing: bool = run_default("activation_checkpointing")
    device: str = run_default("device")  # auto | cpu | cuda | cuda:<index>
    dtype: str = run_default("dtype")  # compute dtype: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP2) the trained model
    keep_checkpoints: int = 2  # older checkpoints are deleted
    log_every: int = 10  # train-metric callback every N steps (each costs a device sync)
    # tokens per chunk of the fused lm_head + KL: peak extra memory ~ 6 * chunk_tokens * vocab * 4 bytes (SmolLM2's
    # 49K vocabulary: 300 MB at 256, 1.2 GB at 1024; 256 measured 0.7 GB less peak RSS in teacher correction on CPU)
    chunk_tokens: int = 256
    progress: bool = True  # tqdm progress bar on rank 0 (Prefect callers pass False and a callback)

    def __post_init__(self):
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"DistillConfig.parallel must be ddp or fsdp, not {self.parallel!r}: resolve 'auto' "
                             "with minitron.cost.choose_parallelism")

    @classmethod
    def from_run_config(cls, cfg, tokens_field: str = "distill_tokens", **overrides) -> DistillConfig:
        """Map a `CompressConfig` (same field names) to a DistillConfig with the budget from `tokens_field`. The
        run's `parallel: auto` stays at the one-process default unless the caller passes the stage's decision."""
        values = {n: getattr(cfg, n) for n in shared_fields()}
        if values.get("parallel") == "auto":
            del values["parallel"]
        values.update(overrides)
        return cls(tokens=cfg.tokens(tokens_field), **values)

    def steps(self, seq_len: int, world: int) -> int:
        return optimizer_steps(self.tokens, batch_size=self.batch_size, seq_len=seq_len, grad_accum=self.grad_accum,
                               world=world)


def optimizer_steps(tokens: int, *, batch_size: int, seq_len: int, grad_accum: int, world: int,
                    budget: str = "token budget") -> int:
    """Optimizer steps of a token budget on `world` ranks; a UserError when it is smaller than one step. The one
    check of that rule: the training loop, the dry-run plan and preflight all call it (`budget` names the
    budget in the message: "distill_tokens = 100")."""
    per_step = batch_size * seq_len * grad_accum * world
    if tokens < per_step:
        raise UserError(f"{budget} ({tokens:,} tokens) is smaller than one optimizer step ({batch_size} x "
                        f"{seq_len} tokens x {grad_accum} accum x {world} ranks = {per_step:,}): raise "
                        "the tokens or lower batch_size/seq_len")
    return tokens // per_step


def shared_fields() -> tuple[str, ...]:
    """The DistillConfig fields that are run-config fields (the training settings a stage's worker receives)."""
    return tuple(f.name for f in fields(DistillConfig) if f.name in CompressConfig.model_fields)


def _coerce(raw: str):
    """A `--set` value as YAML reads it (numbers, booleans, null), so `--set lr=3e-4` is a float."""
    return yaml.safe_load(raw) if raw != "" else None


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    # the field, not the union branch pydantic tried ("max_corpus_tokens.function-before[...]")
    key = ".".join(str(x) for x in e["loc"] if isinstance(x, int) or "[" not in x) or "config"
    if e["type"] == "extra_forbidden":
        return f"unknown config key '{key}' (see `minitron run --help-config` for the keys)"
    message = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]  # ours, without "Value error, "
    shown = repr(e["input"]) if isinstance(e.get("input"), str | int | float) else None
    return f"bad value for '{key}'" + (f" ({shown})" if shown else "") + f": {message}"


def make_config(values: dict) -> CompressConfig:
    try:
        return CompressConfig(**values)
    except ValidationError as err:
        raise UserError(_first_error(err)) from None


def load_config_file(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> CompressConfig:
    """A YAML preset plus `key=value` overrides → a validated config; the first bad key is named in the error."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file '{path}' does not exist (presets live in configs/)")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise UserError(f"config file '{path}' must be a mapping of key: value")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"override '{item}' is not key=value")
        values[key.strip()] = _coerce(raw)
    return make_config(values)
