"""Exact structured pruning: full-shape prunes are permutations (same logits), pruned models count, save, reload and
generate; bad shapes and foreign scores fail before any work."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, build_tiny_model

from cli.main import main
from minitron.archmath import Shape, count_shape, shape_of
from minitron.errors import UserError
from minitron.importance import ImportanceScores, compute_importance
from minitron.prune import norm_factor, prune, save_pruned

IDS = torch.randint(0, 256, (4, 20), generator=torch.Generator().manual_seed(2))
VARIANTS = [(f, t) for f in FAMILIES for t in (True, False)]


def shuffled_scores(model, seed=0):
    """Real scores with every tensor replaced by a random order: a non-trivial permutation on every axis."""
    s = compute_importance(model, IDS[:2], batch_size=2, val_blocks=IDS[:1])
    g = torch.Generator().manual_seed(seed)
    for k in ("heads", "kv_groups", "neurons", "hidden", "layer_bi", "layer_loss"):
        setattr(s, k, torch.rand(getattr(s, k).shape, generator=g))
    return s


@pytest.mark.parametrize("family,tied", VARIANTS)
def test_full_shape_prune_is_exact(family, tied):
    model = build_tiny_model(family, tie_word_embeddings=tied)
    s = shuffled_scores(model)
    pruned = prune(model, s, shape_of(model.config))
    assert not torch.equal(pruned.model.embed_tokens.weight, model.model.embed_tokens.weight)  # really permuted
    with torch.no_grad():
        assert (pruned(IDS).logits - model(IDS).logits).abs().max() < 1e-5


@pytest.mark.parametrize("family,tied", VARIANTS)
def test_pruned_model_counts_saves_reloads_and_generates(family, tied, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    overrides = dict(tie_word_embeddings=tied)
    if family == "qwen2":  # per-layer attention types must follow the kept layers
        overrides.update(use_sliding_window=True, sliding_window=8, max_window_layers=2, layer_types=None)
    model = build_tiny_model(family, **overrides)
    shape = Shape(layers=2, hidden=40, ffn=72, heads=2, kv_heads=1, head_dim=16)  # hidden/heads != head_dim
    pruned = prune(model, shuffled_scores(model), shape)
    assert sum(p.numel() for p in pruned.parameters()) == count_shape(model.config, shape)
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    out = save_pruned(pruned, tiny_tokenizer, tmp_path / "pruned")
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert shape_of(back.config) == shape
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, pruned(IDS).logits, rtol=0, atol=1e-6)
    prompt = IDS[:1, :6]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=256)
    cached = back.generate(prompt, use_cache=True, **kw)
    assert torch.equal(cached, back.generate(prompt, use_cache=False, **kw)) and cached.shape[1] == 14


def test_drop_block_and_layer_ranking():
    model = build_tiny_model("llama")
    s = shuffled_scores(model)
    full = shape_of(model.config)
    block = prune(model, s, Shape(2, **{k: v for k, v in vars(full).items() if k != "layers"}), drop_layers=(1, 2))
    ref = prune(model, s, full)
    for new, old in ((0, 0), (1, 3)):
        for (n, a), b in zip(block.model.layers[new].named_parameters(), ref.model.layers[old].parameters(),
                             strict=True):
            assert torch.equal(a, b), n
    s.layer_loss = torch.tensor([0.5, 0.1, 0.9, 0.2])  # keep the two largest: layers 0 and 2
    by_loss = prune(model, s, Shape(2, 64, 128, 4, 2, 16))
    assert torch.equal(by_loss.model.layers[1].mlp.down_proj.weight.flatten().sort().values,
                       model.model.layers[2].mlp.down_proj.weight.flatten().sort().values)


def test_bad_shapes_and_foreign_scores():
    model = build_tiny_model("llama")
    s = shuffled_scores(model)
    with pytest.raises(UserError, match="multiple of the KV groups"):
        prune(model, s, Shape(4, 64, 128, 3, 2, 16))
    with pytest.raises(UserError, match="cannot grow attention"):
        prune(model, s, Shape(4, 64, 128, 6, 2, 16))
    with pytest.raises(UserError, match="hidden 96 must be between"):
        prune(model, s, Shape(4, 96, 128, 4, 2, 16))
    with pytest.raises(UserError, match="leaves 3 layers"):
        prune(model, s, Shape(2, 64, 128, 4, 2, 16), drop_layers=(1, 1))
    with pytest.raises(UserError, match="scores were computed on another model"):
        prune(build_tiny_model("mistral"), s, Shape(4, 64, 128, 4, 2, 16))


def test_cli_importance_then_prune(tiny_model_dir, text_corpus, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    scores = tmp_path / "s.safetensors"
    assert main(["importance", str(tiny_model_dir), "--data", str(text_corpus), "--samples", "8", "--seq-len", "32",
                 "--val-samples", "2", "--batch-size", "4", "--out", str(scores)]) == 0
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_model_dir), "--scores", str(scores), "--drop-layers", "2-3", "--hidden", "48",
                 "--ffn", "64", "--heads-per-group", "1", "--out", str(out)]) == 0
    back = AutoModelForCausalLM.from_pretrained(out)
    assert shape_of(back.config) == Shape(2, 48, 64, 2, 2, 16)
    plain_norm = back.model.norm.weight
    assert main(["prune", str(tiny_model_dir), "--scores", str(scores), "--drop-layers", "2-3", "--hidden", "48",
                 "--ffn", "64", "--heads-per-group", "1", "--rescale-norms", "--compensate-mlp",
                 "--out", str(out)]) == 0
    both = AutoModelForCausalLM.from_pretrained(out)
    s = ImportanceScores.load(scores)
    factor = norm_factor(s, torch.sort(s.hidden, descending=True, stable=True).indices[:48])
    assert factor != 1 and both.config.mlp_bias and both.model.layers[0].mlp.down_proj.bias.abs().max() > 0
    torch.testing.assert_close(both.model.norm.weight, plain_norm * factor)
    capsys.readouterr()
    # errors come before any weights are read: a config-only folder of another shape, a shape that cannot be
    config_only = tmp_path / "other"
    config_only.mkdir()
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (config_only / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    assert main(["prune", str(config_only), "--scores", str(scores), "--out", str(tmp_path / "x")]) == 2
    assert "scores were computed on another model" in capsys.readouterr().err
    assert main(["prune", str(tiny_model_dir), "--scores", str(scores), "--kv-groups", "3",
                 "--out", str(tmp_path / "x")]) == 2
    assert "cannot grow attention" in capsys.readouterr().err
    mistral_dir = tmp_path / "mistral"
    mistral_dir.mkdir()
    (mistral_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    mistral_scores = compute_importance(build_tiny_model("mistral"), IDS[:2]).save(tmp_path / "m.safetensors")
    assert main(["prune", str(mistral_dir), "--scores", str(mistral_scores), "--compensate-mlp",
                 "--out", str(tmp_path / "x")]) == 2  # config only: refused before any weights are read
    assert "only llama, nemotron support it" in capsys.readouterr().err
    (config_only / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    assert main(["candidates", str(config_only), "--target-params", "10K"]) == 2
    assert "unsupported architecture" in capsys.readouterr().err


def test_llama_hidden_must_divide_by_heads():
    model = build_tiny_model("llama")
    with pytest.raises(UserError, match="multiple of the query heads"):
        prune(model, shuffled_scores(model), Shape(4, 42, 128, 4, 2, 16))  # LlamaConfig rejects 42 / 4 heads


# ---- off-by-default options: norm rescaling and FLAP-style MLP compensation ----

CALIB = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(3))
EVAL = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(4))  # same distribution, other tokens


def teacher_kl(teacher_logits, logits) -> float:
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), log_target=True,
                    reduction="batchmean").item()


def with_width(full: Shape, **axes) -> Shape:
    return Shape(**{**vars(full), **axes})


def test_rescale_norms_restores_the_norm_scale_after_hidden_pruning():
    model = build_tiny_model("llama", tie_word_embeddings=False)
    with torch.no_grad():  # a skewed residual stream: channels 0-15 carry 16x the energy of the others
        skew = torch.ones(64)
        skew[:16] = 4.0
        model.model.embed_tokens.weight.mul_(skew)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(skew[:, None])
            layer.mlp.down_proj.weight.mul_(skew[:, None])
    s = compute_importance(model, CALIB, batch_size=8)
    full = shape_of(model.config)
    shape = with_width(full, hidden=32)
    plain, rescaled = prune(model, s, shape), prune(model, s, shape, rescale_norms=True)
    hid = torch.sort(s.hidden, descending=True, stable=True).indices[:32]
    factor = (s.hidden_energy[hid].double().mean() / s.hidden_energy.double().mean()).sqrt().item()
    assert factor > 1.2  # the kept channels are the loud ones
    for name in ("model.norm.weight", "model.layers.2.post_attention_layernorm.weight"):
        torch.testing.assert_close(rescaled.state_dict()[name], plain.state_dict()[name] * factor)
    torch.testing.assert_close(rescaled.model.layers[1].self_attn.q_proj.weight,
                               plain.model.layers[1].self_attn.q_proj.weight, rtol=0, atol=0)
    with torch.no_grad():
        t, a, b = model(EVAL).logits, plain(EVAL).logits, rescaled(EVAL).logits
    kl_plain, kl_rescaled = teacher_kl(t, a), teacher_kl(t, b)
    # measured: KL 0.143 -> 0.126, logit std 0.113 -> 0.152 (teacher 0.161)
    assert kl_rescaled < 0.97 * kl_plain
    assert abs(b.std() - t.std()) < 0.5 * abs(a.std() - t.std())
    with torch.no_grad():  # full shape: factor 1, still exact
        assert (prune(model, s, full, rescale_norms=True)(EVAL).logits - t).abs().max() < 1e-5


def test_rescale_norms_keeps_nemotron_layernorm1p_offset_and_qwen3_qk_norms():
    for family in ("nemotron", "qwen3"):
        model = build_tiny_model(family)
        s = compute_importance(model, CALIB[:4], batch_size=4)
        s.hidden_energy = torch.linspace(2.0, 0.5, 64)  # known energies; ranking keeps channels in hidden order
        s.hidden = torch.linspace(1.0, 0.0, 64)
        shape = with_width(shape_of(model.config), hidden=32)
        factor = (s.hidden_energy[:32].mean() / s.hidden_energy.mean()).sqrt().item()
        plain, rescaled = prune(model, s, shape), prune(model, s, shape, rescale_norms=True)
        w, w2 = plain.model.layers[0].input_layernorm, rescaled.model.layers[0].input_layernorm
        if family == "nemotron":  # LayerNorm1P scales by weight + 1: the stored weight is (w + 1) * f - 1
            torch.testing.assert_close(w2.weight + 1, (w.weight + 1) * factor)
            torch.testing.assert_close(w2.bias, w.bias, rtol=0, atol=0)
        else:
            torch.testing.assert_close(w2.weight, w.weight * factor)
            torch.testing.assert_close(rescaled.model.layers[0].self_attn.q_norm.weight,
                                       model.model.layers[0].self_attn.q_norm.weight, rtol=0, atol=0)


def test_compensate_mlp_folds_removed_neurons_into_down_bias(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = build_tiny_model("llama")
    with torch.no_grad():  # up = gate: silu(g) * g has a clearly positive mean, as trained MLPs' neurons often do
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.copy_(layer.mlp.gate_proj.weight)
    s = compute_importance(model, CALIB, batch_size=8)
    full = shape_of(model.config)
    shape = with_width(full, ffn=64)
    plain, comp = prune(model, s, shape), prune(model, s, shape, compensate_mlp=True)
    # hand computation on layer 1: mean of each removed neuron's down_proj input times its down_proj column
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(CALIB)
    handle.remove()
    mean = torch.cat(seen).double().mean((0, 1))
    removed = torch.sort(s.neurons[1], descending=True, stable=True).indices[64:]
    hid = torch.sort(s.hidden, descending=True, stable=True).indices
    expected = model.model.layers[1].mlp.down_proj.weight.double()[hid][:, removed] @ mean[removed]
    torch.testing.assert_close(comp.model.layers[1].mlp.down_proj.bias.double(), expected, rtol=1e-4, atol=1e-6)
    mlp = comp.model.layers[1].mlp
    assert mlp.gate_proj.bias.abs().max() == 0 == mlp.up_proj.bias.abs().max()
    with torch.no_grad():
        t = model(EVAL).logits
        kl_plain, kl_comp = teacher_kl(t, plain(EVAL).logits), teacher_kl(t, comp(EVAL).logits)
    assert kl_comp < 0.8 * kl_plain, (kl_plain, kl_comp)  # measured: 0.0197 -> 0.0093
    out = save_pruned(comp, tiny_tokenizer, tmp_path / "comp")
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.config.mlp_bias and sum(p.numel() for p in back.parameters()) == count_shape(back.config, shape)
    with torch.no_grad():
        torch.testing.assert_close(back(EVAL).logits, comp(EVAL).logits, rtol=0, atol=1e-6)
        assert (prune(model, s, full, compensate_mlp=True)(EVAL).logits - t).abs().max() < 1e-5


def test_options_refuse_old_scores_and_families_without_mlp_bias(tmp_path):
    model = build_tiny_model("llama")
    s = compute_importance(model, IDS[:2], batch_size=2)
    s.hidden_energy = s.neuron_mean = None  # a scores file written before these statistics existed
    old = ImportanceScores.load(s.save(tmp_path / "old.safetensors"))
    shape = with_width(shape_of(model.config), hidden=32)
    assert old.hidden_energy is None and prune(model, old, shape) is not None  # still loads and prunes
    with pytest.raises(UserError, match="recompute them with `minitron importance`"):
        prune(model, old, shape, rescale_norms=True)
    with pytest.raises(UserError, match="neuron_mean"):
        prune(model, old, shape, compensate_mlp=True)
    mistral = build_tiny_model("mistral")
    with pytest.raises(UserError, match="only llama, nemotron support it"):
        prune(mistral, compute_importance(mistral, IDS[:2], batch_size=2), shape, compensate_mlp=True)


def test_kept_heads_is_prunes_choice():
    """By hand: per KV group the best groups, in them the best query heads; dropped layers keep none. And the
    pruned model's q_proj holds exactly the rows of the heads kept_heads names."""
    from minitron.prune import kept_heads

    model = build_tiny_model("llama")  # 4 layers, 4 query heads in 2 KV groups, head_dim 16
    s = shuffled_scores(model)
    s.kv_groups = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.5, 0.6], [0.7, 0.3]])
    s.heads = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.4, 0.6, 0.8, 0.2], [0.3, 0.1, 0.2, 0.4], [0.6, 0.5, 0.1, 0.9]])
    s.layer_loss = torch.tensor([0.5, 0.1, 0.9, 0.2])  # 2 layers kept: 0 and 2
    shape = Shape(layers=2, hidden=64, ffn=128, heads=1, kv_heads=1, head_dim=16)
    kept = kept_heads(s, shape)
    assert kept.tolist() == [[False, False, True, False], [False] * 4, [False, False, False, True], [False] * 4]
    pruned = prune(model, s, shape)
    hidden = torch.sort(s.hidden, descending=True, stable=True).indices  # prune orders channels by importance
    for new, (old, head) in enumerate([(0, 2), (2, 3)]):
        rows = model.model.layers[old].self_attn.q_proj.weight[head * 16:(head + 1) * 16][:, hidden]
        assert torch.equal(pruned.model.layers[new].self_attn.q_proj.weight, rows)
    assert kept_heads(s, Shape(4, 64, 128, 4, 2, 16), drop_layers=(1, 2)).tolist() == [
        [True] * 4, [False] * 4, [False] * 4, [True] * 4]


