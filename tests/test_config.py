import re
from pathlib import Path

import pytest

from minitron.config import FORM_GROUPS, CompressConfig, load_config_file, make_config, parse_count
from minitron.errors import UserError

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("text, value", [("70M", 70_000_000), ("4.5B", 4_500_000_000), ("2048", 2048),
                                         ("1.5k", 1500), (12, 12)])
def test_parse_count(text, value):
    assert parse_count(text) == value


def test_every_preset_loads():
    assert CONFIGS, "no presets found"
    for path in CONFIGS:
        load_config_file(path)


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("teacher: smollm2-135m\nlearning_rate: 3\n")
    with pytest.raises(UserError, match="unknown config key 'learning_rate'"):
        load_config_file(f)


@pytest.mark.parametrize("override, key", [("seq_len=banana", "seq_len"), ("device=tpu", "device"),
                                           ("target_params=lots", "target_params"), ("lr=-1", "lr"),
                                           ("drop_layers=16..31", "drop_layers"), ("backend=slurm", "backend"),
                                           ("ray_address=http://head:8265", "ray_address")])
def test_bad_values_are_named(override, key):
    with pytest.raises(UserError, match=f"'{key}'"):
        load_config_file(None, [override])


def test_overrides_are_typed():
    cfg = load_config_file(None, ["lr=3e-4", "compile=true", "target_params=8B,4B", "distill_tokens=2000000"])
    assert cfg.lr == 3e-4 and cfg.compile is True
    assert cfg.targets(15_000_000_000) == [8_000_000_000, 4_000_000_000]
    assert cfg.tokens("distill_tokens") == 2_000_000


def test_percentage_target():
    assert CompressConfig(target_params="55%").targets(134_515_008) == [73_983_254]


def test_every_field_is_described():
    for name, field in CompressConfig.model_fields.items():
        assert field.description, name


# -- counts: the schema pattern (what the Prefect server enforces) and our validation agree -------------------------
COUNTS = [("70M", True), ("4.5B", True), ("2048", True), (" 1.5k ", True), ("banana", False), ("1e5", False),
          ("55%", False), ("8B,4B", False), ("", False), ("1.2.3", False)]
TARGETS = [("70M", True), ("4.5B", True), ("55%", True), ("8B,4B", True), ("8B, 4B", True), ("55 %", True),
           ("banana", False), ("8B,", False), ("55K%", False), ("%", False), ("1e9", False)]


@pytest.mark.parametrize("text, ok", COUNTS)
def test_count_pattern_matches_validation(text, ok):
    schema = CompressConfig.model_json_schema()["properties"]
    for field in ("correction_tokens", "search_tokens", "distill_tokens"):
        assert bool(re.search(schema[field]["pattern"], text)) is ok, field
    assert bool(re.search(schema["max_corpus_tokens"]["anyOf"][0]["pattern"], text)) is ok
    if ok:
        assert load_config_file(None, [f"distill_tokens={text}"]).tokens("distill_tokens") == parse_count(text)
    else:
        with pytest.raises(UserError, match=r"bad value for 'distill_tokens'.*70M, 4.5B, 2048"):
            make_config({"distill_tokens": text})


@pytest.mark.parametrize("text, ok", TARGETS)
def test_target_pattern_matches_validation(text, ok):
    pattern = CompressConfig.model_json_schema()["properties"]["target_params"]["pattern"]
    assert bool(re.search(pattern, text)) is ok
    if ok:
        make_config({"target_params": text})
    else:
        with pytest.raises(UserError) as err:
            make_config({"target_params": text})
        assert str(err.value) == (f"bad value for 'target_params' ({text!r}): use a parameter count (70M, 4.5B), a "
                                  "percentage of the teacher (55%) or a comma list for iterative pruning (8B,4B)")


def test_numbers_from_yaml_are_counts(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("distill_tokens: 2000000\nmax_corpus_tokens: 4.5e+6\ntarget_params: 70000000\n")
    config = load_config_file(f)
    assert (config.distill_tokens, config.tokens("distill_tokens")) == ("2000000", 2_000_000)
    assert parse_count(config.max_corpus_tokens) == 4_500_000 and config.targets(10**9) == [70_000_000]


def test_null_means_the_concrete_default():
    """Older presets say `eval_limit: null` for all examples: 0 says it now (a plain value in the form)."""
    config = load_config_file(None, ["eval_limit=", "memory_cap_gib=", "stage_timeout_hours=", "tracking_uri="])
    assert (config.eval_limit, config.memory_cap_gib, config.stage_timeout_hours, config.tracking_uri) == (0, 0, 0, "")


def test_form_is_grouped_by_stage_in_pipeline_order():
    """The Prefect form sorts fields by `position` and labels them by `title`: groups in pipeline order, a field's
    group from the section it is declared in, and the fields a run cannot go without marked required."""
    schema = CompressConfig.model_json_schema()
    props = schema["properties"]
    ordered = sorted(props, key=lambda name: props[name]["position"])
    assert ordered[:2] == ["name", "teacher"] and ordered[-2:] == ["tracking_uri", "checkpoint_store"]
    groups = [props[name]["title"].split(" · ")[0] for name in ordered]
    assert list(dict.fromkeys(groups)) == list(FORM_GROUPS)  # each group once, contiguous, in FORM_GROUPS order
    assert props["correction_tokens"]["title"] == "1 correct · correction_tokens"  # declared after importance
    assert props["search_tokens"]["title"] == "3 search · search_tokens"
    assert ordered.index("correction_tokens") < ordered.index("calib_samples") < ordered.index("target_params")
    assert ordered.index("search_tokens") < ordered.index("distill_tokens") < ordered.index("eval_limit")
    assert schema["required"] == ["name", "teacher", "data", "target_params"]
    assert set(ordered) == set(CompressConfig.model_fields)


def test_ray_address_forms():
    for address in ("10.0.0.5:6379", "ray-head:6379", "minitron-head-svc.default.svc:6379", "ray://head:10001"):
        assert load_config_file(None, ["backend=ray", f"ray_address={address}"]).ray_address == address
    with pytest.raises(UserError, match="use host:port of its GCS"):
        load_config_file(None, ["ray_address=head"])
    assert CompressConfig().backend == "local" and CompressConfig().ray_address is None
