"""The dry-run planner: every preset plans offline, the published shapes come out with exact counts, bad presets
fail in one line, and the memory model matches memory measured on CPU (activations per layer exactly, the peak of a
distillation step within 15%)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cli.main import main
from minitron.archmath import Shape, shape_of
from minitron.config import load_config_file, make_config
from minitron.cost import ShapeCost, layer_activation_bytes, measured_mfu, train_flops, training_memory
from minitron.errors import UserError
from minitron.plan import format_plan, make_plan, on_nodes

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = sorted(p.name for p in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_plans_offline(preset, capsys):
    assert main(["run", "--config", str(CONFIGS / preset), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "distillation" in out and "GPU-h" in out and "peak/GPU" in out


def test_width_preset_plan(capsys):
    assert main(["run", "--config", str(CONFIGS / "llama-3.1-8b-minitron-4b-width.yaml"), "--dry-run",
                 "--gpu", "h200-141gb", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["student"] == {"shape": "L32-H3072-F9216-A32-KV8", "params": 4_512_746_496,
                               "non_embedding": 4_512_746_496 - 2 * 128256 * 3072}
    assert plan["teacher"]["params"] == 8_030_261_248
    distill = next(s for s in plan["stages"] if s["name"].endswith("distillation"))
    assert distill["tokens"] == 94 * 10**9 and distill["gpus"] >= 8 and distill["gpu_hours"] > 0
    assert plan["mfu_source"].startswith("default") or "bench" in plan["mfu_source"]


def test_depth_and_iterative_presets():
    depth = make_plan(load_config_file(CONFIGS / "llama-3.1-8b-minitron-4b-depth.yaml"), root="/nonexistent")
    assert depth.student.shape.layers == 16 and depth.student.params == 4_540_469_248
    iterative = make_plan(load_config_file(CONFIGS / "nemotron-4-15b-minitron.yaml"), root="/nonexistent")
    distills = [s for s in iterative.stages if s.name.endswith("distillation")]
    assert [s.model_out.params for s in distills] == [8_271_699_968, 4_190_509_056]
    # step 2 prunes and distils from step 1's student, not from the 15B teacher
    step2_importance = next(s for s in iterative.stages if s.name == "2 step 2/2: importance")
    assert step2_importance.model_in.params == 8_271_699_968
    nemo = make_plan(load_config_file(CONFIGS / "mistral-nemo-minitron-8b.yaml"), root="/nonexistent")
    assert nemo.student.shape == Shape(40, 4096, 11520, 32, 8, 128) and nemo.student.params == 8_414_105_600


def test_flops_by_hand():
    cfg = make_config({"teacher": "llama-3.1-8b"})
    from minitron.models import load_config

    m = ShapeCost(load_config("llama-3.1-8b"), Shape(32, 3072, 9216, 32, 8, 128))
    matmul = 4_512_746_496 - 128256 * 3072  # the input embedding does no matmul
    assert train_flops(m, 1000, 8192) == 1000 * (6 * matmul + 12 * 32 * 4096 * 8192)
    assert cfg.seq_len == 1024


EXPLICIT_OFF = ("target_hidden=null", "target_ffn=null")  # the width preset's own explicit shape


@pytest.mark.parametrize("overrides,message", [
    (["target_shapes=L32-H3072-F9216-A30-KV8", *EXPLICIT_OFF], "30 query heads are not a multiple of 8 KV groups"),
    (["target_hidden=5000"], "hidden 5000 must be between 1 and the parent model's 4096"),
    (["target_shapes=H3072,H2048", "target_params=8B,6B,4B", *EXPLICIT_OFF], "target_shapes has 2 steps but target_params has 3"),
    ([*EXPLICIT_OFF, "target_params=100M"], "below the smallest candidate"),
    (["drop_layers=20-40", *EXPLICIT_OFF], "drop_layers 20-40 must lie within"),
    (["target_shapes=L32-X9"], "cannot read shape 'L32-X9'"),
])
def test_bad_presets_fail_in_one_line(overrides, message, capsys):
    argv = ["run", "--config", str(CONFIGS / "llama-3.1-8b-minitron-4b-width.yaml"), "--dry-run"]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_help_config_lists_every_field(capsys):
    from minitron.config import CompressConfig

    assert main(["run", "--help-config"]) == 0
    out = capsys.readouterr().out
    for name, f in CompressConfig.model_fields.items():
        assert f"{name}: " in out and f.description in out


def test_mfu_from_benchmark_results(tmp_path):
    assert measured_mfu(tmp_path) is None
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench/results/distill_throughput-h100.json").write_text(json.dumps(
        {"rows": [{"mfu": 0.31}, {"mfu": 0.42}, {"name": "x"}]}))
    mfu, source = measured_mfu(tmp_path)
    assert mfu == 0.42 and "distill_throughput-h100.json" in source
    plan = make_plan(make_config({"teacher": "llama-3.1-8b", "target_hidden": 3072}), root=tmp_path)
    assert plan.mfu == 0.42


# ----------------------------------------------------------------------------------------------------------------
# the memory model against measurement


class PeakMemory(TorchDispatchMode):
    """Measures the peak bytes of live tensor storage: every op's outputs are registered by storage (views share
    one), a storage leaves when it is freed (weak reference), tensors that exist beforehand are passed in. This sees
    the autograd saved tensors, autocast's weight cache, gradients and optimizer state; it cannot see allocator
    slack, which the plan covers by using only 90% of a GPU."""

    def __init__(self, *existing):
        super().__init__()
        self.live: dict = {}
        self.peak = 0
        for t in existing:
            self._add(t)
        self._update()

    def _add(self, t):
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            self.live[StorageWeakRef(storage)] = storage.nbytes()

    def _update(self):
        self.live = {k: v for k, v in self.live.items() if not k.expired()}
        self.peak = max(self.peak, sum(self.live.values()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._add(t)
        self._update()
        return out


def llama(hidden, ffn, layers=4, vocab=2048):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("autocast", [False, True])
def test_layer_activations_match_saved_tensors(autocast):
    """Bytes one decoder layer saves for backward, counted by storage through saved-tensor hooks."""
    model = llama(128, 384).train()
    batch, seq = 4, 256
    ids = torch.randint(0, 2048, (batch, seq))
    layer = model.model.layers[1]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hidden = model.model.embed_tokens(ids)
        rope = model.model.rotary_emb(hidden, torch.arange(seq)[None])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(hidden, position_embeddings=rope, attention_mask=None, position_ids=torch.arange(seq)[None])
    # rotary cos/sin are shared by all layers; autocast's bf16 weight copies are counted once per model
    per_token = sum(v for k, v in saved.items() if k not in params and v >= batch * seq) / (batch * seq)
    weight_casts = 2 * sum(p.numel() for p in layer.parameters() if p.ndim == 2) / (batch * seq) if autocast else 0
    m = ShapeCost(model.config, shape_of(model.config))
    assert per_token - weight_casts == pytest.approx(layer_activation_bytes(m, autocast), rel=0.01)


@pytest.mark.parametrize("autocast,batch,seq,chunk,accum", [
    (False, 4, 256, 256, 1), (True, 4, 256, 256, 1), (False, 4, 256, 256, 2), (True, 2, 512, 1024, 1)])
def test_distillation_peak_within_15_percent(autocast, batch, seq, chunk, accum):
    """One optimizer step as the distill engine takes it (teacher decoder under no_grad, student decoder + fused
    lm_head/KL loss under autocast, clipping, AdamW fused as on CUDA), peak measured on the second step (optimizer
    state exists) and compared with the plan's estimate."""
    loss_mod = pytest.importorskip("minitron.distill.loss")
    torch.set_num_threads(1)
    teacher, student = llama(192, 512), llama(128, 384)
    teacher.to(torch.bfloat16 if autocast else torch.float32).eval().requires_grad_(False)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=True)
    ids = torch.randint(0, 2048, (batch, seq))
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1).flatten()
    kd = loss_mod.KDLossConfig(chunk_tokens=chunk)

    def step():
        for _ in range(accum):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                t_hidden = teacher.model(ids).last_hidden_state
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                hidden = student.model(ids).last_hidden_state
                loss, _, _ = loss_mod.fused_kd_loss(hidden.flatten(0, 1), student.lm_head.weight,
                                                    t_hidden.flatten(0, 1), teacher.lm_head.weight, labels, None, kd)
                (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    with PeakMemory(*student.parameters(), *teacher.parameters(), *student.buffers(), *teacher.buffers(), ids,
                    labels, *state) as measured:
        step()
    estimate = training_memory(ShapeCost(student.config, shape_of(student.config)),
                               ShapeCost(teacher.config, shape_of(teacher.config)), batch * seq, grad_accum=accum,
                               autocast=autocast, chunk=chunk)
    assert estimate.peak == pytest.approx(measured.peak, rel=0.15)


def test_fsdp_shards_only_the_student_states():
    from minitron.models import load_config

    config = load_config("llama-3.1-8b")
    student, teacher = ShapeCost(config, Shape(32, 3072, 9216, 32, 8, 128)), ShapeCost(config, shape_of(config))
    one = training_memory(student, teacher, 8192, chunk=1024)
    eight = training_memory(student, teacher, 8192, chunk=1024, shards=8)
    assert eight.parts["adamw"] == one.parts["adamw"] // 8 and eight.parts["weights"] == one.parts["weights"] // 8
    assert eight.parts["activations"] == one.parts["activations"] and eight.parts["teacher"] == one.parts["teacher"]
    assert eight.peak < one.peak
    with pytest.raises(UserError, match="unknown GPU"):
        make_plan(make_config({"teacher": "llama-3.1-8b", "target_hidden": 3072}), gpu="tpu")


@pytest.mark.parametrize("logits", [False, True])
def test_forward_stage_estimate_is_close_and_conservative(logits):
    """Importance and evaluation: a bf16 forward without autograd (with the LM loss when logits are scored)."""
    from minitron.cost import forward_memory

    torch.set_num_threads(1)
    model = llama(128, 384).to(torch.bfloat16).eval()
    ids = torch.randint(0, 2048, (8, 256))
    with torch.no_grad(), PeakMemory(*model.parameters(), *model.buffers(), ids) as measured:
        model(ids, labels=ids) if logits else model.model(ids)
    estimate = forward_memory(ShapeCost(model.config, shape_of(model.config)), ids.numel(), logits=logits).peak
    assert measured.peak <= estimate <= 1.2 * measured.peak


def test_iterative_search_prunes_from_the_previous_pick():
    plan = make_plan(make_config({"teacher": "smollm2-135m", "target_params": "100M,70M", "tolerance": 0.05}),
                     root="/nonexistent")
    searches = [s for s in plan.stages if s.name.endswith("search")]
    assert len(searches) == 2
    first, second = searches
    assert abs(first.model_out.params - 100e6) <= 5e6 and abs(second.model_out.params - 70e6) <= 3.5e6
    assert second.model_in.shape == first.model_out.shape  # step 2 starts from step 1's student
    for a, b in zip(second.model_out.shape.__dict__.values(), first.model_out.shape.__dict__.values(), strict=True):
        assert a <= b


PAPER_PRESETS = ("llama-3.1-8b-minitron-4b-width.yaml", "llama-3.1-8b-minitron-4b-depth.yaml",
                 "mistral-nemo-minitron-8b.yaml", "nemotron-4-15b-minitron.yaml")


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_nodes_wall_hours_for_paper_presets(preset, capsys):
    """--nodes 4: every training stage data-parallel over all 32 GPUs (its wall-hours = GPU-hours / 32), forward
    stages on their one GPU, a stage that fits no GPU (or needs more than the 32 to shard its states) stays without
    hours; the table and the total say so."""
    argv = ["run", "--config", str(CONFIGS / preset), "--dry-run", "--gpu", "h100-80gb", "--nodes", "4"]
    assert main([*argv, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["nodes"] == 4 and plan["gpus_per_node"] == 8
    total = 0.0
    for stage, on4 in zip(plan["stages"], plan["nodes_stages"], strict=True):
        if not stage["gpu_hours"] or not stage["gpus"] or stage["gpus"] > 32:  # no fit, or sharded over more GPUs
            assert on4 == {"gpus": 0, "wall_hours": None}, stage["name"]
        elif stage["name"].endswith(("correction", "distillation")):
            assert on4["gpus"] == 32 and on4["wall_hours"] == pytest.approx(stage["gpu_hours"] / 32), stage["name"]
        else:
            assert stage["name"].endswith("importance")
            assert on4 == {"gpus": 1, "wall_hours": pytest.approx(stage["gpu_hours"])}
        total += on4["wall_hours"] or 0.0
    assert plan["nodes_wall_hours"] == pytest.approx(total) and total > 0
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "4-node GPUs" in text and "4-node wall-h" in text
    shown = f"{total:,.0f}" if total >= 100 else f"{total:.3g}"
    assert f"on 4 nodes x 8 h100-80gb (32 GPUs, backend: ray): {shown} wall-hours" in text
    if preset.startswith("nemotron"):  # step 1's 8B student with the 15B teacher fits no 80 GB GPU
        assert "not counting 4 step 1/2: distillation (no fit on these GPUs)" in text


def test_nodes_search_waves_and_uneven_batch():
    """Round 1's 4 candidates of 8 GPUs on 3 nodes: 3 side by side, then 1 (two waves); 32 nodes split the width preset's
    global batch of 1152 micro-batches unevenly over 256 GPUs, and the plan says so."""
    cfg = load_config_file(CONFIGS / "llama-3.1-8b-minitron-4b-width.yaml",
                           ["target_hidden=null", "target_ffn=null", "search_tokens=2B", "search_max_candidates=4"])
    plan = make_plan(cfg, "h100-80gb", root="/nonexistent", nodes=3)
    search = next(s for s in plan.stages if s.name == "3 search")
    assert (search.jobs, search.gpus) == (4, 8)
    assert on_nodes(plan, search) == (24, pytest.approx(2 * search.gpu_hours / 4 / 8))
    wide = make_plan(load_config_file(CONFIGS / "llama-3.1-8b-minitron-4b-width.yaml"), root="/nonexistent",
                     nodes=32)
    assert "distillation: the global batch of 1152 micro-batches does not split evenly over 256 GPUs" in \
        format_plan(wide)
    assert "does not split" not in format_plan(make_plan(load_config_file(
        CONFIGS / "llama-3.1-8b-minitron-4b-width.yaml"), root="/nonexistent", nodes=4))  # 1152 = 36 x 32
    with pytest.raises(UserError, match="--nodes 0 must be at least 1"):
        make_plan(cfg, nodes=0, root="/nonexistent")


def test_dry_run_prints_the_search_budget(capsys):
    assert main(["run", "--config", str(CONFIGS / "demo-cpu.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 4 candidates x 1 step of 8 x 128 tokens, then 2 x 2 steps: 8 steps = 8,192 tokens of the 9K setting
    assert ("4 → 2 candidates, 1.02K → 2.05K tokens each: 8,192 tokens of the search's 9,000-token budget "
            "(search_tokens = 9K") in out
    assert "an even sample of 4 of the 6 shapes" in out and "depth blocks: 30 window positions" in out
    assert main(["run", "--config", str(CONFIGS / "demo-cpu.yaml"), "--dry-run", "--json"]) == 0
    search = next(s for s in json.loads(capsys.readouterr().out)["stages"] if s["name"].endswith("search"))
    assert search["tokens"] == 8_192 + 30 * 8 * 128  # training, plus the forward passes of the depth-block sweep
