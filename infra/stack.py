"""`minitron stack up|down|status`: the local service stack on one machine, no containers.

  s3       moto server: an in-memory S3 endpoint (data does NOT survive `stack down`; compose has a real store)
  mlflow   `mlflow server`, SQLite backend, artifacts proxied to s3://minitron-artifacts/mlflow, basic-auth app
  prefect  `prefect server start`, SQLite under PREFECT_HOME, basic auth
  ray      with --ray: `ray start --head`, token authentication on, dashboard + jobs API on the stack's host

Everything lives under one state folder (default `stack/` in the home folder, `minitron_home()`): logs, PID files,
PREFECT_HOME, the MLflow and auth databases, and `.env` with the credentials (generated on the first `up`, printed
once, mode 0600; variables already in the environment win). The names of buckets, ports and environment variables
are the ones docker-compose.yml uses, so a client configured for one works against the other.

Services run in their own process group and are stopped by PID: SIGINT (SIGTERM for Ray), a grace period, then
SIGKILL of the group.
"""

import argparse
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path

from minitron.errors import UserError

ARTIFACT_BUCKET = "minitron-artifacts"  # MLflow artifacts (plots, tables, configs): --artifacts-destination
CHECKPOINT_BUCKET = "minitron-checkpoints"  # model checkpoints written by tasks/storage.py
CHECKPOINT_STORE = f"s3://{CHECKPOINT_BUCKET}/runs"
DEFAULT_PORTS = {"s3": 9000, "mlflow": 5000, "prefect": 4200}  # same as docker-compose.yml
RAY_PORTS = {"ray": 6379, "ray-dashboard": 8265}  # GCS (nodes and drivers join it), dashboard + jobs API; as compose
START_TIMEOUT = 120.0  # seconds a service may take to pass its health check (Prefect migrates its DB on first run)
STOP_GRACE = 15.0  # seconds between SIGINT and SIGKILL
# Services stopped otherwise: Ray's processes exit on SIGTERM (what `ray stop` sends); `ray start --block` and the
# GCS linger for half a minute after it, and a head has nothing to save (cluster state lives in memory).
STOP_SIGNAL = {"ray": (signal.SIGTERM, 5.0)}

# Credentials: name → how to generate a default. Clients and servers read the same variable names in compose.
SECRET_NAMES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING",
    "POSTGRES_PASSWORD",
    "RAY_AUTH_TOKEN",
)


def minitron_home() -> Path:
    """The one home folder of everything minitron keeps on this machine: $MINITRON_HOME, or `.minitron` in the
    working directory (the embedded run state in flows/environment.py, the stack's state in `stack/`)."""
    return Path(os.environ.get("MINITRON_HOME") or ".minitron").resolve()


def state_dir(path: str | Path | None = None) -> Path:
    return Path(path).resolve() if path else minitron_home() / "stack"


# -- credentials ---------------------------------------------------------------------------------------------------
def _generate_credentials() -> dict[str, str]:
    mlflow_pw, prefect_pw = secrets.token_urlsafe(18), secrets.token_urlsafe(18)  # 24 chars ≥ MLflow's minimum 12
    return {
        "AWS_ACCESS_KEY_ID": "minitron" + secrets.token_hex(4),
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": mlflow_pw,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": mlflow_pw,
        "PREFECT_SERVER_API_AUTH_STRING": f"admin:{prefect_pw}",
        "PREFECT_API_AUTH_STRING": f"admin:{prefect_pw}",
        "POSTGRES_PASSWORD": secrets.token_urlsafe(18),  # only docker-compose uses it; kept so one .env serves both
        "RAY_AUTH_TOKEN": secrets.token_hex(32),  # 256 bits, the form `ray get-auth-token --generate` writes
    }


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value.strip().strip("'\"")
    return values


