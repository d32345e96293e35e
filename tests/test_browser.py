"""The operations path in a real browser: headless Chromium against the authenticated local stack.

One module-scoped stack (`stack_up`: moto S3, mlflow server with basic auth, prefect server with basic auth) and one
`minitron serve --preset tiny` serve the two deployments. Then, as a user would:
  1. log in to the Prefect UI (its login page asks for the `user:password` auth string), open compress-on-demand,
     Run → Custom run, change fields in the parameter form, Submit; the served deployment runs it to Completed;
  2. see compress-nightly's schedule, 02:00 in its explicit timezone (the UI's tooltip names it);
  3. log in to the MLflow UI (HTTP basic auth) and open the compare view of the search's candidate child runs.
Screenshots of every step go to test-artifacts/browser/ (git-ignored; CI keeps them).

Chromium is Debian's (`make tools` installs it); Playwright drives it through `executable_path`, never downloads one.
"""

from __future__ import annotations

import json
import os
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
RUN_TIMEOUT = 480.0  # seconds for the tiny flow through the stack on a busy 2-core machine (usually 2-4 minutes)
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
            popen = subprocess.Popen([sys.executable, "-m", "minitron.cli", "serve", "--preset", "tiny",
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


@pytest.fixture(scope="module")
def prefect_page(live, browser):
    """A page logged in to the Prefect UI through its login form."""
    up, _ = live
    base = up.procs["prefect"].url
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(base + "/deployments")
    page.wait_for_url("**/login**")  # unauthenticated: the UI sends us to its login page
    page.get_by_placeholder("admin:pass").fill(up.env["PREFECT_API_AUTH_STRING"])
    shot(page, "01-prefect-login")
    page.get_by_role("button", name="Login").click()
    page.wait_for_url("**/deployments")
    page.get_by_role("link", name="compress-on-demand").first.wait_for()
    shot(page, "02-prefect-deployments")
    yield page
    page.close()


@pytest.fixture(scope="module")
def ui_run(live, prefect_page):
    """compress-on-demand started from the UI form with a changed name, waited for → the final flow run (API JSON)."""
    up, serve = live
    page = prefect_page
    prefect = up.procs["prefect"].url + "/api"
    auth = up.env["PREFECT_API_AUTH_STRING"]
    unique = f"ui-{uuid.uuid4().hex[:8]}"
    page.get_by_role("link", name="compress-on-demand").first.click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    # inputs are not tied to their labels: find each by the text around it
    page.get_by_text("Run Name", exact=True).locator("xpath=following::input[1]").fill(f"{unique}-run")
    name_field = page.get_by_text("Run name: prefixes the flow-run name").locator("xpath=following::textarea[1]")
    assert name_field.input_value() == "tiny"  # the preset's default, rendered in the form
    name_field.fill(unique)
    shot(page, "03-prefect-custom-run-form")
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url("**tab=Runs**")  # back on the deployment's Runs tab
    shot(page, "04-prefect-submitted")

    deployment = api(prefect, "/deployments/name/compress/compress-on-demand", auth)
    deadline = time.monotonic() + RUN_TIMEOUT
    run = None
    while time.monotonic() < deadline:
        runs = api(prefect, "/flow_runs/filter", auth, {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}})
        mine = [r for r in runs if r["parameters"]["config"]["name"] == unique]
        assert len(mine) <= 1, "one Submit created more than one flow run"
        run = mine[0] if mine else None
        if run and run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        assert serve.alive(), f"minitron serve exited:\n{Path(serve.log).read_text()[-3000:]}"
        time.sleep(5)
    assert run is not None, "the form's Submit created no flow run"
    page.goto(f"{up.procs['prefect'].url}/runs/flow-run/{run['id']}")
    page.get_by_text(unique).first.wait_for()
    shot(page, "05-prefect-flow-run")
    assert run["state_type"] == "COMPLETED", (
        f"flow run {run['name']} ended {run['state_type']}:\n{Path(serve.log).read_text()[-4000:]}")
    return run


# -- the checks ----------------------------------------------------------------------------------------------------
def test_form_run_completes(ui_run):
    assert ui_run["name"].startswith(ui_run["parameters"]["config"]["name"] + ": ")  # renamed by run_name()
    assert ui_run["parameters"]["config"]["teacher"] == "tiny-random-llama"  # the rest came from the tiny preset


def test_nightly_schedule_shown_with_timezone(live, prefect_page):
    up, _ = live
    page = prefect_page
    page.goto(up.procs["prefect"].url + "/deployments")
    page.get_by_role("link", name="compress-nightly").first.click()
    page.get_by_text("At 02:00 AM every day").first.wait_for()
    shot(page, "06-prefect-nightly-schedule")
    # the page shows the cron in words; the timezone it runs in is the deployment's, read back from the same API
    prefect = up.procs["prefect"].url
    auth = up.env["PREFECT_API_AUTH_STRING"]
    deployment = api(prefect, "/api/deployments/name/compress/compress-nightly", auth)
    (entry,) = deployment["schedules"]
    assert (entry["schedule"]["cron"], entry["schedule"]["timezone"]) == ("0 2 * * *", TIMEZONE)


def test_mlflow_compare_candidates(live, browser, ui_run):
    up, _ = live
    mlflow = up.procs["mlflow"].url
    user, password = up.env["MLFLOW_TRACKING_USERNAME"], up.env["MLFLOW_TRACKING_PASSWORD"]
    auth = f"{user}:{password}"
    experiments = api(mlflow, "/api/2.0/mlflow/experiments/search", auth, {"max_results": 100})["experiments"]
    ids = [e["experiment_id"] for e in experiments]
    search = "/api/2.0/mlflow/runs/search"
    parents = api(mlflow, search, auth, {"experiment_ids": ids,
                                         "filter": f"tags.`prefect.flow_run_id` = '{ui_run['id']}'"})["runs"]
    assert len(parents) == 1, "one MLflow parent run per flow run"
    parent = parents[0]["info"]
    children = api(mlflow, search, auth, {"experiment_ids": [parent["experiment_id"]], "max_results": 1000,
                                          "filter": f"tags.mlflow.parentRunId = '{parent['run_id']}'"})["runs"]
    candidates = sorted((r for r in children if r["info"]["run_name"].startswith("candidate ")),
                        key=lambda r: r["info"]["run_name"])
    last = max(int(r["info"]["run_name"].rsplit(" r", 1)[1]) for r in candidates)  # successive halving's last round
    candidates = [r for r in candidates if r["info"]["run_name"].endswith(f" r{last}")]
    assert len(candidates) == 2  # the tiny preset halves 8 → 4 → 2

    context = browser.new_context(viewport={"width": 1400, "height": 1000},
                                  http_credentials={"username": user, "password": password})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    try:
        page.goto(f"{mlflow}/#/experiments/{parent['experiment_id']}?workflowType=machine_learning")
        page.get_by_text(parent["run_name"]).first.wait_for()  # never wait for network idle: MLflow polls forever
        shot(page, "07-mlflow-experiment")
        runs = json.dumps([r["info"]["run_id"] for r in candidates])
        query = urllib.parse.urlencode({"runs": runs, "experiments": json.dumps([parent["experiment_id"]])})
        page.goto(f"{mlflow}/#/compare-runs?{query}")
        page.get_by_text("Comparing 2 Runs from 1 Experiment").wait_for()
        for run in candidates:
            page.get_by_text(run["info"]["run_name"]).first.wait_for()
        page.wait_for_timeout(3000)  # let the parallel-coordinates plot draw for the screenshot (no network idle here)
        shot(page, "08-mlflow-compare-candidates")
    finally:
        context.close()
