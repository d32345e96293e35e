import pytest
import torch

from minitron.errors import UserError
from minitron.models import build_meta_model, count_parameters, load_config, load_model, save_model


def test_tiny_folder_loads_with_same_logits(tiny_model_dir, tiny_model):
    model, tokenizer = load_model(str(tiny_model_dir))
    reference = tiny_model("llama")
    ids = torch.arange(20).view(1, 20)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-6)
    assert tokenizer.eos_token == "<|endoftext|>"
    assert count_parameters(model) == sum(p.numel() for p in reference.parameters())


def test_smollm2_alias_loads_with_published_shape(smollm2):
    model, tokenizer = smollm2
    c = model.config
    assert count_parameters(model) == 134_515_008
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (30, 9, 3)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size) == (576, 1536, 49152)
    assert tokenizer("To be, or not to be")["input_ids"]  # the tokenizer came along


def test_smollm2_generates_english(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_config_only_folder_builds_on_meta(tmp_path, tiny_model):
    model = tiny_model("qwen3")
    model.config.save_pretrained(tmp_path)  # config.json only, no weights
    meta = build_meta_model(load_config(str(tmp_path)))
    assert next(meta.parameters()).device.type == "meta"
    assert count_parameters(meta) == count_parameters(model)


@pytest.mark.parametrize("spec, message", [
    ("./missing-model", "does not exist"),
    ("missing.gguf", "does not exist"),
    ("no-such-alias", "not an alias"),
    ("meta-llama/Llama-3.1-8B", "HF_HUB_OFFLINE"),
])
def test_bad_model_specs_give_one_line_errors(spec, message):
    with pytest.raises(UserError, match=message) as err:
        load_model(spec)
    assert "\n" not in str(err.value)


def test_unsupported_file_type(tmp_path):
    f = tmp_path / "weights.npz"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="unsupported model file"):
        load_model(str(f))


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path))


def test_pickle_weights_refused_by_default(tmp_path, tiny_model, tiny_tokenizer):
    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the legacy pickle format
    tiny_tokenizer.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(UserError, match="--allow-pickle"):
        load_model(str(tmp_path))
    loaded, _ = load_model(str(tmp_path), allow_pickle=True)
    assert count_parameters(loaded) == count_parameters(model)


def test_remote_code_refused_by_default(tmp_path, tiny_model, tiny_tokenizer):
    save_model(tiny_model("llama"), tiny_tokenizer, tmp_path)
    cfg = (tmp_path / "config.json").read_text().replace(
        '"model_type": "llama"', '"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", '
        '"AutoModelForCausalLM": "evil.EvilModel"}')
    (tmp_path / "config.json").write_text(cfg)
    (tmp_path / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UserError, match="trust_remote_code"):
        load_model(str(tmp_path))
