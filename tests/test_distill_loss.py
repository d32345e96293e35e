"""The fused chunked lm_head + KL loss against hand-computed values and the full-logit reference (values and
gradients), for temperature, top-k, CE and masking; the intermediate-state loss; the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch

from minitron.distill.loss import IGNORE, IntermediateLoss, KDLossConfig, fused_kd_loss, reference_kd_loss
from minitron.distill.schedule import lr_at


def _as_hidden(z: torch.Tensor):
    """(hidden [1, V], lm_head weight [V, V]) whose product is the logit row z [1, V]."""
    w = torch.zeros(z.shape[1], z.shape[1])
    w[:, 0] = z[0]
    return torch.eye(z.shape[1])[:1], w


def test_kl_matches_hand_computed_value():
    # teacher p = softmax([0, ln 3]) = [1/4, 3/4]; student q = softmax([0, 0]) = [1/2, 1/2]
    zt = torch.tensor([[0.0, math.log(3.0)]])
    zs = torch.zeros(1, 2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    (hs, ws), (ht, wt) = _as_hidden(zs), _as_hidden(zt)
    loss, kl, _ = fused_kd_loss(hs, ws, ht, wt, torch.tensor([IGNORE]))
    assert kl.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # temperature 2 with the tau^2 convention: p = softmax([0, ln3/2]) = [1/(1+√3), √3/(1+√3)], q uniform
    p1 = 1 / (1 + math.sqrt(3))
    expected_t2 = 4 * (p1 * math.log(p1 / 0.5) + (1 - p1) * math.log((1 - p1) / 0.5))
    _, kl2, _ = fused_kd_loss(hs, ws, ht, wt, torch.tensor([IGNORE]), cfg=KDLossConfig(temperature=2.0))
    assert kl2.item() == pytest.approx(expected_t2, rel=1e-6)


def test_top_k_hand_computed():
    # teacher logits [3, 2, 0, -5]; top-2 = tokens 0, 1: p = softmax([3, 2]); student logits [0, 1, 9, 9] → q over
    # the same two tokens = softmax([0, 1]); the student's mass on tokens 2 and 3 is ignored
    zt, zs = torch.tensor([[3.0, 2.0, 0.0, -5.0]]), torch.tensor([[0.0, 1.0, 9.0, 9.0]])
    p, q = torch.softmax(torch.tensor([3.0, 2.0]), 0), torch.softmax(torch.tensor([0.0, 1.0]), 0)
    expected = (p * (p / q).log()).sum().item()
    _, kl, _ = fused_kd_loss(*_as_hidden(zs), *_as_hidden(zt), torch.tensor([IGNORE]), cfg=KDLossConfig(top_k=2))
    assert kl.item() == pytest.approx(expected, rel=1e-6)


CASES = [KDLossConfig(chunk_tokens=7), KDLossConfig(temperature=2.0, chunk_tokens=5),
         KDLossConfig(top_k=5, chunk_tokens=8), KDLossConfig(ce_weight=0.5, chunk_tokens=6),
         KDLossConfig(kd_weight=0.0, ce_weight=1.0, chunk_tokens=64)]


@pytest.mark.parametrize("cfg", CASES, ids=["plain", "tau2", "top5", "ce", "ce-only"])
@pytest.mark.parametrize("with_teacher", [True, False], ids=["kd", "no-teacher"])
def test_fused_equals_full_loss_and_gradients(cfg, with_teacher):
    torch.manual_seed(0)
    n, ds, dt, vocab = 23, 12, 16, 40
    hs = torch.randn(n, ds, dtype=torch.float64).float().requires_grad_()
    ws = torch.randn(vocab, ds).requires_grad_()
    ht, wt = (torch.randn(n, dt), torch.randn(vocab, dt)) if with_teacher else (None, None)
    labels = torch.randint(0, vocab, (n,))
    labels[[4, 17]] = IGNORE
    mask = torch.ones(n)
    mask[[0, 9, 10]] = 0
    if not with_teacher and cfg.ce_weight == 0:
        cfg = KDLossConfig(ce_weight=1.0, chunk_tokens=cfg.chunk_tokens)

    loss, kl, ce = fused_kd_loss(hs, ws, ht, wt, labels, mask, cfg)
    (3.0 * loss).backward()  # a non-unit upstream gradient must scale the stored gradients
    gh, gw = hs.grad.clone(), ws.grad.clone()

    hs2, ws2 = hs.detach().clone().requires_grad_(), ws.detach().clone().requires_grad_()
    ref, kl_ref, ce_ref = reference_kd_loss(hs2 @ ws2.t(), ht @ wt.t() if with_teacher else None, labels, mask, cfg)
    (3.0 * ref).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, hs2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ws2.grad, rtol=1e-5, atol=1e-6)


def test_no_grad_path_and_bf16_close_to_fp32():
    torch.manual_seed(1)
    hs, ws, ht, wt = torch.randn(32, 8), torch.randn(50, 8), torch.randn(32, 8), torch.randn(50, 8)
    labels = torch.randint(0, 50, (32,))
    with torch.no_grad():
        loss32, _, _ = fused_kd_loss(hs, ws, ht, wt, labels)
        loss16, _, _ = fused_kd_loss(hs, ws, ht, wt, labels, compute_dtype=torch.bfloat16)
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=5e-2)


def test_intermediate_loss_layer_map_and_value():
    inter = IntermediateLoss(student_layers=2, teacher_layers=4, student_hidden=3, teacher_hidden=3)
    assert inter.pairs == [(1, 2)]
    s = [torch.zeros(1, 2, 3), torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])]
    t = [None, None, torch.tensor([[[1.0, 0, 0], [1.0, 0, 0]]])]
    # identity projection: cosines 1 and 0 → losses 0 and 1, mean over the 2 valid tokens = 0.5
    assert inter(s, t, torch.ones(1, 2)).item() == pytest.approx(0.5)
    assert inter(s, t, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.0)
    assert IntermediateLoss(15, 30, 4, 4).pairs[:2] == [(1, 2), (2, 4)]


def test_lr_schedule_values():
    # 10 steps, 2 warmup, peak 1.0, min 0.1
    lrs = [lr_at(s, 10, 2, 1.0, 0.1) for s in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)  # cosine starts at the peak
    assert lrs[6] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 4 / 8)))  # = 0.55, half way
    assert lrs[6] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lrs[1:-1], lrs[2:], strict=True))
    assert lr_at(10, 10, 2, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_at(0, 5, 0, 2.0, 0.0) == pytest.approx(2.0)