def load_credentials(state: Path, *, create: bool = True) -> tuple[dict[str, str], bool]:
    """Credentials from the environment, else `<state>/.env`, else generated into it (0600). → (values, generated)."""
    path = state / ".env"
    stored = read_env_file(path)
    generated = False
    missing = [k for k in SECRET_NAMES if k not in stored]
    if missing and create:
        fresh = _generate_credentials()
        stored.update({k: fresh[k] for k in missing})
        state.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# minitron stack credentials (generated; keep private). Also usable as docker compose --env-file.\n")
            f.writelines(f"{k}={stored[k]}\n" for k in SECRET_NAMES)
        os.chmod(path, 0o600)
        generated = True
    return {k: os.environ.get(k) or stored.get(k, "") for k in SECRET_NAMES}, generated


# -- processes -------------------------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _start_time(pid: int) -> str | None:
    """Kernel start time of a process: guards against signalling a recycled PID."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass
class Proc:
    """A started service: its PID record lives in <state>/pids/<name>.json."""

    name: str
    pid: int
    url: str  # what users open / clients point at
    health: str  # URL that answers 200 when the service is ready
    start: str | None = None
    log: str = ""
    popen: subprocess.Popen | None = field(default=None, repr=False, compare=False)
    address: str = ""  # a non-HTTP endpoint clients join (the Ray head's GCS host:port)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        try:  # reap it if it is our own exited child (a zombie still answers kill(pid, 0))
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                return False
        except ChildProcessError:
            pass
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return self.start is None or _start_time(self.pid) in (None, self.start)

    def record(self) -> dict:
        return {"name": self.name, "pid": self.pid, "url": self.url, "health": self.health, "start": self.start,
                "log": self.log, "address": self.address}


def spawn(name: str, cmd: list[str], env: dict[str, str], state: Path, url: str, health: str) -> Proc:
    """Start cmd in its own process group (so a stop reaches its workers), logging to <state>/logs/<name>.log."""
    (state / "logs").mkdir(parents=True, exist_ok=True)
    log_path = state / "logs" / f"{name}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(cmd, env=env, cwd=state, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    return Proc(name, popen.pid, url, health, _start_time(popen.pid), str(log_path), popen)


def _tail(path: str, n: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def http_status(url: str, headers: dict | None = None, timeout: float = 3.0, method: str = "GET",
                data: bytes | None = None) -> int | None:
    """HTTP status of a request, or None when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {}, method=method, data=data)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def wait_healthy(procs: list[Proc], timeout: float = START_TIMEOUT) -> None:
    """Wait until every service answers 200 on its health URL; a dead process fails at once, with its log."""
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while pending:
        for proc in list(pending):
            if not proc.alive():
                raise UserError(f"{proc.name} exited during start-up; its log ({proc.log}) ends with:\n{_tail(proc.log)}")
            if http_status(proc.health, timeout=2) == 200:
                pending.remove(proc)
        if pending and time.monotonic() > deadline:
            names = ", ".join(p.name for p in pending)
            raise UserError(f"{names} not healthy after {timeout:.0f}s; see {pending[0].log}:\n{_tail(pending[0].log)}")
        if pending:
            time.sleep(0.5)


def stop(proc: Proc, grace: float = STOP_GRACE) -> None:
    """SIGINT to the process group (uvicorn and `serve` shut down cleanly on it), then SIGKILL after grace."""
    if not proc.alive():
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    sig, grace = STOP_SIGNAL.get(proc.name, (signal.SIGINT, grace))
    os.killpg(pgid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.popen is not None:
            proc.popen.poll()
        if not proc.alive():
            break
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)  # stragglers in the group (workers) even when the leader exited
    except ProcessLookupError:
        pass
    if pgid == proc.pid:  # spawn() made it a session leader: what left the group (Ray's workers) is still in it
        _kill_session(proc.pid)
    if proc.popen is not None:
        proc.popen.wait(timeout=5)


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (Ray's workers each take a process group of their own)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, fields = int(stat.parent.name), stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue


# -- the three services ------------------------------------------------------------------------------------------
def _base_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env.update(extra)
    return env


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def start_s3(state: Path, host: str, port: int) -> Proc:
    url = f"http://{_client_host(host)}:{port}"
    cmd = [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]
    return spawn("s3", cmd, _base_env({}), state, url, f"{url}/moto-api/")


def create_buckets(endpoint: str, creds: dict[str, str], buckets=(ARTIFACT_BUCKET, CHECKPOINT_BUCKET)) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=creds["AWS_ACCESS_KEY_ID"], aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
                          config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                                        response_checksum_validation="when_required"))
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in buckets:
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)