def test_random_init_keeps_the_pruned_architecture_with_fresh_seeded_weights():
    """The from-scratch baseline: the pruned shape exactly, the family's own init (near-uniform predictions: LM loss
    ~ ln(vocab) on any tokens), reproducible by seed, and the caller's RNG stream untouched."""
    from minitron.importance import lm_loss
    from minitron.prune import random_init

    model = build_tiny_model("llama")
    pruned = prune(model, shuffled_scores(model), Shape(3, 48, 96, 2, 1, 16))
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    fresh = random_init(pruned, seed=1)
    assert torch.equal(torch.rand(3), expected_next)
    assert fresh.config.to_dict() == pruned.config.to_dict()
    new, old = fresh.state_dict(), pruned.state_dict()
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in old.items()}
    for name, t in new.items():
        if t.ndim == 2:  # every matrix is new (norm weights start at ones in both)
            assert not torch.allclose(t, old[name]), name
    assert fresh.get_output_embeddings().weight is fresh.get_input_embeddings().weight  # still tied
    assert all(torch.equal(t, random_init(pruned, seed=1).state_dict()[k]) for k, t in new.items())
    assert not torch.equal(new["model.layers.0.mlp.up_proj.weight"],
                           random_init(pruned, seed=2).state_dict()["model.layers.0.mlp.up_proj.weight"])
    assert lm_loss(fresh, IDS, batch_size=2) == pytest.approx(math.log(model.config.vocab_size), abs=0.05)
