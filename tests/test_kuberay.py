"""infra/kuberay/raycluster.yaml without a cluster: the RayCluster fields against a schema of KubeRay's ray.io/v1 API
(unknown fields refused, as `kubectl apply --validate=strict` does), every pod template against Kubernetes' own strict
PodTemplateSpec schema, and the promises: token auth on every Ray container, the dashboard on loopback, our image
and our Ray version, the stack's ports and names."""

from __future__ import annotations

import copy
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import yaml

from infra import stack

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "infra" / "kuberay" / "raycluster.yaml"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _object(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}  # KubeRay wants rayStartParams as strings
POD_TEMPLATE = {"type": "object"}  # checked separately against Kubernetes' PodTemplateSpec
# The ray.io/v1 RayCluster fields (KubeRay's CRD API reference), those a manifest of ours may use.
RAYCLUSTER = _object({
    "apiVersion": {"const": "ray.io/v1"},
    "kind": {"const": "RayCluster"},
    "metadata": _object({"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": STRINGS,
                         "annotations": STRINGS}, ("name",)),
    "spec": _object({
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "suspend": {"type": "boolean"},
        "authOptions": _object({"mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"}}),
        "headGroupSpec": _object({"serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                                  "rayStartParams": STRINGS, "template": POD_TEMPLATE,
                                  "enableIngress": {"type": "boolean"}}, ("template",)),
        "workerGroupSpecs": {"type": "array", "items": _object({
            "groupName": {"type": "string"}, "replicas": {"type": "integer", "minimum": 0},
            "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 0},
            "numOfHosts": {"type": "integer", "minimum": 1}, "suspend": {"type": "boolean"},
            "rayStartParams": STRINGS, "template": POD_TEMPLATE}, ("groupName", "template"))},
    }, ("headGroupSpec",)),
}, ("apiVersion", "kind", "metadata", "spec"))


def validate(doc: dict) -> None:
    """Raise on a RayCluster that KubeRay or Kubernetes would refuse (or silently drop fields of)."""
    import kubernetes_validate

    jsonschema.validate(doc, RAYCLUSTER)
    spec = doc["spec"]
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": group["template"]}, "1.37", strict=True)
        if "replicas" in group:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


@pytest.fixture(scope="module")
def cluster() -> dict:
    (doc,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return doc


def test_manifest_validates(cluster):
    validate(cluster)


@pytest.mark.parametrize("breakage", ["typo-in-pod", "int-start-param", "unknown-spec-field", "port-as-string"])
def test_validation_catches_mistakes(cluster, breakage):
    broken = copy.deepcopy(cluster)
    head = broken["spec"]["headGroupSpec"]
    container = head["template"]["spec"]["containers"][0]
    if breakage == "typo-in-pod":
        container["enviroment"] = container.pop("env")
    elif breakage == "int-start-param":
        head["rayStartParams"]["num-gpus"] = 0
    elif breakage == "unknown-spec-field":
        broken["spec"]["workerGroups"] = broken["spec"].pop("workerGroupSpecs")
    else:
        container["ports"][0]["containerPort"] = "6379"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def _containers(cluster):
    spec = cluster["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        yield from group["template"]["spec"]["containers"]


def test_token_auth_on_every_ray_container(cluster):
    for container in _containers(cluster):
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "minitron-stack",
                                                                     "key": "RAY_AUTH_TOKEN"}
        assert "RAY_AUTH_TOKEN" in stack.SECRET_NAMES  # the key the stack's .env (the secret's source) holds
        for item in env.values():  # no secret value written in the manifest
            assert "value" not in item or item["name"] not in stack.SECRET_NAMES


def test_same_image_version_ports_as_the_stack(cluster):
    spec = cluster["spec"]
    assert spec["rayVersion"] == version("ray")
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1" and head["serviceType"] == "ClusterIP"
    assert head["rayStartParams"]["num-gpus"] == "0"
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {"gcs-server": stack.RAY_PORTS["ray"], "dashboard": stack.RAY_PORTS["ray-dashboard"]}
    images = {c["image"] for c in _containers(cluster)}
    assert images == {COMPOSE["services"]["worker"]["image"]}
    (gpu,) = spec["workerGroupSpecs"]
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["MINITRON_CHECKPOINT_STORE"] == stack.CHECKPOINT_STORE
    mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
    volumes = {v["name"]: v for v in gpu["template"]["spec"]["volumes"]}
    assert mounts["dshm"] == "/dev/shm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
