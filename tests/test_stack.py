"""`minitron stack`: the real services, authenticated, started once for this module on free ports (with --ray: the
Ray head too)."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time

import pytest

from infra import stack
from minitron.errors import UserError

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    state = tmp_path_factory.mktemp("stack")
    ports = {name: stack.free_port() for name in [*stack.DEFAULT_PORTS, *stack.RAY_PORTS]}
    lines: list[str] = []
    running = stack.stack_up(state, ports=ports, out=lines.append, ray=True)
    try:
        yield running, lines
    finally:
        stack.stack_down(state, out=lambda _: None)
        shutil.rmtree(stack.ray_temp_dir(state), ignore_errors=True)  # Ray's session logs, outside pytest's tmp


def test_up_prints_urls_env_and_credentials_once(up):
    running, lines = up
    text = "\n".join(lines)
    for name in ("s3", "mlflow", "prefect", "ray"):
        assert running.procs[name].url in text
    assert f"export PREFECT_API_URL={running.procs['prefect'].url}/api" in text
    assert f"export MLFLOW_TRACKING_URI={running.procs['mlflow'].url}" in text
    assert running.generated and running.env["MLFLOW_TRACKING_PASSWORD"] in text
    env_file = running.state / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert stack.read_env_file(env_file)["MLFLOW_AUTH_ADMIN_PASSWORD"] == running.env["MLFLOW_TRACKING_PASSWORD"]
    assert running.env["MLFLOW_TRACKING_PASSWORD"] not in (running.state / "client.env").read_text()
    assert f"export RAY_ADDRESS={running.procs['ray'].address}" in text and "export RAY_AUTH_MODE=token" in text
    token = stack.read_env_file(env_file)["RAY_AUTH_TOKEN"]
    assert len(token) == 64 and running.env["RAY_AUTH_TOKEN"] == token
    assert token not in text and token not in (running.state / "client.env").read_text()  # stored, never printed
    # all services bound to loopback only
    for proc in running.procs.values():
        assert proc.url.startswith("http://127.0.0.1:")


def test_status_reports_healthy(up):
    running, _ = up
    report = stack.stack_status(running.state, out=lambda _: None)
    assert {n: (r["running"], r["healthy"]) for n, r in report.items()} == {
        "s3": (True, True), "mlflow": (True, True), "prefect": (True, True), "ray": (True, True)}
    cli = subprocess.run([sys.executable, "-m", "infra.stack", "status", "--state", str(running.state)],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(stack.__file__)))
    assert cli.returncode == 0 and cli.stdout.count("healthy") == 4
    # the head: its address, and what the state API (behind the token) says about the cluster
    assert report["ray"]["address"] == running.procs["ray"].address
    cpus = re.fullmatch(r"1 node alive: (\d+) CPU, 0 GPU", report["ray"]["nodes"])
    assert cpus and int(cpus[1]) >= 1, report["ray"]
    assert f"head {running.procs['ray'].address}  {report['ray']['nodes']}" in cli.stdout


def test_second_up_refused(up):
    running, _ = up
    with pytest.raises(UserError, match="already running"):
        stack.stack_up(running.state, out=lambda _: None)


def test_up_restarts_only_the_dead_service(up):
    """The S3 endpoint dies (moto: it comes back empty): `up` starts it again on its port, with its buckets, and
    leaves the other services running as they were."""
    running, _ = up
    alive = {n: running.procs[n].pid for n in ("mlflow", "prefect", "ray")}
    s3 = running.procs["s3"]
    os.killpg(os.getpgid(s3.pid), 9)
    s3.popen.wait(timeout=10)
    lines: list[str] = []
    again = stack.stack_up(running.state, out=lines.append)
    running.procs.update(again.procs)  # later tests stop the new process
    assert "restarted: s3 (still running: mlflow, prefect, ray)" in lines
    assert {n: again.procs[n].pid for n in alive} == alive
    assert again.procs["s3"].url == s3.url and again.procs["s3"].pid != s3.pid
    assert again.env == running.env and not again.generated
    assert stack.http_status(again.procs["s3"].health) == 200


def test_a_dead_holders_lease_returns_within_a_minute(up, tmp_path):
    """Against a real Prefect server the slot is also a 60 s lease: a SIGKILLed holder stops renewing it and the
    server takes the slot back about a minute later (the local device lock is free at once)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from tasks import slots
    from tasks.common import ensure_slot

    running, _ = up
    env = {"PREFECT_API_URL": f"{running.procs['prefect'].url}/api",
           "PREFECT_API_AUTH_STRING": running.env["PREFECT_API_AUTH_STRING"]}
    settings = {PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"]}
    name = "cpu:lease-test"
    code = f"""
import time
from tasks.common import RunContext, hold_devices
ctx = RunContext(parent_run_id="", tracking_uri="", store_uri="", run_key="", work_dir="", slot={name!r},
                 slot_timeout_s=60, stage_timeout_s=None, refresh=False, slot_dir={str(tmp_path)!r}, leases=True,
                 run_name="doomed")
with hold_devices(ctx, "distill"):
    print("held", flush=True)
    time.sleep(600)
"""
    with temporary_settings(settings):
        ensure_slot(name, ())

        def active() -> int:
            with get_client(sync_client=True) as client:
                return client.read_global_concurrency_limit_by_name(name).active_slots

        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(stack.__file__)))
        try:
            assert proc.stdout.readline().strip() == "held"
            assert active() == 1
            proc.kill()
            proc.wait()
            killed = time.monotonic()
            with slots.Slots(tmp_path).hold(1, {"run": "next", "stage": "x"}, timeout_s=2):
                pass  # the machine's lock: free at once
            while active() and time.monotonic() - killed < 120:
                time.sleep(1)
            assert active() == 0 and time.monotonic() - killed < 80
        finally:
            proc.kill()


