"""The distillation loop on tiny CPU models: it learns (validation KL at least halves), resume repeats the
uninterrupted run bit for bit, teacher correction lowers the teacher's CE, bad input fails before any step."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model, depth_pruned, sharp_teacher

from minitron.config import CompressConfig
from minitron.data import TokenData
from minitron.distill import DistillConfig, correct_teacher, distill
from minitron.errors import UserError

SEQ = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def token_data(n_train=1200, n_val=8, seed=0) -> TokenData:
    g = torch.Generator().manual_seed(seed)
    train, val = torch.randint(0, 256, (n_train, SEQ), generator=g), torch.randint(0, 256, (n_val, SEQ), generator=g)
    return TokenData(train=train, val=val, documents=1, tokens=train.numel() + val.numel(), seq_len=SEQ, source="t")


def small_cfg(steps: int, **kw) -> DistillConfig:
    base = dict(tokens=steps * 4 * SEQ, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_frac=0.05, eval_every=10**6,
                val_batches=2, checkpoint_every=10**6, log_every=1, progress=False)
    base.update(kw)
    return DistillConfig(**base)


def test_distillation_halves_validation_kl(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    teacher = sharp_teacher()
    student = depth_pruned(teacher)
    records = []
    result = distill(teacher, student, token_data(), small_cfg(300, lr=1e-2, eval_every=100), out_dir=tmp_path / "out",
                     tokenizer=tiny_tokenizer, callback=records.append)
    assert result.steps == 300 and result.tokens == 300 * 4 * SEQ
    assert result.last_val_kl <= 0.5 * result.first_val_kl, (result.first_val_kl, result.last_val_kl)
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 100, 200, 300]
    assert all({"step", "tokens", "val_kl", "val_ce", "lr", "tokens_per_s"} <= r.keys() for r in lines)
    assert lines[-1]["val_kl"] == pytest.approx(result.last_val_kl)
    train = [r for r in records if "loss" in r]
    assert len(train) == 300 and train[-1]["tokens"] == result.tokens
    # the saved folder is a plain transformers model that reproduces the trained student
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = token_data().val[:2]
    torch.testing.assert_close(reloaded(ids).logits, student(ids).logits)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


@pytest.mark.parametrize("extra", [{}, {"intermediate_weight": 1.0, "grad_accum": 2, "kd_top_k": 8}],
                         ids=["kd", "intermediate+accum+topk"])
def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path, extra):
    def run(out, steps_budget=12, resume=False, stop_after=None):
        torch.manual_seed(0)
        teacher = sharp_teacher()
        student = depth_pruned(teacher)
        losses = []
        cfg = small_cfg(steps_budget, checkpoint_every=4, eval_every=4, **extra)
        cfg.tokens *= cfg.grad_accum

        def cb(rec):
            if "loss" in rec:
                losses.append(rec["loss"])
                if stop_after is not None and rec["step"] == stop_after:
                    raise KeyboardInterrupt  # a crash between checkpoints
        try:
            distill(teacher, student, token_data(), cfg, out_dir=out, callback=cb, resume=resume)
        except KeyboardInterrupt:
            pass
        return losses

    full = run(tmp_path / "a")
    interrupted = run(tmp_path / "b", stop_after=10)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-4.pt", "step-8.pt"]
    resumed = run(tmp_path / "b", resume=True)
    assert interrupted == full[:10]
    assert resumed == full[8:]  # bit-equal floats from step 9 on
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 4, 8, 12]
    assert torch.load(tmp_path / "b" / "checkpoints" / "step-8.pt", weights_only=True)["data"]["micro_batches"] \
        == 8 * (extra.get("grad_accum", 1))


def test_correct_teacher_lowers_validation_ce(tmp_path):
    # text with structure (a repeating pattern) that a random model does not know yet
    pattern = torch.arange(0, 48) % 24
    blocks = torch.stack([pattern.roll(i)[:SEQ] for i in range(40)])
    data = TokenData(train=blocks[:32], val=blocks[32:], documents=1, tokens=blocks.numel(), seq_len=SEQ, source="p")
    teacher = build_tiny_model("llama", seed=3)
    result = correct_teacher(teacher, data, small_cfg(40), out_dir=tmp_path / "c")
    assert result.first_val_kl is None
    assert result.val_loss_after < 0.5 * result.val_loss_before
    assert (tmp_path / "c" / "model.safetensors").is_file()


def test_bad_inputs_fail_before_any_step(tmp_path):
    teacher = sharp_teacher()
    with pytest.raises(UserError, match="vocabularies differ"):
        distill(teacher, build_tiny_model("llama", vocab_size=300), token_data(), small_cfg(4), out_dir=tmp_path)
    with pytest.raises(UserError, match="smaller than one optimizer step"):
        distill(teacher, depth_pruned(teacher), token_data(), small_cfg(4, tokens=10), out_dir=tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_config_from_run_config():
    run = CompressConfig(distill_tokens="2M", batch_size=4, lr=3e-4, kd_top_k=64, intermediate_weight=0.5)
    cfg = DistillConfig.from_run_config(run, progress=False)
    assert (cfg.tokens, cfg.batch_size, cfg.lr, cfg.kd_top_k, cfg.intermediate_weight, cfg.progress) == (
        2_000_000, 4, 3e-4, 64, 0.5, False)
    assert DistillConfig.from_run_config(run, tokens_field="correction_tokens").tokens == 1_000_000


def test_activation_checkpointing_gives_the_same_training(tmp_path):
    """Recomputing layers in backward changes memory, not the math: the same validation KL as without it."""
    kls = {}
    for ck in (False, True):
        teacher = sharp_teacher()
        kls[ck] = distill(teacher, depth_pruned(teacher), token_data(), small_cfg(6, activation_checkpointing=ck),
                          out_dir=tmp_path / str(ck)).last_val_kl
    assert kls[True] == pytest.approx(kls[False], rel=1e-5)


def test_tokens_per_s_is_never_negative(tmp_path):
    """The first validation (here 16 batches, far longer than one step) ran before the training clock started and
    was once subtracted from it: the first steps reported negative throughput."""
    teacher = sharp_teacher()
    records = []
    distill(teacher, depth_pruned(teacher), token_data(n_val=64), small_cfg(3, val_batches=16),
            out_dir=tmp_path / "out", callback=records.append)
    rates = [r["tokens_per_s"] for r in records if "loss" in r]
    assert len(rates) == 3 and all(r > 0 for r in rates), rates


def test_a_finished_run_resumes_without_training(tmp_path):
    """The last step is checkpointed, so a stage that trained to the end but failed to publish (store down) is
    resumed as finished: no step runs again and the student comes back with the trained weights."""
    teacher = sharp_teacher()
    trained = depth_pruned(teacher)
    first = distill(teacher, trained, token_data(), small_cfg(5), out_dir=tmp_path / "out")
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step-5.pt"]
    again, records = depth_pruned(sharp_teacher()), []
    second = distill(teacher, again, token_data(), small_cfg(5), out_dir=tmp_path / "out", callback=records.append,
                     resume=True)
    assert not [r for r in records if "loss" in r]  # nothing trained
    assert second.last_val_kl == pytest.approx(first.last_val_kl, rel=1e-6)
    ids = token_data().val[:2]
    torch.testing.assert_close(again(ids).logits, trained(ids).logits)
