"""Fixtures that start REAL local services on free ports: a moto S3 server and an `mlflow server` (per session), a
Ray head with token auth (per module: `ray_cluster`, `ray_driver`).

Plugged in from tests/conftest.py with `pytest_plugins = ["tests.services"]`. They reuse the start-up code of the
local stack (infra/stack.py), so the tests exercise the same commands users run.
"""

import os
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass

import pytest

from infra import stack

FAKE_CREDS = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret-value"}


@dataclass
class S3Endpoint:
    url: str
    artifact_bucket: str
    checkpoint_bucket: str

    def client(self, **kwargs):
        from tasks.storage import s3_client

        return s3_client(self.url, **kwargs)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto server over HTTP with the stack's two buckets; fake credentials exported for the session (so no test
    can reach real AWS), endpoint NOT exported (use `s3_env` for that)."""
    saved = {k: os.environ.get(k) for k in [*FAKE_CREDS, "AWS_DEFAULT_REGION"]}
    os.environ.update(FAKE_CREDS, AWS_DEFAULT_REGION="us-east-1")
    state = tmp_path_factory.mktemp("s3")
    proc = stack.start_s3(state, "127.0.0.1", stack.free_port())
    try:
        stack.wait_healthy([proc], timeout=60)
        stack.create_buckets(proc.url, FAKE_CREDS)
        yield S3Endpoint(proc.url, stack.ARTIFACT_BUCKET, stack.CHECKPOINT_BUCKET)
    finally:
        stack.stop(proc)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """Point boto3 (AWS_ENDPOINT_URL_S3) and MLflow's artifact client at the moto server for one test."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint.url)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint.url)
    return s3_endpoint


@dataclass
class MlflowServer:
    url: str
    s3: S3Endpoint


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint, tmp_path_factory):
    """`mlflow server --workers 1`, SQLite backend, artifacts proxied to s3://minitron-artifacts/mlflow on moto.
    No auth here (the stack test covers the authenticated server)."""
    state = tmp_path_factory.mktemp("mlflow")
    proc = stack.start_mlflow(state, "127.0.0.1", stack.free_port(), s3_endpoint.url, FAKE_CREDS, auth=False)
    try:
        stack.wait_healthy([proc], timeout=120)
        yield MlflowServer(proc.url, s3_endpoint)
    finally:
        stack.stop(proc)


class FlakyProxy:
    """A TCP proxy to `upstream` that can go down mid-transfer: `fail_after(n_bytes, seconds)` forwards n more bytes
    client→server, then cuts every open connection and refuses new ones (accept, close) for `seconds`
    (float('inf'): for good). `on_outage` is called once when the outage starts."""

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.budget = float("inf")  # bytes still allowed before the outage
        self.outage_seconds = 0.0
        self.down_until = 0.0
        self.outages = 0
        self.refused = 0
        self.upstream_errors: list[str] = []  # why a client was cut outside an outage (shown when a test fails)
        self.on_outage = None
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def fail_after(self, n_bytes: int, seconds: float, on_outage=None) -> None:
        with self.lock:
            self.budget, self.outage_seconds, self.on_outage = n_bytes, seconds, on_outage

    def _now(self):
        return time.monotonic()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self._now() < self.down_until:
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError as e:
                self.upstream_errors.append(repr(e))
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, counted):
        try:
            while data := src.recv(65536):
                if counted:
                    with self.lock:
                        if len(data) >= self.budget:  # the outage hits in the middle of this request
                            self._outage()
                            return
                        self.budget -= len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):  # both pumps of a connection end here: shut down wakes the other, close frees the fd
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _outage(self):  # called with the lock held
        self.budget = float("inf")
        self.down_until = self._now() + self.outage_seconds
        self.outages += 1
        callback, self.on_outage = self.on_outage, None
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns.clear()
        if callback:
            callback()

    def close(self):
        self.closed = True
        self.server.close()
        with self.lock:
            self.budget = float("inf")
            for s in self.conns:
                try:
                    s.close()
                except OSError:
                    pass


# -- a local Ray cluster -------------------------------------------------------------------------------------------
RAY_TOKEN = secrets.token_hex(32)  # one per test session: Ray caches the token per process, so every cluster shares it
RAY_CPUS = 4  # logical CPUs: the search's two candidates as 2-worker Ray Train jobs side by side (CPU, gloo)


@dataclass
class RayCluster:
    address: str  # the head's GCS, host:port: what ray.init, `ray_address` and other nodes join
    dashboard: str  # dashboard, jobs and state API (token required)
    token: str
    proc: stack.Proc

    @property
    def env(self) -> dict[str, str]:
        """What a driver or a `minitron run` subprocess exports to use this cluster (token included)."""
        return stack.ray_client_env(self.proc, self.token)


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint, tmp_path_factory):
    """A real Ray head for one test module, started by the stack's own code (`minitron stack up --ray`): token auth
    on, RAY_CPUS CPUs, no GPU, a small object store (checkpoints never travel through it), and the S3 credentials in
    its environment, as a real cluster's nodes hold their own. Keep a module's Ray tests together: the start costs
    ~10 s. This process is not connected; `ray_driver` connects it."""
    state = tmp_path_factory.mktemp("ray")
    proc = stack.start_ray(state, "127.0.0.1", stack.free_port(), stack.free_port(), RAY_TOKEN, num_cpus=RAY_CPUS,
                           num_gpus=0, object_store_bytes=128 * 2**20)
    try:
        stack.wait_healthy([proc], timeout=120)
        yield RayCluster(proc.address, proc.url, RAY_TOKEN, proc)
    finally:
        stack.stop(proc)
        shutil.rmtree(stack.ray_temp_dir(state), ignore_errors=True)  # Ray's session logs, outside pytest's tmp


@pytest.fixture(scope="module")
def ray_driver(ray_cluster):
    """This test process joined to `ray_cluster` as a driver, the way tasks/ray_cluster.py joins (token from the
    environment); disconnected and the environment restored at the end of the module."""
    saved = {k: os.environ.get(k) for k in ray_cluster.env}
    os.environ.update(ray_cluster.env)  # before ray is imported: it reads RAY_AUTH_MODE once
    import ray

    from tasks.ray_cluster import connect

    try:
        connect(ray_cluster.address)
        yield ray
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
