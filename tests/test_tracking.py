"""MLflow helpers against a real `mlflow server` (SQLite, artifacts on moto S3) and the embedded SQLite store."""

import json
import os

import pytest
from pydantic import BaseModel, SecretStr

from infra.stack import free_port
from minitron.errors import UserError
from tasks import tracking


def test_parent_and_child_runs_on_server(mlflow_server):
    uri = mlflow_server.url
    exp = tracking.experiment_name("/models/SmolLM2-135M-Instruct/", "70M")
    assert exp == "SmolLM2-135M-Instruct → 70M"
    with tracking.parent_run(exp, "run-a", params={"seq_len": 128, "teacher": "smollm2-135m"},
                             tags={"prefect.flow_run_id": "abc"}, tracking_uri=uri) as parent:
        with tracking.child_run(parent.run_id, "distill", {"lr": 1e-4}, tracking_uri=uri) as child:
            for step, loss in [(10, 3.0), (20, 2.5), (30, 2.25)]:
                child.log_progress({"step": step, "loss": loss, "lr": 1e-4, "tokens": step * 100, "note": "x"})
            child.log_progress({"step": 30, "val_kl": 0.5, "val_ce": 2.0})
        with pytest.raises(RuntimeError, match="boom"):
            with tracking.child_run(parent.run_id, "candidate-1", tracking_uri=uri):
                raise RuntimeError("boom")
    assert "MLFLOW_RUN_ID" not in os.environ
    children = {r.info.run_name: r for r in tracking.child_runs(parent.run_id, tracking_uri=uri)}
    assert set(children) == {"distill", "candidate-1"}
    assert children["distill"].info.status == "FINISHED" and children["candidate-1"].info.status == "FAILED"
    assert children["distill"].data.params == {"lr": "0.0001"}
    # only the stable keys were logged, with their steps
    assert set(children["distill"].data.metrics) == {"loss", "lr", "val_kl", "val_ce"}
    assert tracking.metric_history(children["distill"].info.run_id, "loss", tracking_uri=uri) == [
        (10, 3.0), (20, 2.5), (30, 2.25)]
    info = tracking.Run(parent.client, parent.run_id).info
    assert info.status == "FINISHED" and info.experiment_id == children["distill"].info.experiment_id
    run = parent.client.get_run(parent.run_id)
    assert run.data.params == {"seq_len": "128", "teacher": "smollm2-135m"}
    assert run.data.tags["prefect.flow_run_id"] == "abc"


def test_model_training_experiment_links_and_description(mlflow_server):
    """Experiments are created (or tagged, when they exist without it) as model-training experiments; a run's
    MLflow page URL opens the Model-training view; the description is the run's markdown note."""
    from mlflow import MlflowClient

    uri = mlflow_server.url
    client = MlflowClient(uri)
    older = client.create_experiment("created elsewhere")
    assert tracking.ensure_experiment("created elsewhere", tracking_uri=uri) == older
    with tracking.parent_run("kind → 1M", "described", tracking_uri=uri) as run:
        run.describe("Prefect flow run [described](http://prefect.example/runs/flow-run/1)")
        child = tracking.Run(client, client.create_run(run.info.experiment_id).info.run_id)
        child.log_progress({"step": 10, "tokens": 640, "loss": 2.0, "tokens_per_s": 100.0})
        child.log_progress({"step": 10, "val_kl": 0.5, "tokens_per_s": 80.0})  # same step: rate not logged again
        child.log_progress({"step": 20, "val_kl": 0.4, "tokens_per_s": 90.0})
    for name in ("kind → 1M", "created elsewhere"):
        assert client.get_experiment_by_name(name).tags["mlflow.experimentKind"] == "custom_model_development"
    experiment = run.info.experiment_id
    assert client.get_run(run.run_id).data.tags["mlflow.note.content"].startswith("Prefect flow run [described](")
    assert run.url(uri) == f"{uri}/#/experiments/{experiment}/runs/{run.run_id}?workflowType=machine_learning"
    assert tracking.experiment_url(uri, experiment) == f"{uri}/#/experiments/{experiment}/runs?workflowType=" \
                                                       "machine_learning"
    assert tracking.metric_history(child.run_id, "tokens_per_s", tracking_uri=uri) == [(10, 100.0), (20, 90.0)]


def test_ui_base(monkeypatch):
    monkeypatch.delenv("MINITRON_MLFLOW_UI_URL", raising=False)
    assert tracking.ui_base("http://admin:secret@127.0.0.1:5000/") == "http://127.0.0.1:5000"  # no credentials
    assert tracking.ui_base("sqlite:////tmp/mlflow.db") is None  # a local store has no UI to link to
    monkeypatch.setenv("MINITRON_MLFLOW_UI_URL", "https://mlflow.example.org/")
    assert tracking.run_url("http://mlflow:5000", "3", "abc") == \
        "https://mlflow.example.org/#/experiments/3/runs/abc?workflowType=machine_learning"


