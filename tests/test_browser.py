"""The operations path in a real browser: headless Chromium against the authenticated local stack.

One module-scoped stack (`stack_up`: moto S3, mlflow server with basic auth, prefect server with basic auth) and one
`minitron serve --preset tiny` serve the two deployments. Then, as a user would:
  1. log in to the Prefect UI (its login page asks for the `user:password` auth string), open compress-on-demand,
     Run → Custom run; `target_params = banana` is refused at Submit with the field's name and creates no run; then
     a run with a typed run name and a changed field, which the served deployment runs to Completed under that name;
  2. on the flow run's page, the link artifact to its MLflow run: its URL opens the MLflow run page, whose
     description links back to the flow run, and whose experiment opens on the runs table;
  3. the summary artifact: KL to 3 significant digits, the winner marked, Kendall τ explained, evaluation tables;
  4. compress-nightly's page, in a browser in New York, names its timezone in words (not only on hover);
  5. log in to the MLflow UI (HTTP basic auth) and open the compare view of the search's candidate child runs.
Screenshots of every step go to test-artifacts/browser/ (git-ignored; CI keeps them), with the run's head-importance
heatmap (pruned heads crossed out) and layer bars.

Chromium is Debian's (`make tools` installs it); Playwright drives it through `executable_path`, never downloads one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from infra import stack

pytestmark = [pytest.mark.browser, pytest.mark.services]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEZONE = "Europe/Berlin"  # not UTC, so the page showing it proves the timezone travelled from the deployment
BROWSER_TIMEZONE = "America/New_York"  # the user's browser elsewhere: upcoming runs show in its local time
RUN_TIMEOUT = 480.0  # seconds for the tiny flow through the stack on a busy 2-core machine (usually 2-4 minutes)
SIG3 = r"(?:\d\.\d\de[-+]\d\d|0\.0{0,2}[1-9]\d\d|[1-9]\.\d\d|[1-9]\d\.\d|[1-9]\d\d+)"  # 3 significant digits
UI_TIMEOUT_MS = 60_000  # the UIs are slow to render on a loaded machine; nothing here waits on network idle


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: run `make tools` (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium, or `make tools`); CI runs this test")
    return path


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def api(base: str, path: str, auth: str, body: dict | None = None) -> dict | list:
    """A Prefect or MLflow REST call with basic auth; POST when body is given."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {**stack.basic_auth_header(auth), "Content-Type": "application/json"}
    request = urllib.request.Request(base + path, data=data, headers=headers, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


# -- services --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The authenticated stack plus `minitron serve --preset tiny`, as a user starts them; stopped serve-first."""
    chromium()  # no browser: skip (or fail in CI) before starting anything
    tmp = tmp_path_factory.mktemp("browser")
    up = stack.stack_up(tmp / "stack", ports={name: stack.free_port() for name in stack.DEFAULT_PORTS},
                        out=lambda _: None)
    serve = None
    try:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
        env.update(up.env, MINITRON_HOME=str(tmp / "home"), PREFECT_HOME=str(tmp / "client-prefect"),
                   MINITRON_TIMEZONE=TIMEZONE, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        log = tmp / "serve.log"
        with open(log, "wb") as out:  # own process group: a stop reaches the flow-run subprocesses too
            popen = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--preset", "tiny",
                                      "--nightly-preset", "tiny"], cwd=ROOT, env=env, stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        serve = stack.Proc("serve", popen.pid, "", "", log=str(log), popen=popen)
        prefect = up.procs["prefect"].url + "/api"
        auth = up.env["PREFECT_API_AUTH_STRING"]
        deadline = time.monotonic() + 180
        while True:  # served = both deployments registered
            assert serve.alive(), f"minitron serve exited:\n{log.read_text()[-3000:]}"
            names = {d["name"] for d in api(prefect, "/deployments/filter", auth, {})}
            if {"compress-on-demand", "compress-nightly"} <= names:
                break
            assert time.monotonic() < deadline, f"deployments not served after 180s:\n{log.read_text()[-3000:]}"
            time.sleep(2)
        yield up, serve
    finally:
        if serve is not None:
            stack.stop(serve)  # SIGINT (serve ignores SIGTERM), grace, then SIGKILL of its group; before the servers
        stack.stack_down(up.state, out=lambda _: None)


@pytest.fixture(scope="module")
def browser(live):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def prefect_login(page, up, screenshot: str | None = None) -> None:
    """Log in through the Prefect UI's login form (it asks for the `user:password` auth string)."""
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(up.procs["prefect"].url + "/deployments")
    page.wait_for_url("**/login**")  # unauthenticated: the UI sends us to its login page
    page.get_by_placeholder("admin:pass").fill(up.env["PREFECT_API_AUTH_STRING"])
    if screenshot:
        shot(page, screenshot)
    page.get_by_role("button", name="Login").click()
    page.wait_for_url("**/deployments")
    page.get_by_role("link", name="compress-on-demand").first.wait_for()  # logged in (the UI stored the string)
    page.reload()  # drops the error toasts of the calls the UI made before it had credentials
    page.get_by_role("link", name="compress-on-demand").first.wait_for()


@pytest.fixture(scope="module")
def prefect_page(live, browser):
    """A page logged in to the Prefect UI through its login form."""
    up, _ = live
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    prefect_login(page, up, screenshot="01-prefect-login")
    shot(page, "02-prefect-deployments")
    yield page
    page.close()


@pytest.fixture(scope="module")
def mlflow_page(live, browser):
    """A page with the MLflow UI's basic-auth credentials; its assistant side panel closed (it hides the page)."""
    up, _ = live
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, http_credentials={
        "username": up.env["MLFLOW_TRACKING_USERNAME"], "password": up.env["MLFLOW_TRACKING_PASSWORD"]})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    yield page
    context.close()


