from pathlib import Path

import pytest

from minitron.config import CompressConfig, load_config_file, parse_count
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


def test_ray_address_forms():
    for address in ("10.0.0.5:6379", "ray-head:6379", "minitron-head-svc.default.svc:6379", "ray://head:10001"):
        assert load_config_file(None, ["backend=ray", f"ray_address={address}"]).ray_address == address
    with pytest.raises(UserError, match="use host:port of its GCS"):
        load_config_file(None, ["ray_address=head"])
    assert CompressConfig().backend == "local" and CompressConfig().ray_address is None
