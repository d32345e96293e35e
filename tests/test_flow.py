"""The compress flow end to end on configs/tiny.yaml against real processes: a moto S3 server, an `mlflow server`
(SQLite, artifacts on that S3) and Prefect's test harness. Also resume after a failure, and bad input."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from conftest import BUCKET, children_of, tiny

from minitron.errors import UserError

SECRET = "testing-secret-value"  # the AWS secret the s3 fixture exports: it must appear nowhere we log


def test_tiny_flow_end_to_end(services):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.compress import compress
    from flows.run import for_terminal
    from tasks.tracking import dump_run, metric_history

    summary = compress(tiny(name="e2e", eval_limit=10))
    client = MlflowClient()
    parent = client.get_run(summary["parent_run_id"])

    # MLflow: one parent with the flow-run tags, a child per stage and per candidate, stepped metrics
    tags = parent.data.tags
    assert tags["teacher"] == "tiny-random-llama" and tags["prefect.flow_run_id"] and tags["git_sha"]
    assert tags["final_checkpoint_uri"].startswith(f"s3://{BUCKET}/runs/e2e/")
    assert parent.data.params["distill_tokens"] == "16K"
    children = children_of(parent.info.run_id)
    for name in ("tokenize", "correct-teacher", "importance", "distill", "evaluate", "evaluate teacher", "evaluate pruned",
                 "evaluate final"):
        assert name in children, sorted(children)
    assert children["tokenize"].data.tags["token_store"]  # the store every stage read
    # successive halving over 8 of the tiny space's 9 shapes: 8 → 4 → 2, a child run per candidate and round
    candidates = [r for n, r in children.items() if n.startswith("candidate ")]
    assert sorted(n.rsplit(" r", 1)[1] for n in children if n.startswith("candidate ")) == \
        ["1"] * 8 + ["2"] * 4 + ["3"] * 2
    for run in candidates:
        assert {"shape_layers", "shape_hidden", "shape_ffn", "shape_heads", "shape_kv_heads", "params",
                "round", "tokens"} <= set(run.data.params)
        curve = metric_history(run.info.run_id, "val_kl")
        assert len(curve) >= 2 and curve[0][0] < curve[-1][0]  # a loss curve over steps, not one point
        assert int(run.data.params["tokens"]) == 1024 * 2 ** (int(run.data.params["round"]) - 1)
    assert len(metric_history(children["distill"].info.run_id, "val_kl")) >= 2
    assert "eval/corpus_cloze/acc" in children["evaluate final"].data.metrics
    select = next(r for n, r in children.items() if n.endswith(": select"))
    assert {"candidates.json", "pareto.png", "halving.png"} <= {a.path for a in
                                                                client.list_artifacts(select.info.run_id)}
    taus = metric_history(select.info.run_id, "kendall_tau")
    assert [step for step, _ in taus] == [2, 3]  # against the previous round (round 1 has no proxy to compare)
    search = json.loads(Path(client.download_artifacts(select.info.run_id, "candidates.json")).read_text())
    assert search["tokens_trained"] == search["schedule"]["total"] == 24_576 <= search["schedule"]["budget"]
    assert select.data.metrics["search_tokens_trained"] == 24_576
    space = next(r for n, r in children.items() if n.endswith(": candidates"))
    assert "depth_blocks.png" in {a.path for a in client.list_artifacts(space.info.run_id)}
    (sweep,) = search["depth_blocks"]  # the mixed shapes drop one layer: the block the sweep chose
    assert all(c["drop"] == sweep["block"] for c in search["candidates"] if c["kind"] == "mixed" and c["rounds"])
    importance = {a.path for a in client.list_artifacts(children["importance"].info.run_id, "importance")}
    assert {"importance/head_importance.png", "importance/layer_importance.png"} <= importance
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "importance")] == [
        "importance/head_importance_pruned.png"]  # the winner's pruned heads crossed out
    assert tags["mlflow.note.content"].startswith("Prefect flow run ")  # the description links back
    assert client.get_model_version(summary["registered_model"], summary["version"]).source == \
        tags["final_checkpoint_uri"]

    # S3: every checkpoint has a manifest whose sizes and sha256 match the stored objects
    s3 = services.s3.client()
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="runs/e2e/")
            for o in page.get("Contents", [])]
    manifests = [k for k in keys if k.endswith("/manifest.json")]
    assert len(manifests) >= 5  # correct-teacher, importance, the last round's 2 candidates, distill
    for key in manifests:
        manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        folder = key.rsplit("/", 1)[0]
        for entry in manifest["files"]:
            body = s3.get_object(Bucket=BUCKET, Key=f"{folder}/{entry['path']}")["Body"].read()
            assert len(body) == entry["size"] and hashlib.sha256(body).hexdigest() == entry["sha256"]

    # Prefect: the summary, the evaluation table and the search table as artifacts
    with get_client(sync_client=True) as prefect:
        artifacts = {a.key: a for a in prefect.read_artifacts() if a.key}
        logs = prefect.read_logs()
    assert {"summary", "evaluation"} <= set(artifacts)
    assert any(k.startswith("search-") for k in artifacts)
    assert "final student" in artifacts["summary"].data and "★ winner" in artifacts["summary"].data
    assert "evaluation-vs-teacher" in artifacts
    text = artifacts["summary"].data  # the search section: rounds, τ and the three charts inline
    assert "## Architecture search" in text and "| 3 | 2 |" in text and text.count("](data:image/png;base64,") == 3
    # what `minitron run` prints: the chart names, not kilobytes of base64
    assert "data:image" not in for_terminal(text) and "[chart: halving, in the Prefect summary]" in for_terminal(text)

    # secret hygiene: nothing we logged anywhere carries the credential
    texts = [dump_run(r.info.run_id) for r in [parent, *children.values()]]
    texts += [str(a.data) for a in artifacts.values()] + [log.message for log in logs]
    for run in [parent, *children.values()]:
        for artifact in client.list_artifacts(run.info.run_id):
            if artifact.path.endswith((".json", ".md")):
                texts.append(Path(client.download_artifacts(run.info.run_id, artifact.path)).read_text())
    assert texts and not [t for t in texts if SECRET in t]


def test_failed_candidate_is_recorded_and_the_search_goes_on(services, monkeypatch):
    """One candidate's task fails in round 1 (its pruning raises): its MLflow run ends FAILED, candidates.json and
    the summary record it, the round ranks the others and the flow finishes."""
    from mlflow import MlflowClient

    import minitron.prune
    from flows.compress import compress

    prune = minitron.prune.prune

    def flaky(model, scores, shape, **kwargs):
        if (shape.layers, shape.hidden, shape.ffn) == (4, 48, 80):  # c000, the first shape of the tiny space
            raise RuntimeError("injected: out of memory")
        return prune(model, scores, shape, **kwargs)

    monkeypatch.setattr(minitron.prune, "prune", flaky)
    summary = compress(tiny(name="flaky", evaluate=False, correct_teacher=False, search_max_candidates=4))
    children = children_of(summary["parent_run_id"])
    failed = [r for n, r in children.items() if n.startswith("candidate L4-H48-F80-")]  # named by its shape
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert sum(n.startswith("candidate ") and n.endswith(" r1") for n in children) == 4
    select = next(r for n, r in children.items() if n.endswith(": select"))
    search = json.loads(Path(MlflowClient().download_artifacts(select.info.run_id, "candidates.json")).read_text())
    row = next(c for c in search["candidates"] if c["index"] == 0)
    assert (row["status"], row["failed_round"]) == ("failed", 1) and "injected: out of memory" in row["error"]
    assert [(r["trained"], r["failed"]) for r in search["rounds"]] == [(3, 1), (2, 0)]
    assert search["winner"]["index"] != 0 and "failed: round 1:" in summary["summary"]


def test_resume_after_failure_reuses_finished_stages(services, monkeypatch):
    from mlflow import MlflowClient

    import tasks.search
    from flows.compress import compress

    config = tiny(name="resume", evaluate=False, search_max_candidates=2)  # one round of two

    def importance_runs() -> int:
        client = MlflowClient()
        experiments = [e.experiment_id for e in client.search_experiments()]
        return len(client.search_runs(experiments, filter_string="attributes.run_name = 'importance'"))

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure after importance")

    before = importance_runs()
    with monkeypatch.context() as patch:
        # the search stage's first step, after importance (preflight's plan reads the space through minitron.search)
        patch.setattr(tasks.search, "model_spec", broken)
        with pytest.raises(RuntimeError, match="injected failure"):
            compress(config)
    assert importance_runs() == before + 1
    summary = compress(config)  # the same config again: correction and importance come from the cache
    assert importance_runs() == before + 1  # importance was not recomputed
    children = children_of(summary["parent_run_id"])
    assert "importance" not in children and "distill" in children
    assert summary["final_uri"].startswith(f"s3://{BUCKET}/runs/resume/")

    # a longer distillation: only the distillation stage and what follows run again (tokenize runs every time: it
    # opens and checks the existing token store, which is its cache)
    longer = compress(config.model_copy(update={"distill_tokens": "24K"}))
    assert set(children_of(longer["parent_run_id"])) == {"tokenize", "distill"}
    assert longer["final_uri"] != summary["final_uri"]


@pytest.mark.parametrize("override, message", [
    ({"tracking_uri": "http://127.0.0.1:9"}, "cannot reach the MLflow server"),
    ({"checkpoint_store": "s3://no-such-bucket/x"}, "no-such-bucket"),
    ({"target_params": "10M"}, "not smaller than its teacher"),
    ({"target_heads_per_group": 3}, "between 1 and"),
    ({"distill_tokens": 100}, "smaller than one optimizer step"),
    ({"search_tokens": "10K"}, "below the smallest successive-halving schedule for 8 candidates"),
])
def test_bad_input_fails_in_seconds(services, override, message):
    from flows.preflight import preflight

    start = time.monotonic()
    with pytest.raises(UserError, match=message) as err:
        preflight(tiny(**override))
    assert "\n" not in str(err.value)
    assert time.monotonic() - start < 30


def test_user_error_is_the_flow_runs_state_message(services):
    """A user error ends the flow run Failed with its one line as the state message; no traceback in its logs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.compress import compress

    state = compress(tiny(name="bad-shape", target_hidden=50), return_state=True)
    assert state.is_failed()
    assert state.message.startswith("target shape: llama configs need the hidden size (50) to be a multiple of the "
                                    "query heads (4)") and "\n" not in state.message
    deadline, logs = time.monotonic() + 30, []
    while not any(state.message in log.message for log in logs):  # logs reach the API in batches
        assert time.monotonic() < deadline, [log.message for log in logs]
        time.sleep(0.5)
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert not [log.message for log in logs if "Traceback" in log.message]
    with pytest.raises(UserError, match="multiple of the query heads"):
        state.result()