def close_mlflow_assistant(page) -> None:
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def open_custom_run(page, up) -> None:
    page.goto(up.procs["prefect"].url + "/deployments")
    page.get_by_role("link", name="compress-on-demand").first.click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    page.get_by_text("Run Name", exact=True).wait_for()


def field(page, description: str):
    """A form field's input, found by its description (inputs are not tied to their labels)."""
    return page.get_by_text(description).locator("xpath=following::textarea[1]")


def deployment_runs(up, name: str = "compress-on-demand") -> list[dict]:
    prefect = up.procs["prefect"].url + "/api"
    auth = up.env["PREFECT_API_AUTH_STRING"]
    deployment = api(prefect, f"/deployments/name/compress/{name}", auth)
    return api(prefect, "/flow_runs/filter", auth, {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}})


@pytest.fixture(scope="module")
def ui_run(live, prefect_page):
    """compress-on-demand started from the UI form with a typed run name and a changed field, waited for → the
    final flow run (API JSON) and the name typed."""
    up, serve = live
    page = prefect_page
    unique = f"ui-{uuid.uuid4().hex[:8]}"
    typed = f"{unique}-run"
    open_custom_run(page, up)
    # inputs are not tied to their labels: find each by the text around it
    page.get_by_text("Run Name", exact=True).locator("xpath=following::input[1]").fill(typed)
    name_field = field(page, "Run name: prefixes the flow-run name")
    assert name_field.input_value() == "tiny"  # the preset's default, rendered in the form
    name_field.fill(unique)
    page.get_by_text("3 search · target_params").first.wait_for()  # fields titled by pipeline stage
    shot(page, "04-prefect-custom-run-form")
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url("**tab=Runs**")  # back on the deployment's Runs tab
    shot(page, "05-prefect-submitted")

    deadline = time.monotonic() + RUN_TIMEOUT
    run = None
    while time.monotonic() < deadline:
        mine = [r for r in deployment_runs(up) if r["parameters"]["config"]["name"] == unique]
        assert len(mine) <= 1, "one Submit created more than one flow run"
        run = mine[0] if mine else None
        if run and run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        assert serve.alive(), f"minitron serve exited:\n{Path(serve.log).read_text()[-3000:]}"
        time.sleep(5)
    assert run is not None, "the form's Submit created no flow run"
    page.goto(f"{up.procs['prefect'].url}/runs/flow-run/{run['id']}")
    page.get_by_text(typed).first.wait_for()
    page.get_by_text("distill-candidate L").first.wait_for()  # task runs named by stage and candidate shape
    shot(page, "06-prefect-flow-run")
    assert run["state_type"] == "COMPLETED", (
        f"flow run {run['name']} ended {run['state_type']}:\n{Path(serve.log).read_text()[-4000:]}")
    return run, typed


