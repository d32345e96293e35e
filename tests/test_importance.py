"""Importance on constructed cases and against a hand computation; scores files round-trip and refuse other models."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, build_tiny_model

from minitron.errors import UserError
from minitron.importance import ImportanceScores, compute_importance

IDS = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroed_units_rank_last_and_identity_layer_has_no_influence(family):
    model = build_tiny_model(family)
    layers = model.model.layers
    with torch.no_grad():
        layers[1].self_attn.v_proj.weight[16:32] = 0  # KV group 1 → query heads 2 and 3 output zero
        if layers[1].self_attn.v_proj.bias is not None:
            layers[1].self_attn.v_proj.bias[16:32] = 0
        layers[0].mlp.up_proj.weight[5] = 0  # neuron 5: up = 0 → act(gate) * 0 (or relu²(0)) = 0
        # hidden channel 7: every norm that feeds a linear layer outputs 0 there
        norms = [m for n, m in model.named_modules() if n.endswith(("layernorm", "model.norm"))]
        for norm in norms:
            norm.weight[7] = -1.0 if family == "nemotron" else 0.0  # LayerNorm1P computes with weight + 1
            if getattr(norm, "bias", None) is not None:
                norm.bias[7] = 0
        for p in (layers[2].self_attn.o_proj, layers[2].mlp.down_proj):  # layer 2 adds nothing: an identity
            p.weight.zero_()
            if p.bias is not None:
                p.bias.zero_()
    s = compute_importance(model, IDS, batch_size=4, val_blocks=IDS[:2])
    assert s.heads[1, 2:].abs().max() == 0 and s.heads[1, :2].min() > 0
    assert s.kv_groups[1].argmin() == 1 and s.kv_groups[1, 1] == 0
    assert s.neurons[0].argmin() == 5 and s.neurons[0, 5] == 0 and (s.neurons[0] > 0).sum() == 127
    assert s.hidden.argmin() == 7 and s.hidden[7] == 0
    assert s.layer_bi[2].abs() < 1e-6 and s.layer_bi.argmin() == 2 and (s.layer_bi[[0, 1, 3]] > 0).all()
    assert s.layer_loss[2].abs() < 1e-5


@pytest.mark.parametrize("seq_agg,batch_agg", [("mean", "l2"), ("l2", "mean"), ("var", "var")])
def test_aggregations_match_a_hand_computation(seq_agg, batch_agg):
    model = build_tiny_model("llama")
    seen = []
    handle = model.model.layers[3].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    s = compute_importance(model, IDS, batch_size=4, seq_agg=seq_agg, batch_agg=batch_agg)
    handle.remove()
    a = torch.cat(seen).double().abs()  # [samples, tokens, ffn]
    per_sample = {"mean": a.mean(1), "l2": a.norm(dim=1), "var": a.var(1)}[seq_agg]
    expected = {"mean": per_sample.mean(0), "l2": per_sample.norm(dim=0),
                "var": per_sample.var(0, unbiased=False)}[batch_agg]
    torch.testing.assert_close(s.neurons[3].double(), expected, rtol=1e-4, atol=1e-6)


def test_scores_round_trip_and_refuse_another_model(tmp_path):
    model = build_tiny_model("qwen3")
    s = compute_importance(model, IDS, batch_size=3)
    path = s.save(tmp_path / "s.safetensors", {"calibration": {"samples": 6, "seq_len": 24, "data": "x"}})
    back = ImportanceScores.load(path)
    for k in ("heads", "kv_groups", "neurons", "hidden", "layer_bi", "hidden_energy", "neuron_mean"):
        assert torch.equal(getattr(back, k), getattr(s, k))
    assert back.layer_loss is None and back.meta["calibration"]["data"] == "x" and back.meta["batch_agg"] == "l2"
    back.check_matches(model.config)
    with pytest.raises(UserError, match="scores were computed on another model"):
        back.check_matches(build_tiny_model("qwen3", intermediate_size=96).config)
    with pytest.raises(UserError, match="scores were computed on another model"):
        back.check_matches(build_tiny_model("llama").config)
    with pytest.raises(UserError, match="no layer-loss ranking"):
        back.layer_ranking("loss")
    with pytest.raises(UserError, match="seq_agg must be one of"):
        compute_importance(model, IDS, seq_agg="max")


@pytest.mark.parametrize("family", ["llama", "nemotron"])
def test_energy_and_neuron_means_match_a_hand_computation(family):
    """hidden_energy: E[(x_c / rms(x))^2] at every hidden norm's input (centred for Nemotron's LayerNorm), averaged
    over the norms; neuron_mean: the signed mean of down_proj's input."""
    model = build_tiny_model(family)
    norms = [m for n, m in model.named_modules() if n.endswith(("layernorm", "model.norm"))]
    seen, down = [], []
    handles = [n.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone())) for n in norms]
    handles.append(model.model.layers[2].mlp.down_proj.register_forward_pre_hook(lambda m, a: down.append(a[0])))
    s = compute_importance(model, IDS, batch_size=4)
    for h in handles:
        h.remove()
    x = torch.cat(seen).double()  # [norms * samples, tokens, hidden]
    if family == "nemotron":
        x = x - x.mean(-1, keepdim=True)
    expected = (x.pow(2) / x.pow(2).mean(-1, keepdim=True)).mean((0, 1))
    assert len(norms) == 9 and abs(expected.mean().item() - 1) < 1e-9  # it is a distribution over channels
    torch.testing.assert_close(s.hidden_energy.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.neuron_mean[2].double(), torch.cat(down).double().mean((0, 1)), rtol=1e-5,
                               atol=1e-7)
