"""Distillation losses that never hold full-vocabulary logits for the whole batch.

`fused_kd_loss` takes the *final hidden states* of student and teacher and their `lm_head` weights, and walks over
the tokens in chunks: per chunk it computes both logit blocks, the loss and the gradient of the loss with respect to
the student logits, and folds that gradient straight into d(hidden) and d(lm_head weight). Peak extra memory is a few
[chunk, vocab] fp32 blocks instead of [batch * seq, vocab] logits for two models plus their softmaxes and gradients
(~25 GiB at batch 16 x 1024, vocab 49152). Gradients are computed in the forward pass (the backward only scales them),
so no logits are recomputed.

Loss (per token i with mask m_i, n = sum m):
  KL    = tau^2 / n * sum_i m_i * KL(softmax(t_i / tau) || softmax(s_i / tau))    forward KL, teacher -> student
  CE    = 1 / n_ce * sum_i -log softmax(s_i)[y_i]                                  over tokens with a label
  total = kd_weight * KL + ce_weight * CE
The tau^2 factor (Hinton et al.) keeps gradient magnitudes independent of tau; at the papers' tau = 1 it is 1.
With `top_k`, both distributions are restricted to the teacher's k largest logits and renormalised over them
("sparse KD"): the student is only pulled towards the teacher's ranking of plausible tokens, and mass outside the
top-k is ignored rather than pushed to zero. Gradients outside the top-k are exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minitron.config import DistillConfig

IGNORE = -100  # label of positions without a next token (the last position of each block, padding)


@dataclass(frozen=True)
class KDLossConfig:
    """The loss's knobs; their defaults are the run config's (one declaration, in minitron/config.py)."""

    temperature: float = DistillConfig.kd_temperature  # softmax temperature of the KL (papers: 1)
    top_k: int | None = DistillConfig.kd_top_k  # restrict the KL to the teacher's top-k logits (None = all)
    kd_weight: float = 1.0  # weight of the logit KL (0 = plain LM training, used by teacher correction)
    ce_weight: float = DistillConfig.ce_weight  # weight of next-token CE on the student (papers: 0)
    chunk_tokens: int = DistillConfig.chunk_tokens  # peak extra memory ~ 6 * chunk_tokens * vocab * 4 bytes


def _chunk_math(zs: torch.Tensor, zt: torch.Tensor | None, labels: torch.Tensor, mask: torch.Tensor,
                tau: float, top_k: int | None, kd_scale: torch.Tensor, ce_scale: torch.Tensor, use_ce: bool):
    """One chunk: fp32 student logits zs [c, V], teacher logits zt [c, V] (or None), labels [c], mask [c] (float).
    Returns (sum of per-token KL, sum of per-token CE, d loss / d zs) where the scales already hold the weights and
    the 1/n normalisation (0-dim tensors, so a changing token count does not recompile). Pure tensor math so
    torch.compile can fuse it into a few kernels."""
    dz = torch.zeros_like(zs)
    kl_sum = zs.new_zeros(())
    if zt is not None:
        if top_k is not None:
            idx = zt.topk(top_k, dim=-1).indices
            s, t = zs.gather(-1, idx), zt.gather(-1, idx)
        else:
            s, t = zs, zt
        log_q = F.log_softmax(s / tau, dim=-1)
        log_p = F.log_softmax(t / tau, dim=-1)
        p = log_p.exp()
        kl_sum = ((p * (log_p - log_q)).sum(-1) * mask).sum()
        # d/ds [tau^2 * KL(p || softmax(s / tau))] = tau * (q - p)
        g = (log_q.exp() - p) * (mask * (tau * kd_scale)).unsqueeze(-1)
        dz = dz.scatter(-1, idx, g) if top_k is not None else g
    valid = (labels != IGNORE).to(zs.dtype) * mask
    safe = labels.clamp(min=0).unsqueeze(-1)
    log_s = F.log_softmax(zs, dim=-1)
    ce_sum = (-log_s.gather(-1, safe).squeeze(-1) * valid).sum()
    if use_ce:
        g = log_s.exp().scatter_add(-1, safe, -torch.ones_like(safe, dtype=zs.dtype))
        dz = dz + g * (valid * ce_scale).unsqueeze(-1)
    return kl_sum, ce_sum, dz


_compiled = {}


def _math_for(device: torch.device):
    """The chunk math, compiled on CUDA (eager elementwise chains over [chunk, vocab] dominate otherwise)."""
    if device.type != "cuda":
        return _chunk_math
    if "cuda" not in _compiled:
        _compiled["cuda"] = torch.compile(_chunk_math, dynamic=False)
    return _compiled["cuda"]


class _FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, ht, wt, labels, mask, cfg: KDLossConfig, compute_dtype, need_grad: bool):
        n_tok = hs.shape[0]
        n_kd = mask.sum().clamp(min=1.0)
        n_ce = ((labels != IGNORE).float() * mask).sum().clamp(min=1.0)
        kd_scale, ce_scale = cfg.kd_weight / n_kd, cfg.ce_weight / n_ce
        math = _math_for(hs.device)
        ws_c = ws.to(compute_dtype)
        wt_c = wt.to(compute_dtype) if wt is not None else None
        grad_h = torch.empty_like(hs) if need_grad else None
        grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device) if need_grad else None
        kl_total = hs.new_zeros((), dtype=torch.float32)
        ce_total = hs.new_zeros((), dtype=torch.float32)
        for a in range(0, n_tok, cfg.chunk_tokens):
            b = min(a + cfg.chunk_tokens, n_tok)
            h_c = hs[a:b].to(compute_dtype)
            zs = (h_c @ ws_c.t()).float()
            zt = (ht[a:b].to(compute_dtype) @ wt_c.t()).float() if ht is not None else None
            kl_c, ce_c, dz = math(zs, zt, labels[a:b], mask[a:b], cfg.temperature, cfg.top_k, kd_scale, ce_scale,
                                  cfg.ce_weight != 0)
            kl_total += kl_c
            ce_total += ce_c
            if need_grad:
                dz_c = dz.to(compute_dtype)
                grad_h[a:b] = (dz_c @ ws_c).to(hs.dtype)
                grad_w += (dz_c.t() @ h_c).float()
        kl = kl_total * (cfg.temperature ** 2) / n_kd
        ce = ce_total / n_ce
        loss = (cfg.kd_weight * kl if ht is not None else kl * 0) + cfg.ce_weight * ce
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(ws.dtype))
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), *([None] * 7)


def fused_kd_loss(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor | None, wt: torch.Tensor | None,
                  labels: torch.Tensor, mask: torch.Tensor | None = None, cfg: KDLossConfig | None = None,
                  compute_dtype: torch.dtype | None = None):
    """(loss, kl, ce) from flattened hidden states hs [N, Ds] / ht [N, Dt] and lm_head weights ws [V, Ds] /
    wt [V, Dt]. `ht=None` gives the CE-only objective (teacher correction). kl and ce are detached, for logging.
    `compute_dtype` is the matmul dtype (default: the autocast dtype when autocast is on, else hs.dtype); the
    softmax math is always fp32. Differentiable in hs and ws."""
    cfg = cfg or KDLossConfig()
    if compute_dtype is None:
        dev = hs.device.type
        compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hs.dtype
    mask = torch.ones(hs.shape[0], device=hs.device) if mask is None else mask.to(torch.float32)
    need_grad = torch.is_grad_enabled() and (hs.requires_grad or ws.requires_grad)
    with torch.autocast(hs.device.type, enabled=False):
        return _FusedKD.apply(hs, ws, ht, wt, labels, mask, cfg, compute_dtype, need_grad)


def reference_kd_loss(zs: torch.Tensor, zt: torch.Tensor | None, labels: torch.Tensor, mask: torch.Tensor | None,
                      cfg: KDLossConfig | None = None):
    """The same loss from full logits with plain autograd: the specification `fused_kd_loss` is tested against,
    and the naive baseline of the throughput benchmark."""
    cfg = cfg or KDLossConfig()
    mask = torch.ones(zs.shape[0], device=zs.device) if mask is None else mask.float()
    zs = zs.float()
    kl = zs.new_zeros(())
    if zt is not None:
        zt = zt.float()
        if cfg.top_k is not None:
            idx = zt.topk(cfg.top_k, dim=-1).indices
            zs_k, zt_k = zs.gather(-1, idx), zt.gather(-1, idx)
        else:
            zs_k, zt_k = zs, zt
        per_tok = F.kl_div(F.log_softmax(zs_k / cfg.temperature, -1), F.log_softmax(zt_k / cfg.temperature, -1),
                           log_target=True, reduction="none").sum(-1)
        kl = cfg.temperature ** 2 * (per_tok * mask).sum() / mask.sum().clamp(min=1)
    ce_labels = torch.where(mask.bool(), labels, torch.full_like(labels, IGNORE))
    ce = F.cross_entropy(zs, ce_labels, ignore_index=IGNORE) if (ce_labels != IGNORE).any() else zs.new_zeros(())
    loss = (cfg.kd_weight * kl if zt is not None else 0 * kl) + cfg.ce_weight * ce
    return loss, kl.detach(), ce.detach()


class IntermediateLoss(torch.nn.Module):
    """Cosine loss between student hidden states, mapped to the teacher's width by one learned shared linear
    projection, and the teacher's hidden states at layers matched by relative depth (student layer i of L_s ↔
    teacher layer round(i * L_t / L_s)); the last layer is left to the logit loss (arXiv 2407.14679, §intermediate
    state distillation). The projection starts as the identity when widths are equal, so the loss starts at the
    plain cosine distance."""

    def __init__(self, student_layers: int, teacher_layers: int, student_hidden: int, teacher_hidden: int):
        super().__init__()
        self.pairs = [(i, round(i * teacher_layers / student_layers)) for i in range(1, student_layers)]
        self.proj = torch.nn.Linear(student_hidden, teacher_hidden, bias=False)
        if student_hidden == teacher_hidden:
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(student_hidden))

    def forward(self, student_states, teacher_states, mask: torch.Tensor) -> torch.Tensor:
        """states: tuples from `output_hidden_states` (index 0 = embeddings, i = after layer i); mask [B, T]."""
        mask = mask.float()
        total = mask.new_zeros(())
        for i, j in self.pairs:
            cos = F.cosine_similarity(self.proj(student_states[i]).float(), teacher_states[j].float(), dim=-1)
            total = total + ((1 - cos) * mask).sum() / mask.sum().clamp(min=1)
        return total / max(len(self.pairs), 1)