def artifacts_of(up, run: dict) -> list[dict]:
    return api(up.procs["prefect"].url + "/api", "/artifacts/filter", up.env["PREFECT_API_AUTH_STRING"],
               {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})


# -- the checks ----------------------------------------------------------------------------------------------------
def test_form_refuses_a_bad_count(live, prefect_page):
    """`target_params = banana` in the form: Submit is refused with the field's name, and no flow run exists."""
    up, _ = live
    page = prefect_page
    before = len(deployment_runs(up))
    open_custom_run(page, up)
    target = field(page, "Student size: parameters")
    target.fill("banana")
    page.get_by_role("button", name="Submit").click()
    refusal = page.get_by_text("Validation failed for field 'config.target_params'")
    refusal.first.wait_for()
    refusal.first.scroll_into_view_if_needed()
    shot(page, "03-prefect-form-refuses-bad-count")
    assert "/run" in page.url and "tab=Runs" not in page.url  # still on the form
    time.sleep(2)  # a run created anyway would be listed by now
    assert len(deployment_runs(up)) == before


def test_form_run_keeps_its_name_and_finishes_its_progress(live, ui_run):
    up, _ = live
    run, typed = ui_run
    assert run["name"] == typed  # the name typed in the form, not a generated one
    assert run["parameters"]["config"]["teacher"] == "tiny-random-llama"  # the rest came from the tiny preset
    artifacts = artifacts_of(up, run)
    progress = {a["description"].split(":")[0]: a["data"] for a in artifacts if a["type"] == "progress"}
    assert {"correct-teacher", "importance", "distill", "evaluate"} <= set(progress)  # evaluation included
    assert sum(name.startswith("candidate ") for name in progress) == 8 + 4 + 2  # successive halving's rounds
    assert set(progress.values()) == {100.0}, progress  # every stage ended at 100%
    tasks = api(up.procs["prefect"].url + "/api", "/task_runs/filter", up.env["PREFECT_API_AUTH_STRING"],
                {"task_runs": {"flow_run_id": {"any_": [run["id"]]}}})
    candidates = sorted(t["name"] for t in tasks if t["name"].startswith("distill-candidate "))
    assert len(candidates) == 14 and all(re.fullmatch(
        r"distill-candidate L\d+-H\d+-F\d+-A\d+-KV\d+( drop \d+-\d+)? r[123]", name) for name in candidates), candidates


