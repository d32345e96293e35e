"""The two deployments: names, parameters from the presets, the nightly schedule in an explicit timezone,
infra/prefect.yaml declaring the same two (so `minitron serve` and work-pool workers cannot drift), and a real Prefect
server refusing bad parameters before any flow run exists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from flows.deployments import NIGHTLY_CRON, deployments, replace_old_schedule, schedule_label
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
    # the timezone in words, not only on hover: the schedule's slug (the deployment page shows it) and description
    assert schedule.slug == schedule_label("Asia/Tokyo") == "nightly at 02:00 Asia/Tokyo"
    assert "nightly at 02:00 Asia/Tokyo" in nightly.description
    monkeypatch.delenv("MINITRON_TIMEZONE")
    (schedule,) = deployments()[1].schedules
    assert schedule.schedule.timezone == "UTC"  # stated, not left to a bare cron's implicit UTC
    assert schedule.slug == "nightly at 02:00 UTC"


def test_one_preset_serves_both_deployments(monkeypatch):
    """`serve --preset tiny` gives both deployments tiny's values; --nightly-preset gives the nightly its own."""
    from cli.main import main

    monkeypatch.chdir(ROOT)
    on_demand, nightly = deployments("tiny")
    assert on_demand.parameters == nightly.parameters and nightly.parameters["config"]["name"] == "tiny"
    served = []
    monkeypatch.setattr("flows.deployments.serve", lambda *args, **kwargs: served.append(args))
    assert main(["serve", "--preset", "tiny"]) == 0 and served[-1] == ("tiny", None)
    assert main(["serve", "--preset", "tiny", "--nightly-preset", "demo-cpu"]) == 0
    assert served[-1] == ("tiny", "demo-cpu")


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
    assert schedule["slug"] == schedule_label(schedule["timezone"])  # the page names the timezone in words
    assert schedule_label(schedule["timezone"]) in declared["compress-nightly"]["description"]


# -- a real server: bad parameters are refused when the flow run is created -----------------------------------------
@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Both deployments applied to a real (temporary) Prefect server → (client-ready on_demand id, nightly id)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(ROOT)
            mp.setenv("MINITRON_TIMEZONE", "UTC")  # then served in infra/prefect.yaml's Europe/Berlin below
            on_demand, nightly = deployments("tiny", "tiny")
            ids = on_demand.apply(), nightly.apply()
            mp.setenv("MINITRON_TIMEZONE", "Europe/Berlin")
            _, nightly = deployments("tiny", "tiny")
            replace_old_schedule(nightly)  # what `minitron serve` does before registering
            assert nightly.apply() == ids[1]
            yield ids


BAD = [
    ({"seq_len": "banana"}, "seq_len"),  # wrong type
    ({"dtype": "fp8"}, "dtype"),  # not one of the Literal choices
    ({"seq_len": 4}, "seq_len"),  # below the field's ge=16
    ({"target_params": "banana"}, "target_params"),  # counts: the schema's pattern
    ({"distill_tokens": "55%"}, "distill_tokens"),  # a percentage is a target, not a token budget
    ({"max_corpus_tokens": "lots"}, "max_corpus_tokens"),  # a nullable count
    ({"teacher": None}, "teacher"),  # a required field left out
]


@pytest.mark.services
@pytest.mark.parametrize(("change", "field"), BAD,
                         ids=["type", "literal", "minimum", "target", "tokens", "nullable-count", "required"])
def test_server_rejects_bad_parameters(registered, change, field):
    """Prefect enforces the deployment's parameter schema on create: 409 naming the field, and no flow run exists
    (so no worker or `serve` can ever pick one up)."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import PrefectHTTPStatusError

    on_demand_id, _ = registered
    config = {k: v for k, v in {**load_config_file(PRESET).model_dump(mode="json"), **change}.items() if v is not None
              or k not in change}
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
        # served again in another timezone: the new schedule replaced the old one, not joined it
        (schedule,) = client.read_deployment(nightly_id).schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == (NIGHTLY_CRON, "Europe/Berlin")
        assert schedule.slug == "nightly at 02:00 Europe/Berlin"


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


@pytest.mark.services
def test_a_bad_value_past_the_schema_fails_in_preflight_in_one_line(registered):
    """The form's "Validate parameters" unticked (or an API client with enforce_parameter_schema false): the server
    creates the run, which fails in its first seconds, before any stage, its state message one line naming the field
    and its accepted forms."""
    from prefect import get_client
    from prefect.flow_engine import run_flow

    from flows.compress import compress

    on_demand_id, _ = registered
    config = {**load_config_file(PRESET).model_dump(mode="json"), "target_params": "banana"}
    with get_client(sync_client=True) as client:
        response = client.request("POST", "/deployments/{id}/create_flow_run", path_params={"id": on_demand_id},
                                  json={"parameters": {"config": config}, "enforce_parameter_schema": False})
        flow_run = client.read_flow_run(response.json()["id"])
        state = run_flow(compress, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")
        assert state.is_failed()
        message = client.read_flow_run(flow_run.id).state.message
        assert "\n" not in message and "Traceback" not in message
        assert message.endswith("bad value for 'target_params' ('banana'): use a parameter count (70M, 4.5B), a "
                                "percentage of the teacher (55%) or a comma list for iterative pruning (8B,4B)")
        assert not [t for t in client.read_task_runs() if t.flow_run_id == flow_run.id]  # no stage ran
