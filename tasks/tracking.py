"""MLflow helpers for the flow: one experiment per "teacher → target", a parent run per flow run, child runs per
stage and candidate, metrics on a few stable keys, and nothing secret in what gets logged.

We use `MlflowClient` with explicit run ids instead of mlflow's fluent API: the fluent API keeps the active run in
process-global state (and in MLFLOW_RUN_ID for subprocesses), which breaks as soon as Prefect runs two tasks in
threads or a stage starts torchrun. A child run is a run tagged `mlflow.parentRunId`, which is all the UI needs.
"""

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse, urlunparse

from infra.stack import SECRET_NAMES, basic_auth_header, bearer_header, http_status
from minitron.errors import UserError

# -- secret hygiene ------------------------------------------------------------------------------------------------
MASK = "***"
# Environment variables whose values must never appear in anything we log. Any variable whose name matches
# SECRET_NAME is masked as well, so a new token variable is covered without editing this list.
# The stack's credentials (infra/stack.py, the one list of them; usernames are not secret) and the other clients'.
SECRET_ENV = (
    *(name for name in SECRET_NAMES if not name.endswith("_USERNAME")),
    "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN", "PREFECT_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
)
# Whole name parts only: "hf_token" is a secret, "distill_tokens" and "tokenizer" are not.
SECRET_NAME = re.compile(
    r"(?:^|[_.-])(secret|password|passwd|token|api_?key|auth_?string|credentials?|private_?key)(?:$|[_.-])", re.I)
_MIN_SECRET_LEN = 6  # shorter values ("true", "admin") would mask half the log and protect nothing


def secret_values(env: dict[str, str] | None = None) -> list[str]:
    """Credential values present in the environment, longest first (so a secret containing another masks whole)."""
    env = os.environ if env is None else env
    values = {v for k, v in env.items() if (k in SECRET_ENV or SECRET_NAME.search(k)) and len(v) >= _MIN_SECRET_LEN}
    for v in list(values):  # "user:password" auth strings: the password alone must be masked too
        if ":" in v:
            values.update(p for p in v.split(":", 1) if len(p) >= _MIN_SECRET_LEN)
    return sorted(values, key=len, reverse=True)


def _scrub_text(text: str, secrets: list[str]) -> str:
    for value in secrets:
        text = text.replace(value, MASK)
    # user:password@ in URLs (a tracking URI or endpoint someone pasted with credentials)
    return re.sub(r"(?<=://)([^/\s:@]+):([^/\s@]+)@", rf"\1:{MASK}@", text)


def scrub(obj, secrets: list[str] | None = None):
    """A copy of obj safe to log: pydantic SecretStr and secret-named keys masked, known credential values removed
    from every string. Handles dicts, lists, tuples, pydantic models and anything with a str()."""
    secrets = secret_values() if secrets is None else secrets
    if hasattr(obj, "get_secret_value"):  # pydantic SecretStr / SecretBytes
        return MASK
    if hasattr(obj, "model_dump"):  # a pydantic model: python mode keeps SecretStr objects, masked above
        obj = obj.model_dump()
    if isinstance(obj, dict):
        return {k: MASK if isinstance(k, str) and SECRET_NAME.search(k) and v not in (None, "")
                else scrub(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(scrub(v, secrets) for v in obj)
    if isinstance(obj, str):
        return _scrub_text(obj, secrets)
    if obj is None or isinstance(obj, bool | int | float):
        return obj
    return _scrub_text(str(obj), secrets)


class SecretFilter(logging.Filter):
    """Masks credentials in log records (attach to Prefect's or any logger's handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")  # what get_run_logger() logs to (the UI's run logs)


def mask_run_logs() -> None:
    """Attach one SecretFilter to Prefect's run loggers, so a credential in a log line (a stage's child-process
    output, an exception message) reaches the console and the Prefect API masked. Idempotent."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, SecretFilter) for f in logger.filters):
            logger.addFilter(SecretFilter())


# -- retries -------------------------------------------------------------------------------------------------------
RETRY_ATTEMPTS = 4  # our attempts around one MLflow call (its HTTP layer also retries 429/5xx on its own)
RETRY_BACKOFF = 1.0  # seconds before the 2nd attempt; doubles each time
_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}