def test_a_given_run_name_is_kept_and_a_made_up_one_replaced(monkeypatch):
    """Prefect names a run given no name with a two-word slug (schedules, `prefect deployment run`, `minitron run`):
    that one becomes "<name>: <teacher> → <target>"; a name the user typed is kept as it is."""
    from prefect.runtime import flow_run
    from prefect.utilities.names import generate_slug

    from flows.compress import made_up_by_prefect, run_name

    assert all(made_up_by_prefect(generate_slug(2)) for _ in range(300))
    for typed in ("baseline-run", "ui-3f2a1b-run", "Nightly test", "my run", "llama-8b-width"):
        assert not made_up_by_prefect(typed)
    config = tiny(name="named").model_dump(mode="json")
    for given, parameters, expected in ((generate_slug(2), {"config": config}, "named: tiny-random-llama → 60%"),
                                        ("baseline-run", {"config": config}, "baseline-run"),
                                        # an invalid config still names the run (preflight refuses it after)
                                        ("crimson-tiger", {"config": {"name": "x", "target_params": "banana"}},
                                         "x: smollm2-135m → banana")):
        monkeypatch.setitem(flow_run.FIELDS, "name", lambda given=given: given)
        monkeypatch.setitem(flow_run.FIELDS, "parameters", lambda parameters=parameters: parameters)
        assert run_name() == expected


