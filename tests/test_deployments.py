"""The two deployments: names, parameters from the presets, the nightly schedule in an explicit timezone,
infra/prefect.yaml declaring the same two (so `minitron serve` and work-pool workers cannot drift), and a real Prefect
server refusing bad parameters before any flow run exists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from flows.deployments import NIGHTLY_CRON, deployments
from minitron.config import CompressConfig, load_config_file

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "configs" / "tiny.yaml"
DEMO = ROOT / "configs" / "demo-cpu.yaml"
PREFECT_YAML = ROOT / "infra" / "prefect.yaml"
NAMES = ("compress-on-demand", "compress-nightly")


@pytest.fixture
def built(monkeypatch):
    """(on_demand, nightly) RunnerDeployments built from the repository root, nightly in Asia/Tokyo."""
    monkeypatch.chdir(ROOT)  # entrypoints are relative to the working directory, as for `minitron serve`
    monkeypatch.setenv("MINITRON_TIMEZONE", "Asia/Tokyo")
    return deployments("tiny", "demo-cpu")


def test_names_and_parameters_from_presets(built):
    on_demand, nightly = built
    assert (on_demand.name, nightly.name) == NAMES
    assert on_demand.flow_name == nightly.flow_name == "compress"
    # every value written in the preset file arrives in the deployment's default parameters, as the form shows it
    for deployment, preset in ((on_demand, PRESET), (nightly, DEMO)):
        config = deployment.parameters["config"]
        for key, value in yaml.safe_load(preset.read_text()).items():
            assert config[key] == value, f"{deployment.name}: {key}"
        assert CompressConfig.model_validate(config) == load_config_file(preset)
    assert on_demand.parameters["config"]["name"] == "tiny" and nightly.parameters["config"]["name"] == "demo-cpu"


def test_schedules(built, monkeypatch):
    on_demand, nightly = built
    assert not on_demand.schedules
    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == NIGHTLY_CRON == "0 2 * * *"
    assert schedule.schedule.timezone == "Asia/Tokyo"
    monkeypatch.delenv("MINITRON_TIMEZONE")
    (schedule,) = deployments()[1].schedules
    assert schedule.schedule.timezone == "UTC"  # stated, not left to a bare cron's implicit UTC


def test_form_schema_is_flat_with_choices(built):
    """The UI renders the parameter schema as a form: one object of plain fields, Literal fields as enums."""
    schema = built[0]._parameter_openapi_schema.model_dump()
    config = schema["definitions"]["CompressConfig"]["properties"]
    assert config["dtype"]["enum"] == ["auto", "bf16", "fp32"]
    assert config["seq_len"]["type"] == "integer" and config["seq_len"]["minimum"] == 16
    assert all(field.get("description") for field in config.values())
    assert not any("$ref" in field or field.get("type") == "object" for field in config.values())


def test_prefect_yaml_declares_the_same_deployments(built):
    """infra/prefect.yaml (work-pool workers) matches what `minitron serve` serves: names, entrypoint, schedule, and
    parameters equal to the demo-cpu preset."""
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    declared = {d["name"]: d for d in spec["deployments"]}
    assert tuple(declared) == NAMES
    demo = load_config_file(DEMO)
    for deployment in built:
        entry = declared[deployment.name]
        assert entry["entrypoint"] == deployment.entrypoint == "flows/compress.py:compress"
        assert set(entry["parameters"]) == {"config"}
        assert entry["parameters"]["config"] == yaml.safe_load(DEMO.read_text())  # the same mapping, key by key
        assert CompressConfig.model_validate(entry["parameters"]["config"]) == demo
        assert set(entry["tags"]) == set(deployment.tags)
    assert "schedules" not in declared["compress-on-demand"]
    (schedule,) = declared["compress-nightly"]["schedules"]
    assert schedule["cron"] == NIGHTLY_CRON and schedule["timezone"]  # explicit timezone, never a bare cron


# -- a real server: bad parameters are refused when the flow run is created -----------------------------------------
@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Both deployments applied to a real (temporary) Prefect server → (client-ready on_demand id, nightly id)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(ROOT)
            on_demand, nightly = deployments("tiny", "tiny")
            yield on_demand.apply(), nightly.apply()


BAD = [
    ({"seq_len": "banana"}, "seq_len"),  # wrong type
    ({"dtype": "fp8"}, "dtype"),  # not one of the Literal choices
    ({"seq_len": 4}, "seq_len"),  # below the field's ge=16
]


@pytest.mark.services
@pytest.mark.parametrize(("change", "field"), BAD, ids=["type", "literal", "minimum"])
def test_server_rejects_bad_parameters(registered, change, field):
    """Prefect enforces the deployment's parameter schema on create: 409 naming the field, and no flow run exists
    (so no worker or `serve` can ever pick one up)."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import PrefectHTTPStatusError

    on_demand_id, _ = registered
    config = {**load_config_file(PRESET).model_dump(mode="json"), **change}
    with get_client(sync_client=True) as client:
        only_this = DeploymentFilter(id=DeploymentFilterId(any_=[on_demand_id]))
        before = len(client.read_flow_runs(deployment_filter=only_this))
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(on_demand_id, parameters={"config": config})
        assert refused.value.response.status_code == 409
        assert field in refused.value.response.json()["detail"]
        assert len(client.read_flow_runs(deployment_filter=only_this)) == before


@pytest.mark.services
def test_server_accepts_good_parameters_and_keeps_schedule(registered):
    from prefect import get_client

    on_demand_id, nightly_id = registered
    config = {**load_config_file(PRESET).model_dump(mode="json"), "seq_len": 32, "dtype": "fp32", "name": "edited"}
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(on_demand_id, parameters={"config": config})
        assert run.state.is_scheduled() and run.parameters["config"]["name"] == "edited"
        (schedule,) = client.read_deployment(nightly_id).schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == (NIGHTLY_CRON, "UTC")


@pytest.mark.services
def test_prefect_deploy_of_prefect_yaml(registered, tmp_path):
    """The README's work-pool commands, for real: `prefect work-pool create` + `prefect deploy --prefect-file
    infra/prefect.yaml --all` against the server; what lands there matches the served deployments."""
    import subprocess
    import sys

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_HOME=str(tmp_path / "prefect-home"),
               MINITRON_REPO_DIR=str(ROOT), MINITRON_HOME=str(tmp_path / "state"))
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    for args in (["work-pool", "create", "gpu", "--type", "process"],
                 ["deploy", "--prefect-file", str(PREFECT_YAML), "--all"]):
        done = subprocess.run(prefect + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    demo = load_config_file(DEMO)
    with get_client(sync_client=True) as client:
        for name in NAMES:
            deployment = client.read_deployment_by_name(f"compress/{name}")
            assert deployment.work_pool_name == "gpu" and deployment.entrypoint == "flows/compress.py:compress"
            assert CompressConfig.model_validate(deployment.parameters["config"]) == demo
        (schedule,) = client.read_deployment_by_name("compress/compress-nightly").schedules
        assert schedule.schedule.cron == NIGHTLY_CRON and schedule.schedule.timezone == "Europe/Berlin"