def test_buckets_created(up, monkeypatch):
    running, _ = up
    from tasks.storage import check_store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", running.env["AWS_ACCESS_KEY_ID"])
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(UserError, match="incomplete"):
        check_store(f"s3://{stack.CHECKPOINT_BUCKET}/x", endpoint_url=running.procs["s3"].url)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", running.env["AWS_SECRET_ACCESS_KEY"])
    for bucket in (stack.ARTIFACT_BUCKET, stack.CHECKPOINT_BUCKET):
        check_store(f"s3://{bucket}/x", endpoint_url=running.procs["s3"].url)


def test_mlflow_auth(up):
    running, _ = up
    api = f"{running.procs['mlflow'].url}/api/2.0/mlflow/experiments/search?max_results=1"
    user, password = running.env["MLFLOW_TRACKING_USERNAME"], running.env["MLFLOW_TRACKING_PASSWORD"]
    assert stack.http_status(api) == 401
    assert stack.http_status(api, stack.basic_auth_header(f"{user}:wrong-password-123")) == 401
    assert stack.http_status(api, stack.basic_auth_header(f"{user}:{password}")) == 200
    assert stack.http_status(f"{running.procs['mlflow'].url}/") == 401  # the UI too


def test_mlflow_client_logs_through_auth(up, monkeypatch):
    from tasks import tracking

    running, _ = up
    uri = running.procs["mlflow"].url
    with pytest.raises(UserError, match="refused the credentials"):
        tracking.check_tracking(uri)
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, running.env[key])
    tracking.check_tracking(uri)
    with tracking.parent_run("stack", "auth", params={"a": 1}, tracking_uri=uri) as run:
        run.log_dict({"password": running.env["MLFLOW_TRACKING_PASSWORD"]}, "config.json")
    dump = tracking.dump_run(run.run_id, tracking_uri=uri)
    assert "config.json" in dump and running.env["MLFLOW_TRACKING_PASSWORD"] not in dump