def test_two_process_fsdp_flow_matches_one_process(services):
    """configs/tiny.yaml with nproc 2, parallel fsdp: teacher correction, both candidates and distillation run under
    torchrun (2 gloo processes, FSDP2) and end at the one-process run's validation KL.

    Both runs see the same global batch (2 x 4 sequences vs 1 x 8) and the same validation blocks (val_batches x
    batch_size x processes); the search's one round distils both candidates (max_candidates = 2 = eta: successive
    halving has nothing to cut) for the same whole steps (the schedule's step is the global batch), and width-only
    shapes need no depth-block sweep. What differs is the order of fp32 sums: FSDP's reduce-scatter against one
    process, and the importance batches (4 vs 8 sequences). The tiny random teacher is nearly uniform, so the final
    KL is ~2.4e-5, a difference of log-probabilities near -5.8 that fp32 resolves to ~3e-7 per token: the measured gap
    is 8e-5 relative (2e-9 absolute). rel 1e-3 leaves 12x headroom and is 0.2% of what distillation moves the KL
    (it falls by more than half), so a lost gradient, shard or data slice would not pass."""
    from mlflow import MlflowClient

    from flows.compress import compress
    from tasks.tracking import metric_history

    common = dict(evaluate=False, axes="width", tolerance=0.2, search_max_candidates=2, device="cpu")
    runs = {"one": compress(tiny(name="one", **common)),
            "two": compress(tiny(name="two", nproc=2, parallel="fsdp", batch_size=4, **common))}
    client = MlflowClient()
    kl = {k: client.get_run(v["parent_run_id"]).data.metrics["final_val_kl"] for k, v in runs.items()}
    trained = {name: run for name, run in children_of(runs["two"]["parent_run_id"]).items()
               if name in ("correct-teacher", "distill") or name.startswith("candidate ")}
    assert len(trained) == 4
    one = children_of(runs["one"]["parent_run_id"])
    for name, run in trained.items():  # the decision is a param of every training stage's child run
        assert (run.data.params["parallelism"], run.data.params["gpus"]) == ("FSDP x2", "2")
        # the ranks read the capped corpus (tiny.yaml: max_corpus_tokens 400K), as the one process does
        assert run.data.metrics["corpus_tokens"] == one[name].data.metrics["corpus_tokens"] < 500_000
    assert one["distill"].data.params["parallelism"] == "1 process"
    assert kl["two"] == pytest.approx(kl["one"], rel=1e-3), kl
    start = metric_history(trained["distill"].info.run_id, "val_kl")[0][1]  # (step, value) before the first step
    assert kl["two"] < 0.5 * start