def start_mlflow(state: Path, host: str, port: int, s3_url: str, creds: dict[str, str], *, auth: bool = True) -> Proc:
    folder = state / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    env = {
        "MLFLOW_S3_ENDPOINT_URL": s3_url,
        "AWS_ACCESS_KEY_ID": creds["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": creds["AWS_SECRET_ACCESS_KEY"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no background job runner: one worker, no huey processes
    }
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", f"s3://{ARTIFACT_BUCKET}/mlflow"]
    if auth:
        ini = folder / "basic_auth.ini"
        # The default ini keeps its user DB in the cwd; ours lives in the state folder. Authenticated users can read
        # everything; writes need the admin (or an explicitly granted user). No password here: it comes from env.
        ini.write_text("[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env.update({
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_AUTH_ADMIN_USERNAME": creds["MLFLOW_AUTH_ADMIN_USERNAME"],
            "MLFLOW_AUTH_ADMIN_PASSWORD": creds["MLFLOW_AUTH_ADMIN_PASSWORD"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": creds["MLFLOW_FLASK_SERVER_SECRET_KEY"],
        })
        cmd += ["--app-name", "basic-auth"]
    if host not in ("127.0.0.1", "localhost"):  # MLflow only trusts localhost + private IPs in Host headers by default
        cmd += ["--allowed-hosts", f"{host},{host}:{port},localhost,localhost:{port},127.0.0.1,127.0.0.1:{port}"]
    url = f"http://{_client_host(host)}:{port}"
    return spawn("mlflow", cmd, _base_env(env), state, url, f"{url}/health")


def start_prefect(state: Path, host: str, port: int, creds: dict[str, str]) -> Proc:
    env = {
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_SERVER_API_AUTH_STRING": creds["PREFECT_SERVER_API_AUTH_STRING"],
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"http://{_client_host(host)}:{port}/api",
        **LEASE_ENV,
    }
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    url = f"http://{_client_host(host)}:{port}"
    return spawn("prefect", cmd, _base_env(env), state, url, f"{url}/api/health")


# Concurrency leases (the compute slot, tasks/common.py): kept on disk so a server restart does not forget who holds
# a slot, expired ones reclaimed every 5 s, and a waiting client asks again within 5 s, so the slot of a run that
# died comes back about a minute after its last renewal (the lease is 60 s, Prefect's minimum).
LEASE_ENV = {
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5",
    "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "5",
}


# -- the Ray head (--ray) ------------------------------------------------------------------------------------------
# Token authentication (Ray >= 2.52): with RAY_AUTH_MODE=token every gRPC call between Ray processes and every
# dashboard / jobs API request must carry the cluster's token. Ray reads it from RAY_AUTH_TOKEN, else the file named
# by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; we pass RAY_AUTH_TOKEN from the stack's 0600 .env and never write
# ~/.ray. HTTP clients send it as `Authorization: Bearer <token>`; without it the dashboard answers 401, with a
# wrong one 403. Ray's own gRPC ports (GCS, raylet, object manager) listen on every interface by Ray's design (it
# rewrites 127.0.0.1 to the node's IP so other nodes can join): the token is what guards them. The dashboard and
# jobs API, which run code for whoever reaches them, bind to the stack's host (127.0.0.1 by default).
RAY_AUTH = {"RAY_AUTH_MODE": "token"}  # plus RAY_AUTH_TOKEN (a secret)
RAY_ENV_DROP = ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS")  # a head joins nothing


def ray_temp_dir(state: Path) -> Path:
    """Ray's session folder (sockets, logs) for a state folder: short, under /tmp, because Ray's unix sockets live
    inside it and a socket path must stay under 108 bytes, which a state folder deep in a home or pytest path
    exceeds."""
    return Path(tempfile.gettempdir()) / f"minitron-ray-{hashlib.sha256(str(state).encode()).hexdigest()[:10]}"


def start_ray(state: Path, host: str, port: int, dashboard_port: int, token: str, *, num_cpus: int | None = None,
              num_gpus: int | None = None, object_store_bytes: int | None = None) -> Proc:
    """`ray start --head --block` in its own process group: the GCS on `port` (what nodes and drivers join), the
    dashboard and jobs API on host:dashboard_port, token authentication on. CPUs and GPUs default to what Ray
    detects on this machine; the object store to Ray's default (checkpoints never travel through it)."""
    env = {k: v for k, v in _base_env({**RAY_AUTH, "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}).items()
           if k not in RAY_ENV_DROP}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats",
           "--port", str(port), "--dashboard-host", host, "--dashboard-port", str(dashboard_port),
           "--temp-dir", str(ray_temp_dir(state)),
           # ports Ray would otherwise take at fixed defaults (10001, 52365): free ones, so two heads can coexist
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())]
    for flag, value in (("--num-cpus", num_cpus), ("--num-gpus", num_gpus), ("--object-store-memory", object_store_bytes)):
        if value is not None:
            cmd += [flag, str(value)]
    url = f"http://{_client_host(host)}:{dashboard_port}"
    proc = spawn("ray", cmd, env, state, url, f"{url}/api/gcs_healthz")  # the health probe is open, like Prefect's
    proc.address = f"127.0.0.1:{port}"
    return proc


def ray_client_env(proc: Proc, token: str | None = None) -> dict[str, str]:
    """What a driver (`minitron run` with backend: ray, `ray job submit`) exports to use the head; the token only
    when given."""
    env = {"RAY_ADDRESS": proc.address, "RAY_API_SERVER_ADDRESS": proc.url, **RAY_AUTH}
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return env


def bearer_header(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ray_summary(proc: Proc, token: str) -> str:
    """'2 nodes alive: 16 CPU, 8 GPU' from the head's state API (which needs the token), or why not."""
    request = urllib.request.Request(f"{proc.url}/api/v0/nodes", headers=bearer_header(token))
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            nodes = json.loads(response.read())["data"]["result"]["result"]
    except urllib.error.HTTPError as e:
        return f"the head refused the token in .env (HTTP {e.code})"
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return "node list unavailable"
    alive = [n for n in nodes if n.get("state") == "ALIVE"]
    total = {k: sum(n.get("resources_total", {}).get(k, 0) for n in alive) for k in ("CPU", "GPU")}
    return f"{len(alive)} node{'s' * (len(alive) != 1)} alive: {total['CPU']:g} CPU, {total['GPU']:g} GPU"


# -- up / down / status --------------------------------------------------------------------------------------------
ORDER = ("s3", "mlflow", "prefect", "ray")  # start order (ray only with --ray); stop goes in reverse


def _pid_dir(state: Path) -> Path:
    return state / "pids"


def _load_procs(state: Path) -> dict[str, Proc]:
    procs = {}
    for name in ORDER:
        path = _pid_dir(state) / f"{name}.json"
        if path.is_file():
            rec = json.loads(path.read_text())
            procs[name] = Proc(rec["name"], rec["pid"], rec["url"], rec["health"], rec.get("start"), rec.get("log", ""),
                               address=rec.get("address", ""))
    return procs


def _save(state: Path, proc: Proc) -> None:
    _pid_dir(state).mkdir(parents=True, exist_ok=True)
    (_pid_dir(state) / f"{proc.name}.json").write_text(json.dumps(proc.record()))


def client_env(urls: dict[str, str], creds: dict[str, str] | None = None) -> dict[str, str]:
    """What clients (flows, workers, `minitron run`) export to use the stack; secrets only when creds is given."""
    env = {
        "MLFLOW_TRACKING_URI": urls["mlflow"],
        "PREFECT_API_URL": f"{urls['prefect']}/api",
        "AWS_ENDPOINT_URL_S3": urls["s3"],
        "MLFLOW_S3_ENDPOINT_URL": urls["s3"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "MINITRON_CHECKPOINT_STORE": CHECKPOINT_STORE,
    }
    if creds:
        env.update({k: creds[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME",
                                         "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")})
    return env


@dataclass
class Stack:
    state: Path
    procs: dict[str, Proc]
    env: dict[str, str]  # the full client environment, credentials included
    generated: bool  # credentials were generated by this call


def stack_up(state: str | Path | None = None, *, host: str = "127.0.0.1", ports: dict[str, int] | None = None,
             timeout: float = START_TIMEOUT, out=print, ray: bool = False) -> Stack:
    """Start s3 → buckets → mlflow + prefect (+ the Ray head with `ray`) in parallel, wait for health; on any
    failure stop what started. When some services of the stack in `state` still run, only the dead ones are started
    again, on their recorded ports (so clients keep their environment); the S3 endpoint comes back empty (moto),
    with its buckets."""
    state = state_dir(state)
    state.mkdir(parents=True, exist_ok=True)
    recorded = _load_procs(state)
    running = {n: p for n, p in recorded.items() if p.alive()}
    ray = ray or "ray" in recorded
    wanted = [n for n in ORDER if n != "ray" or ray]
    if running and all(n in running for n in wanted):
        raise UserError(f"the stack in {state} is already running ({', '.join(running)}): `minitron stack down` first")
    ports = {**DEFAULT_PORTS, **(RAY_PORTS if ray else {}), **(ports or {})}
    if running:  # a partial stack: restart the dead services where they were
        for name, proc in recorded.items():
            ports["ray-dashboard" if name == "ray" else name] = int(proc.url.rsplit(":", 1)[1])
            if proc.address:
                ports["ray"] = int(proc.address.rsplit(":", 1)[1])
    for name in [*DEFAULT_PORTS, *(RAY_PORTS if ray else ())]:
        if ("ray" if name.startswith("ray") else name) not in running and not _port_free(host, ports[name]):
            raise UserError(f"port {ports[name]} on {host} ({name}) is in use: stop what holds it or pick another port")
    creds, generated = load_credentials(state)
    if generated:  # shown now, whatever happens next: this is the only time they are printed
        out(f"generated credentials (shown once; stored in {state / '.env'}, mode 0600):")
        out(f"  MLflow  user {creds['MLFLOW_AUTH_ADMIN_USERNAME']}  password {creds['MLFLOW_AUTH_ADMIN_PASSWORD']}")
        user, _, password = creds["PREFECT_SERVER_API_AUTH_STRING"].partition(":")
        out(f"  Prefect user {user}  password {password}")
    started: list[Proc] = []
    try:
        s3 = running.get("s3")
        if s3 is None:
            s3 = start_s3(state, host, ports["s3"])
            started.append(s3)
            _save(state, s3)
            wait_healthy([s3], timeout)
            create_buckets(s3.url, creds)
        later = []
        if "mlflow" not in running:
            later.append(start_mlflow(state, host, ports["mlflow"], s3.url, creds))
        if "prefect" not in running:
            later.append(start_prefect(state, host, ports["prefect"], creds))
        if ray and "ray" not in running:
            later.append(start_ray(state, host, ports["ray"], ports["ray-dashboard"], creds["RAY_AUTH_TOKEN"]))
        for proc in later:
            started.append(proc)
            _save(state, proc)
        wait_healthy(later, timeout)
    except BaseException:
        for proc in reversed(started):
            stop(proc)
            (_pid_dir(state) / f"{proc.name}.json").unlink(missing_ok=True)
        raise
    procs = {**running, **{p.name: p for p in started}}
    procs = {n: procs[n] for n in ORDER if n in procs}
    urls = {n: p.url for n, p in procs.items()}
    urls.pop("ray", None)
    env = client_env(urls, creds)
    public = client_env(urls)
    if ray:
        env.update(ray_client_env(procs["ray"], creds["RAY_AUTH_TOKEN"]))
        public.update(ray_client_env(procs["ray"]))
    (state / "client.env").write_text("".join(f"export {k}={v}\n" for k, v in public.items()))
    if running:
        out(f"restarted: {', '.join(p.name for p in started)} (still running: {', '.join(running)})")
    out(f"stack up in {state}")
    for name, proc in procs.items():
        out(f"  {name:8s} {proc.url}  (pid {proc.pid}, log {proc.log})")
        if proc.address:
            out(f"  {'':8s} head {proc.address}  (nodes join: RAY_AUTH_MODE=token RAY_AUTH_TOKEN=... ray start "
                f"--address <this host's IP>:{proc.address.rsplit(':', 1)[1]})")
    out("environment for clients:")
    for key, value in public.items():
        out(f"  export {key}={value}")
    out(f"  set -a; . {state / '.env'}; set +a   # credentials")
    return Stack(state, procs, env, generated)


def stack_down(state: str | Path | None = None, *, out=print) -> list[str]:
    """Stop every recorded service, newest first. Returns the names that were running."""
    state = state_dir(state)
    stopped = []
    procs = _load_procs(state)
    for name in reversed(ORDER):
        proc = procs.get(name)
        if proc is None:
            continue
        if proc.alive():
            stop(proc)
            stopped.append(name)
        (_pid_dir(state) / f"{name}.json").unlink()
    out(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    return stopped


def stack_status(state: str | Path | None = None, *, out=print) -> dict[str, dict]:
    """name → {running, healthy, url, pid} for each recorded service."""
    state = state_dir(state)
    report = {}
    for name, proc in _load_procs(state).items():
        alive = proc.alive()
        healthy = alive and http_status(proc.health, timeout=2) == 200
        report[name] = {"running": alive, "healthy": healthy, "url": proc.url, "pid": proc.pid}
        out(f"  {name:8s} {'healthy' if healthy else 'running' if alive else 'stopped'}  {proc.url}  pid {proc.pid}")
        if proc.address:
            report[name]["address"] = proc.address
            nodes = ray_summary(proc, load_credentials(state, create=False)[0]["RAY_AUTH_TOKEN"]) if healthy else ""
            report[name]["nodes"] = nodes
            out(f"  {'':8s} head {proc.address}" + (f"  {nodes}" if nodes else ""))
    if not report:
        out(f"no stack recorded in {state}")
    return report


def basic_auth_header(user_colon_password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + b64encode(user_colon_password.encode()).decode()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "down", "status"], help="start, stop or inspect the local services")
    parser.add_argument("--state", default=None, help="state folder (default stack/ in $MINITRON_HOME, or ./.minitron/stack)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind; anything but 127.0.0.1 exposes the stack")
    for name, port in DEFAULT_PORTS.items():
        parser.add_argument(f"--{name}-port", type=int, default=port, help=f"{name} port (default {port})")
    parser.add_argument("--ray", action="store_true", help="up: also start a Ray head (token auth on) for "
                        "backend: ray")
    for name, port in RAY_PORTS.items():
        parser.add_argument(f"--{name}-port", type=int, default=port, help=f"with --ray: {name} port (default {port})")


def run_stack(args: argparse.Namespace) -> int:
    if args.action == "up":
        ports = {name: getattr(args, f"{name.replace('-', '_')}_port") for name in [*DEFAULT_PORTS, *RAY_PORTS]}
        stack_up(args.state, host=args.host, ports=ports, ray=args.ray)
    elif args.action == "down":
        stack_down(args.state)
    else:
        report = stack_status(args.state)
        return 0 if report and all(r["healthy"] for r in report.values()) else 1
    return 0


def main_stack(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minitron stack", description=__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        return run_stack(parser.parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main_stack())