def test_prefect_auth_and_flow_run(up):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    running, _ = up
    api = f"{running.procs['prefect'].url}/api"
    assert stack.http_status(f"{api}/health") == 200  # probes stay open
    assert stack.http_status(f"{api}/admin/version") == 401
    assert stack.http_status(f"{api}/admin/version", stack.basic_auth_header("admin:wrong")) == 401
    assert stack.http_status(f"{api}/admin/version",
                             stack.basic_auth_header(running.env["PREFECT_API_AUTH_STRING"])) == 200

    @flow(name="stack-smoke")
    def smoke(x: int) -> int:
        return x + 1

    with temporary_settings({PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: running.env["PREFECT_API_AUTH_STRING"]}):
        assert smoke(41) == 42
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs()
    assert [(r.name != "", r.state.type.value) for r in runs] == [(True, "COMPLETED")]


def test_ray_jobs_api_needs_the_token(up):
    """The dashboard's jobs API runs code for whoever reaches it: no token 401, a wrong one 403, the stack's token
    submits a job that runs to the end."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    running, _ = up
    head, token = running.procs["ray"], running.env["RAY_AUTH_TOKEN"]
    assert head.url.startswith("http://127.0.0.1:")
    submit = json.dumps({"entrypoint": "echo pwned"}).encode()
    for headers, code in (({}, 401), (stack.bearer_header("0" * 64), 403)):
        assert stack.http_status(f"{head.url}/api/jobs/", headers) == code
        assert stack.http_status(f"{head.url}/api/jobs/", {**headers, "Content-Type": "application/json"},
                                 method="POST", data=submit) == code
    assert stack.http_status(f"{head.url}/api/v0/nodes") == 401  # the state API too
    client = JobSubmissionClient(head.url, headers=stack.bearer_header(token))
    job = client.submit_job(entrypoint=f"{sys.executable} -c \"print(6 * 7)\"")
    deadline = time.monotonic() + 120
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status == JobStatus.SUCCEEDED and client.get_job_logs(job).strip().endswith("42")
    assert [j.entrypoint for j in client.list_jobs()] == [f"{sys.executable} -c \"print(6 * 7)\""]  # nothing else ran


def test_down_leaves_no_process(up):
    """Runs last: down stops every process of every group (and session: Ray's workers take groups of their own),
    frees the ports; credentials stay for the next up."""
    running, _ = up
    groups = {os.getpgid(proc.pid) for proc in running.procs.values()}
    ports = [int(proc.url.rsplit(":", 1)[1]) for proc in running.procs.values()]
    ports.append(int(running.procs["ray"].address.rsplit(":", 1)[1]))
    assert stack.stack_down(running.state, out=lambda _: None) == ["ray", "prefect", "mlflow", "s3"]
    table = subprocess.run(["ps", "-eo", "pid=,pgid=,sid=,stat="], capture_output=True, text=True).stdout.splitlines()
    assert not [row for row in table if (int(row.split()[1]) in groups or int(row.split()[2]) in groups)
                and not row.split()[3].startswith("Z")]
    assert all(stack._port_free("127.0.0.1", port) for port in ports)
    assert not list((running.state / "pids").glob("*.json"))
    assert stack.stack_status(running.state, out=lambda _: None) == {}
    assert stack.stack_down(running.state, out=lambda _: None) == []
    creds, generated = stack.load_credentials(running.state)  # the next up reuses them and prints none
    assert not generated and creds["MLFLOW_AUTH_ADMIN_PASSWORD"] == running.env["MLFLOW_TRACKING_PASSWORD"]


def test_one_home_folder_for_the_run_state_and_the_stack(monkeypatch, tmp_path):
    """MINITRON_HOME was read twice with different defaults: the stack took the folder itself, the embedded run
    state `.minitron`. Now both hang under the one home folder, the stack's state in its `stack/`."""
    from flows.environment import state_dir

    monkeypatch.setenv("MINITRON_HOME", str(tmp_path))
    assert (state_dir(), stack.state_dir()) == (tmp_path, tmp_path / "stack")
    assert stack.state_dir(tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.delenv("MINITRON_HOME")
    monkeypatch.chdir(tmp_path)
    assert (state_dir(), stack.state_dir()) == (tmp_path / ".minitron", tmp_path / ".minitron" / "stack")