def test_link_artifact_opens_the_mlflow_run_and_back(live, prefect_page, mlflow_page, ui_run):
    """The flow run's page → its `mlflow-run` link artifact → the MLflow run page (Model-training view), whose
    description links back to the flow run; the experiment it sits in opens on the runs table."""
    up, _ = live
    run, typed = ui_run
    page = prefect_page
    page.goto(f"{up.procs['prefect'].url}/runs/flow-run/{run['id']}")
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("mlflow-run", exact=True).first.wait_for()
    shot(page, "07-prefect-run-artifacts")
    page.get_by_text("mlflow-run", exact=True).first.click()
    link = page.get_by_role("link", name=f"MLflow run: {typed}")
    link.wait_for()
    shot(page, "08-prefect-mlflow-link-artifact")
    url = link.get_attribute("href")
    assert url.startswith(up.procs["mlflow"].url + "/#/experiments/") and "workflowType=machine_learning" in url

    mlflow = mlflow_page
    mlflow.goto(url)
    back = mlflow.get_by_role("link", name=typed)  # in the description: the Prefect flow run
    back.first.wait_for()
    close_mlflow_assistant(mlflow)
    mlflow.get_by_text("Prefect flow run").first.wait_for()
    shot(mlflow, "09-mlflow-run-page")
    assert back.first.get_attribute("href").endswith(f"/flow-run/{run['id']}")
    page.goto(back.first.get_attribute("href"))  # the link works in the Prefect UI
    page.get_by_text(typed).first.wait_for()

    # the summary's experiment link opens the experiment on its runs table, not on GenAI's trace overview
    experiment_id = url.split("/#/experiments/")[1].split("/")[0]
    summary = next(a for a in artifacts_of(up, run) if a["key"] == "summary")["data"]
    experiment_url = re.search(r"in experiment \[tiny-random-llama → 60%\]\(([^)]+)\)", summary).group(1)
    assert f"/#/experiments/{experiment_id}/runs?" in experiment_url
    mlflow.goto(experiment_url)
    mlflow.get_by_role("link", name=typed).first.wait_for()  # the parent run, a row of the runs table
    mlflow.get_by_text("Run Name", exact=True).first.wait_for()  # the table's header
    assert "workflowType=machine_learning" in mlflow.url and not mlflow.get_by_text("Training runs").count()
    shot(mlflow, "10-mlflow-experiment-runs-table")
    mlflow_api = up.procs["mlflow"].url
    auth = f"{up.env['MLFLOW_TRACKING_USERNAME']}:{up.env['MLFLOW_TRACKING_PASSWORD']}"
    experiment = api(mlflow_api, f"/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}", auth)
    tags = {t["key"]: t["value"] for t in experiment["experiment"]["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_summary_explains_the_result(live, prefect_page, ui_run):
    """The summary: links to MLflow, scores to 3 significant digits, the winner marked, Kendall τ in words, evaluation
    in two narrow tables; the search's table artifact marks the winner too."""
    up, _ = live
    run, _ = ui_run
    artifacts = {a["key"]: a for a in artifacts_of(up, run) if a["key"]}
    summary = artifacts["summary"]["data"]
    assert re.search(r"\[parent run\]\(http://127\.0\.0\.1:\d+/#/experiments/\d+/runs/\w+\?workflowType=", summary)
    assert "★ winner" in summary and "(+1: the order of the round before held after more retraining, −1: it " \
        "reversed" in summary
    assert re.search(rf"Validation KL to the teacher: {SIG3} right after pruning, {SIG3} when the final distillation "
                     rf"started, {SIG3} at its end\.", summary), summary
    search = next(a for key, a in artifacts.items() if key.startswith("search-"))
    rows = json.loads(search["data"])
    assert [r["status"] for r in rows].count("★ winner") == 1
    assert all(re.fullmatch(rf"-|{SIG3}", r["val_loss after its last round"]) for r in rows)
    evaluation = json.loads(artifacts["evaluation"]["data"])
    assert set(evaluation[0]) == {"task", "metric", "better", "teacher", "pruned", "final"}  # fits the page
    assert all(len(row[m]) <= 9 for row in evaluation for m in ("teacher", "pruned", "final"))  # rounded
    page = prefect_page
    page.goto(f"{up.procs['prefect'].url}/artifacts/artifact/{artifacts['summary']['id']}")
    page.get_by_text("★ winner").first.wait_for()
    page.set_viewport_size({"width": 1400, "height": 2200})
    shot(page, "11-prefect-summary")
    page.set_viewport_size({"width": 1400, "height": 1000})


def test_nightly_schedule_names_its_timezone(live, browser):
    """compress-nightly's page says "nightly at 02:00 Europe/Berlin" in text, read in a browser in New York (where
    the upcoming run shows at 08:00 PM local time)."""
    up, _ = live
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, timezone_id=BROWSER_TIMEZONE)
    page = context.new_page()
    try:
        prefect_login(page, up)
        page.get_by_role("link", name="compress-nightly").first.click()
        page.get_by_text(f"nightly at 02:00 {TIMEZONE}").first.wait_for()
        shot(page, "12-prefect-nightly-schedule")
        page.get_by_text("Description", exact=True).first.click()
        page.get_by_text(f"Compression run nightly at 02:00 {TIMEZONE}.").first.wait_for()
    finally:
        context.close()
    deployment = api(up.procs["prefect"].url, "/api/deployments/name/compress/compress-nightly",
                     up.env["PREFECT_API_AUTH_STRING"])
    (entry,) = deployment["schedules"]
    assert (entry["schedule"]["cron"], entry["schedule"]["timezone"]) == ("0 2 * * *", TIMEZONE)
    assert deployment["parameters"]["config"]["name"] == "tiny"  # `serve --preset tiny` serves it too


def test_mlflow_compare_candidates(live, mlflow_page, ui_run, monkeypatch, tmp_path):
    up, _ = live
    run, _ = ui_run
    mlflow = up.procs["mlflow"].url
    auth = f"{up.env['MLFLOW_TRACKING_USERNAME']}:{up.env['MLFLOW_TRACKING_PASSWORD']}"
    experiments = api(mlflow, "/api/2.0/mlflow/experiments/search", auth, {"max_results": 100})["experiments"]
    ids = [e["experiment_id"] for e in experiments]
    search = "/api/2.0/mlflow/runs/search"
    parents = api(mlflow, search, auth, {"experiment_ids": ids,
                                         "filter": f"tags.`prefect.flow_run_id` = '{run['id']}'"})["runs"]
    assert len(parents) == 1, "one MLflow parent run per flow run"
    parent = parents[0]["info"]
    children = api(mlflow, search, auth, {"experiment_ids": [parent["experiment_id"]], "max_results": 1000,
                                          "filter": f"tags.mlflow.parentRunId = '{parent['run_id']}'"})["runs"]
    candidates = sorted((r for r in children if r["info"]["run_name"].startswith("candidate ")),
                        key=lambda r: r["info"]["run_name"])
    last = max(int(r["info"]["run_name"].rsplit(" r", 1)[1]) for r in candidates)  # successive halving's last round
    candidates = [r for r in candidates if r["info"]["run_name"].endswith(f" r{last}")]
    assert len(candidates) == 2  # the tiny preset halves 8 → 4 → 2

    page = mlflow_page
    runs = json.dumps([r["info"]["run_id"] for r in candidates])
    query = urllib.parse.urlencode({"runs": runs, "experiments": json.dumps([parent["experiment_id"]])})
    page.goto(f"{mlflow}/#/compare-runs?{query}")
    page.get_by_text("Comparing 2 Runs from 1 Experiment").wait_for()
    for candidate in candidates:
        page.get_by_text(candidate["info"]["run_name"]).first.wait_for()
    page.wait_for_timeout(3000)  # let the parallel-coordinates plot draw for the screenshot (no network idle here)
    shot(page, "13-mlflow-compare-candidates")

    # the plots, as the run logged them: pruned heads crossed out, layer bars on whole-number ticks
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", up.env["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", up.env["MLFLOW_TRACKING_PASSWORD"])
    client = MlflowClient(mlflow)
    importance = next(r["info"]["run_id"] for r in children if r["info"]["run_name"] == "importance")
    for run_id, path, name in ((parent["run_id"], "importance/head_importance_pruned.png", "14-head-importance-pruned"),
                               (importance, "importance/layer_importance.png", "15-layer-importance")):
        shutil.copy(client.download_artifacts(run_id, path, str(tmp_path)), ARTIFACTS / f"{name}.png")
