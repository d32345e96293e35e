"""docker-compose.yml and infra/Dockerfile: the invariants we promise, and the same names as the local stack."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from infra import stack

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SERVERS = ("postgres", "s3", "prefect", "mlflow")


def env_of(name):
    return SERVICES[name].get("environment", {})


def command_of(name):
    cmd = SERVICES[name].get("command", [])
    return " ".join(cmd) if isinstance(cmd, list) else cmd


def test_images_pinned():
    for name, svc in SERVICES.items():
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and "/" not in tag, f"{name}: {image} is not pinned"
    for line in (ROOT / "infra" / "Dockerfile").read_text().splitlines():
        if line.startswith("ARG PYTHON_IMAGE="):
            assert re.fullmatch(r"ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+", line)
    assert "latest" not in (ROOT / "infra" / "Dockerfile").read_text()


def test_healthchecks_and_dependencies():
    for name in SERVERS:
        assert SERVICES[name]["healthcheck"]["test"], name
    for name, svc in SERVICES.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert cond["condition"] in ("service_healthy", "service_completed_successfully")
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep}, which has no healthcheck"
            else:
                assert SERVICES[dep]["restart"] == "no"
    assert SERVICES["mlflow"]["depends_on"]["create-buckets"]["condition"] == "service_completed_successfully"
    assert set(SERVICES["worker"]["depends_on"]) >= {"prefect", "mlflow"}


def test_ports_loopback_only_and_minimal():
    published = {}
    for name, svc in SERVICES.items():
        for port in svc.get("ports", []):
            host_ip, host_port, container_port = port.split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond localhost"
            published[name] = int(host_port)
    # only the UIs/APIs users touch, on the local stack's ports
    assert published == {"s3": stack.DEFAULT_PORTS["s3"], "prefect": stack.DEFAULT_PORTS["prefect"],
                         "mlflow": stack.DEFAULT_PORTS["mlflow"], "ray-head": stack.RAY_PORTS["ray-dashboard"]}


def test_auth_on_and_secrets_from_env():
    assert env_of("prefect")["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_SERVER_API_AUTH_STRING:?")
    mlflow_cmd = command_of("mlflow")
    assert "--app-name basic-auth" in mlflow_cmd and "--allowed-hosts" in mlflow_cmd and "--workers" in mlflow_cmd
    assert env_of("mlflow")["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_AUTH_ADMIN_PASSWORD:?")
    assert env_of("worker")["PREFECT_API_AUTH_STRING"].startswith("${PREFECT_API_AUTH_STRING:?")
    # every credential the stack generates is taken from the environment, never written in the file
    seen = set()
    for name, svc in SERVICES.items():
        for key, value in svc.get("environment", {}).items():
            if key in stack.SECRET_NAMES:
                assert re.fullmatch(rf"\$\{{{key}:\?[^}}]+\}}", str(value)), f"{name}.{key} = {value}"
                seen.add(key)
            assert not re.search(r"(password|secret)\s*[:=]\s*\w", str(value), re.I), f"{name}.{key}"
    assert seen == set(stack.SECRET_NAMES)
    assert "password" not in (ROOT / "infra" / "mlflow-auth.ini").read_text().split("[mlflow]")[1].split("#")[0]


def test_same_names_as_local_stack():
    mlflow_cmd = command_of("mlflow")
    assert f"--artifacts-destination s3://{stack.ARTIFACT_BUCKET}/mlflow" in mlflow_cmd
    assert env_of("mlflow")["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    buckets = command_of("create-buckets")
    assert f"store/{stack.ARTIFACT_BUCKET}" in buckets and f"store/{stack.CHECKPOINT_BUCKET}" in buckets
    worker = env_of("worker")
    local = stack.client_env({"mlflow": "m", "prefect": "p", "s3": "s"}, {k: "x" for k in stack.SECRET_NAMES})
    assert set(local) - {"MLFLOW_S3_ENDPOINT_URL"} <= set(worker)  # the worker never proxies artifacts itself
    assert worker["MINITRON_CHECKPOINT_STORE"] == stack.CHECKPOINT_STORE


def test_gpu_worker():
    worker = SERVICES["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert worker["build"] == {"context": ".", "dockerfile": "infra/Dockerfile", "target": "worker"}
    assert worker["stop_signal"] == "SIGINT"
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    assert "FROM ${PYTHON_IMAGE} AS worker" in dockerfile and "FROM ${PYTHON_IMAGE} AS mlflow" in dockerfile


def test_ray_services():
    """ray-head and a GPU ray-worker (profile "ray"): token auth on both, the head's GCS and dashboard on the local
    stack's ports, the worker joining it, the flows told where it is."""
    head, worker = SERVICES["ray-head"], SERVICES["ray-worker"]
    assert head["profiles"] == worker["profiles"] == ["ray"]
    gcs, dashboard = stack.RAY_PORTS["ray"], stack.RAY_PORTS["ray-dashboard"]
    head_cmd, worker_cmd = command_of("ray-head"), command_of("ray-worker")
    assert head_cmd.startswith("ray start --head --block") and f"--port {gcs}" in head_cmd
    assert f"--dashboard-port {dashboard}" in head_cmd and "--num-gpus 0" in head_cmd
    assert worker_cmd.startswith(f"ray start --address ray-head:{gcs} --block")
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert "gcs_healthz" in " ".join(head["healthcheck"]["test"])
    for env in (env_of("ray-head"), env_of("ray-worker"), env_of("worker")):
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")
    assert env_of("worker")["RAY_ADDRESS"] == env_of("ray-worker")["RAY_ADDRESS"] == f"ray-head:{gcs}"
    assert "ports" not in worker  # Ray's own ports stay on the compose network
    assert worker["deploy"] == SERVICES["worker"]["deploy"] and worker["shm_size"]
    assert worker["image"] == head["image"] == SERVICES["worker"]["image"]  # Ray workers import our code
    assert env_of("ray-worker")["MINITRON_CHECKPOINT_STORE"] == stack.CHECKPOINT_STORE  # checkpoints go through S3


def compose_client():
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_validates(tmp_path):
    client = compose_client()
    if client is None:
        pytest.skip("no docker compose client (install docker-compose or the compose plugin)")
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}=test-{k.lower()}\n" for k in stack.SECRET_NAMES))
    base = [*client, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml"),
            "--env-file", str(env_file)]
    clean_env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path)}
    ok = subprocess.run([*base, "config", "-q"], capture_output=True, text=True, env=clean_env)
    assert ok.returncode == 0, ok.stderr
    ray = subprocess.run([*base, "--profile", "ray", "config", "-q"], capture_output=True, text=True, env=clean_env)
    assert ray.returncode == 0, ray.stderr
    env_file.write_text("".join(f"{k}=x\n" for k in stack.SECRET_NAMES if k != "POSTGRES_PASSWORD"))
    missing = subprocess.run([*base, "config", "-q"], capture_output=True, text=True, env=clean_env)
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr + missing.stdout