def test_artifacts_land_in_s3_scrubbed(mlflow_server, tmp_path):
    """Artifacts go through the server to s3://minitron-artifacts/mlflow, with credentials masked."""
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]  # set by the s3_endpoint fixture
    uri = mlflow_server.url
    with tracking.parent_run("artifacts", "r", tracking_uri=uri) as run:
        run.log_dict({"lr": 0.1, "endpoint": f"key {secret}", "hf_token": "hf_abcdefgh"}, "config.json")
        (tmp_path / "table.csv").write_text(f"name,uri\nwinner,s3://x/{secret}\n")
        run.log_artifact(tmp_path / "table.csv", "tables")
        run.log_params({"store": f"s3://bucket?k={secret}"})
    s3 = mlflow_server.s3.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=mlflow_server.s3.artifact_bucket)["Contents"]]
    config_key = next(k for k in keys if k.endswith(f"{run.run_id}/artifacts/config.json"))
    assert config_key.startswith("mlflow/")
    config = json.loads(s3.get_object(Bucket=mlflow_server.s3.artifact_bucket, Key=config_key)["Body"].read())
    assert config == {"lr": 0.1, "endpoint": "key ***", "hf_token": "***"}
    csv_key = next(k for k in keys if k.endswith("tables/table.csv"))
    assert s3.get_object(Bucket=mlflow_server.s3.artifact_bucket, Key=csv_key)["Body"].read() == \
        b"name,uri\nwinner,s3://x/***\n"
    assert secret not in tracking.dump_run(run.run_id, tracking_uri=uri)


def test_embedded_sqlite_default(tmp_path):
    uri, artifacts = tracking.embedded_tracking(tmp_path / "state")
    tracking.check_tracking(uri)
    with tracking.parent_run("embedded", "r", tracking_uri=uri, artifact_location=artifacts) as run:
        with tracking.child_run(run.run_id, "importance", tracking_uri=uri) as child:
            child.log_metrics({"val_loss": 1.5}, step=3)
            child.log_text("hello", "notes.txt")
    assert (tmp_path / "state" / "mlflow.db").is_file()
    assert (tmp_path / "state" / "mlartifacts").is_dir()
    assert list((tmp_path / "state" / "mlartifacts").rglob("notes.txt"))
    assert tracking.metric_history(child.run_id, "val_loss", tracking_uri=uri) == [(3, 1.5)]
    # reopening a parent (a resumed flow run) keeps its id and children
    again = tracking.start_parent_run("embedded", "r", tracking_uri=uri, run_id=run.run_id)
    assert again.info.status == "RUNNING"
    again.terminate()
    assert len(tracking.child_runs(run.run_id, tracking_uri=uri)) == 1


def test_check_tracking_errors(tmp_path, mlflow_server):
    tracking.check_tracking(mlflow_server.url)
    with pytest.raises(UserError, match="cannot reach"):
        tracking.check_tracking(f"http://127.0.0.1:{free_port()}")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not writable"):
        tracking.check_tracking(f"sqlite:///{tmp_path}/file/mlflow.db")
    with pytest.raises(UserError, match="unsupported"):
        tracking.check_tracking("ftp://x")
    with pytest.raises(UserError, match=r"cannot reach .*user:\*\*\*@"):
        tracking.check_tracking(f"http://user:hunter2secret@127.0.0.1:{free_port()}")


class Cfg(BaseModel):
    teacher: str
    hf_token: SecretStr | None = None
    aws: SecretStr


def test_scrub(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_API_KEY", "k-1234567890")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "admin:prefect-pass-123")
    monkeypatch.setenv("SHORT_TOKEN", "abc")  # too short to mask safely
    cfg = Cfg(teacher="m", hf_token=SecretStr("hf_xyz123456"), aws=SecretStr("a"))
    assert tracking.scrub(cfg) == {"teacher": "m", "hf_token": "***", "aws": "***"}
    assert tracking.scrub({"url": "http://bob:pw12@host/x", "n": 3, "nested": [("k-1234567890 and abc",)]}) == {
        "url": "http://bob:***@host/x", "n": 3, "nested": [("*** and abc",)]}
    assert tracking.scrub("auth prefect-pass-123 / admin:prefect-pass-123") == "auth *** / ***"
    assert tracking.scrub({"password": "", "token": None}) == {"password": "", "token": None}
    # names that merely contain a secret word are config, not credentials
    assert tracking.scrub({"distill_tokens": "5M", "tokenizer": "bpe", "tokens_per_s": 9.5, "db_password": "pw"}) == {
        "distill_tokens": "5M", "tokenizer": "bpe", "tokens_per_s": 9.5, "db_password": "***"}
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false-ish")
    assert tracking.scrub("false-ish") == "false-ish"
    assert tracking.scrub(1.5) == 1.5 and tracking.scrub(True) is True


def test_secret_filter_masks_log_records(monkeypatch, caplog):
    import logging

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    logger = logging.getLogger("minitron.test.secret")
    logger.addFilter(tracking.SecretFilter())
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("connecting with %s", "s3cr3t-value-xyz")
    assert caplog.records[0].getMessage() == "connecting with ***"


def test_retry_transient_then_success():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("database is locked", error_code=INTERNAL_ERROR)
        return "ok"

    assert tracking.retry(flaky, backoff=0.01) == "ok" and len(calls) == 3
    calls.clear()

    def bad_input():
        calls.append(1)
        raise MlflowException("bad", error_code=INVALID_PARAMETER_VALUE)

    with pytest.raises(MlflowException):
        tracking.retry(bad_input, backoff=0.01)
    assert len(calls) == 1  # a user error is not retried


def test_run_logs_are_masked(monkeypatch, caplog):
    """The flow attaches the filter to Prefect's run loggers (once, however often it runs): a credential a task
    logs, as get_run_logger() would, comes out masked."""
    import logging

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    tracking.mask_run_logs()
    tracking.mask_run_logs()
    logger = logging.getLogger("prefect.task_runs")
    try:
        assert sum(isinstance(f, tracking.SecretFilter) for f in logger.filters) == 1
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info("stage output: key=%s", "s3cr3t-value-xyz")
        assert caplog.records[-1].getMessage() == "stage output: key=***"
    finally:
        for f in [f for f in logger.filters if isinstance(f, tracking.SecretFilter)]:
            logger.removeFilter(f)