def _transient(error: Exception) -> bool:
    code = getattr(error, "error_code", None)
    if code is not None:
        return code in _TRANSIENT_CODES or "database is locked" in str(error)
    return isinstance(error, ConnectionError | TimeoutError | OSError) or type(error).__module__.startswith("requests")


def retry(fn, *args, attempts: int = RETRY_ATTEMPTS, backoff: float = RETRY_BACKOFF, **kwargs):
    """fn(*args, **kwargs), retried with exponential backoff on transient errors (connection, 5xx, locked DB)."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if attempt == attempts - 1 or not _transient(e):
                raise
            logging.getLogger(__name__).warning("MLflow call failed (%s), retry %d/%d", type(e).__name__,
                                                attempt + 1, attempts - 1)
            time.sleep(backoff * 2**attempt)


# -- tracking URIs ---------------------------------------------------------------------------------------------------
def embedded_tracking(state_dir: str | Path) -> tuple[str, str]:
    """The no-server default: (sqlite tracking URI, artifact folder URI) under state_dir."""
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{state / 'mlflow.db'}", (state / "mlartifacts").as_uri()


def _auth_headers() -> dict[str, str]:
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return bearer_header(token)
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return basic_auth_header(f"{user}:{password}")
    return {}


def check_tracking(uri: str, timeout: float = 3.0) -> None:
    """Fail in seconds, with one line, when the tracking URI cannot work: server down, credentials refused, or a
    local store that cannot be written. No MLflow client involved (its HTTP retries take minutes to give up)."""
    shown = scrub(uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        netloc = parsed.netloc.rsplit("@", 1)[-1]
        base = urlunparse(parsed._replace(netloc=netloc)).rstrip("/")
        if http_status(f"{base}/health", {}, timeout) is None:
            raise UserError(f"cannot reach the MLflow server at {shown}: is it running? (MLFLOW_TRACKING_URI)")
        status = http_status(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", _auth_headers(), timeout)
        if status in (401, 403):
            raise UserError(f"the MLflow server at {shown} refused the credentials (HTTP {status}): "
                            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        if status != 200:
            raise UserError(f"the MLflow server at {shown} answered HTTP {status} to a search: is it MLflow?")
    elif parsed.scheme in ("sqlite", "file", ""):
        path = Path(parsed.path if parsed.scheme else uri)
        folder = path.parent if parsed.scheme == "sqlite" else path
        if parsed.scheme == "sqlite" and not parsed.path.startswith("/"):
            raise UserError(f"tracking URI {shown}: use an absolute path, sqlite:////abs/path/mlflow.db")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise UserError(f"tracking store folder {folder} is not writable: {e.strerror}") from None
    else:
        raise UserError(f"unsupported tracking URI {shown}: use http(s)://, sqlite:/// or a folder")


# -- runs ----------------------------------------------------------------------------------------------------------
def experiment_name(teacher: str, target: str) -> str:
    """One experiment per teacher → target, e.g. "SmolLM2-135M-Instruct → 70M" (paths shortened to their name)."""
    return f"{Path(str(teacher).rstrip('/')).name or teacher} → {target}"


def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


# The experiment tag MLflow reads for the kind of work an experiment holds: model training (runs table, metric
# charts), not GenAI (traces). MLflow 3.17's own UI decides its GenAI / Model-training view per browser instead (the
# switch at its top left, or `workflowType=` in the URL), so every MLflow link we hand out also carries UI_VIEW.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UI_VIEW = "workflowType=machine_learning"


def ensure_experiment(name: str, *, tracking_uri: str | None = None, artifact_location: str | None = None) -> str:
    """Experiment id, created on first use as a model-training experiment (artifact_location only applies then;
    servers pick their own); an existing experiment without the kind tag gets it."""
    client = _client(tracking_uri)
    experiment = retry(client.get_experiment_by_name, name)
    if experiment is not None:
        for key, value in EXPERIMENT_KIND.items():
            if experiment.tags.get(key) != value:
                retry(client.set_experiment_tag, experiment.experiment_id, key, value)
        return experiment.experiment_id
    try:
        return retry(client.create_experiment, name, artifact_location=artifact_location, tags=EXPERIMENT_KIND)
    except Exception as e:  # created meanwhile by a parallel flow run
        if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
        return retry(client.get_experiment_by_name, name).experiment_id


def ui_base(tracking_uri: str) -> str | None:
    """Where a browser opens the MLflow UI of this tracking URI: `MINITRON_MLFLOW_UI_URL` when set (a server that
    workers reach under another name, e.g. http://mlflow:5000 in compose), else the server's own URL without
    credentials; None for a local store (SQLite, folder), which has no UI until `mlflow ui` serves it."""
    if base := os.environ.get("MINITRON_MLFLOW_UI_URL"):
        return base.rstrip("/")
    parsed = urlparse(tracking_uri)
    if parsed.scheme not in ("http", "https"):
        return None
    return urlunparse(parsed._replace(netloc=parsed.netloc.rsplit("@", 1)[-1])).rstrip("/")


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI page of one run, in the Model-training view."""
    base = ui_base(tracking_uri)
    return base and f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{UI_VIEW}"


def experiment_url(tracking_uri: str, experiment_id: str) -> str | None:
    """The MLflow UI's runs table of one experiment."""
    base = ui_base(tracking_uri)
    return base and f"{base}/#/experiments/{experiment_id}/runs?{UI_VIEW}"


# Metric keys. Few and stable, so runs line up in the compare view: a record's other fields are not logged.
METRIC_KEYS = ("loss", "lr", "tokens_per_s", "grad_norm", "val_loss", "val_kl", "val_ce", "val_ppl")
_PARAM_MAX = 6000  # MLflow's limit on a param value


class Run:
    """One MLflow run addressed by id; every logging call is scrubbed and retried."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self._rate_step = None  # last step whose tokens_per_s was logged: one value per step

    def url(self, tracking_uri: str) -> str | None:
        """This run's page in the MLflow UI (None for a local store)."""
        return run_url(tracking_uri, self.info.experiment_id, self.run_id)

    def describe(self, markdown: str) -> None:
        """The run's description in the MLflow UI (rendered as markdown: links work)."""
        self.set_tags({"mlflow.note.content": markdown})

    @property
    def info(self):
        return retry(self.client.get_run, self.run_id).info

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:_PARAM_MAX]) for k, v in scrub(params).items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            retry(self.client.log_batch, self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in scrub(tags).items()]
        if items:
            retry(self.client.log_batch, self.run_id, tags=items)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Numeric values only; use `log_progress` for training records (it keeps to METRIC_KEYS)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)]
        for i in range(0, len(items), 1000):
            retry(self.client.log_batch, self.run_id, metrics=items[i : i + 1000])

    def log_progress(self, record: dict) -> None:
        """A training/validation callback record ({"step", "loss", "lr", "tokens_per_s", "val_kl", ...}). The train
        and the validation record of one step both carry tokens_per_s: the first one is kept, so its chart does not
        jump back and forth within a step."""
        step = int(record.get("step", 0))
        metrics = {k: record[k] for k in METRIC_KEYS if k in record}
        if "tokens_per_s" in metrics:
            if step == self._rate_step:
                del metrics["tokens_per_s"]
            self._rate_step = step
        self.log_metrics(metrics, step=step)

    def log_dict(self, obj, artifact_file: str) -> None:
        """JSON (or YAML by suffix) artifact, scrubbed."""
        retry(self.client.log_dict, self.run_id, scrub(obj), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        retry(self.client.log_text, self.run_id, scrub(text), artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        retry(self.client.log_figure, self.run_id, figure, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file; text files are scrubbed on the way (a copy is logged, the file is left as is)."""
        path = Path(path)
        if path.suffix in (".json", ".yaml", ".yml", ".txt", ".md", ".csv", ".log", ".toml"):
            text = path.read_text(errors="replace")
            clean = scrub(text)
            if clean != text:
                with tempfile.TemporaryDirectory() as tmp:
                    copy = Path(tmp) / path.name
                    copy.write_text(clean)
                    retry(self.client.log_artifact, self.run_id, str(copy), artifact_path)
                return
        retry(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def terminate(self, status: str = "FINISHED") -> None:
        retry(self.client.set_terminated, self.run_id, status)


@contextmanager
def _running(run: Run) -> Iterator[Run]:
    """FINISHED on success, KILLED on interrupt/cancel, FAILED on error; the error itself propagates."""
    try:
        yield run
    except (KeyboardInterrupt, SystemExit):
        run.terminate("KILLED")
        raise
    except BaseException as e:
        run.terminate("KILLED" if type(e).__name__ in ("CancelledError", "TerminationSignal") else "FAILED")
        raise
    else:
        run.terminate("FINISHED")


def start_parent_run(experiment: str, run_name: str, *, params: dict | None = None, tags: dict | None = None,
                     tracking_uri: str | None = None, artifact_location: str | None = None,
                     run_id: str | None = None) -> Run:
    """Create the flow's parent run (or reopen run_id when a flow run resumes); not closed automatically."""
    client = _client(tracking_uri)
    if run_id:
        retry(client.update_run, run_id, status="RUNNING")
        run = Run(client, run_id)
    else:
        experiment_id = ensure_experiment(experiment, tracking_uri=tracking_uri, artifact_location=artifact_location)
        created = retry(client.create_run, experiment_id, run_name=run_name)
        run = Run(client, created.info.run_id)
    run.set_tags(tags or {})
    if params:
        run.log_params(params)
    return run


@contextmanager
def parent_run(experiment: str, run_name: str, **kwargs) -> Iterator[Run]:
    """`with parent_run("teacher → 70M", "nightly-2026-01-01", params=..., tags=...) as run:` (see start_parent_run)."""
    with _running(start_parent_run(experiment, run_name, **kwargs)) as run:
        yield run


@contextmanager
def child_run(parent_run_id: str, name: str, params: dict | None = None, *, tags: dict | None = None,
              tracking_uri: str | None = None) -> Iterator[Run]:
    """A run nested under parent_run_id (same experiment), closed with the block's outcome."""
    client = _client(tracking_uri)
    parent = retry(client.get_run, parent_run_id)
    created = retry(client.create_run, parent.info.experiment_id, run_name=name,
                    tags={"mlflow.parentRunId": parent_run_id})
    run = Run(client, created.info.run_id)
    if tags:
        run.set_tags(tags)
    if params:
        run.log_params(params)
    with _running(run):
        yield run


def metric_history(run_id: str, key: str, *, tracking_uri: str | None = None) -> list[tuple[int, float]]:
    """[(step, value)] of one metric, in step order (for summaries and tests)."""
    history = retry(_client(tracking_uri).get_metric_history, run_id, key)
    return sorted((m.step, m.value) for m in history)


def child_runs(parent_run_id: str, *, tracking_uri: str | None = None) -> list:
    client = _client(tracking_uri)
    parent = retry(client.get_run, parent_run_id)
    return retry(client.search_runs, [parent.info.experiment_id],
                 filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000)


def dump_run(run_id: str, *, tracking_uri: str | None = None) -> str:
    """Everything a run exposes as text (params, tags, metric keys, artifact names): for secret scans in tests."""
    client = _client(tracking_uri)
    run = retry(client.get_run, run_id)
    artifacts = [a.path for a in retry(client.list_artifacts, run_id)]
    return json.dumps({"params": run.data.params, "tags": run.data.tags, "metrics": list(run.data.metrics),
                       "artifacts": artifacts})
