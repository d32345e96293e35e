"""Activation-based importance (Minitron §2): forward-only statistics on a calibration set, for every prunable axis.

Forward hooks read activations as they stream past and fold them into fp32 accumulators; no activation is stored.
Per sample, an activation magnitude is aggregated over the sequence (`seq_agg`), then over samples (`batch_agg`);
the papers' default is mean over the sequence, L2 over samples.

  heads     input of o_proj viewed as [heads, head_dim]: L2 over head_dim per token, per query head
  kv groups sum of the scores of the query heads that share the group
  neurons   |input of down_proj|
  hidden    |output| of every norm feeding a linear layer (both norms of every layer and the final norm), summed
  energy    (for the optional norm rescaling) mean of (x_c / rms(x))^2 per hidden channel at the input of those norms,
            averaged over the norms; and (for the optional MLP compensation) the signed mean of each down_proj input
  layers    Block Influence 1 - cos(layer input, layer output), mean over tokens; and the increase of validation
            LM loss when the layer is skipped (a forward hook hands back the layer's input)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from minitron.archmath import Shape, shape_of
from minitron.errors import UserError
from minitron.families import LAYER_NORMS, family_of

AGGREGATIONS = ("mean", "l2", "var")


def _seq_agg(a: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, N] magnitudes (any dtype) → [B, N] fp32 per-sample scores."""
    if how == "mean":
        return torch.linalg.vector_norm(a, 1, dim=1, dtype=torch.float32) / a.shape[1]
    if how == "l2":
        return torch.linalg.vector_norm(a, 2, dim=1, dtype=torch.float32)
    return a.float().var(dim=1)


class _Accumulator:
    """Streams per-sample scores [B, N] into count, sum and sum of squares (fp64: exact over millions of tokens)."""

    def __init__(self):
        self.n, self.s, self.sq = 0, 0.0, 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        self.n += x.shape[0]
        self.s = self.s + x.sum(0)
        self.sq = self.sq + (x * x).sum(0)

    def result(self, how: str) -> torch.Tensor:
        if how == "mean":
            out = self.s / self.n
        elif how == "l2":
            out = self.sq.sqrt()
        else:
            mean = self.s / self.n
            out = (self.sq / self.n - mean * mean).clamp_min(0)
        return out.float().cpu()


@dataclass
class ImportanceScores:
    heads: torch.Tensor  # [layers, heads]
    kv_groups: torch.Tensor  # [layers, kv_heads]
    neurons: torch.Tensor  # [layers, ffn]
    hidden: torch.Tensor  # [hidden]
    layer_bi: torch.Tensor  # [layers] Block Influence (higher = more important)
    layer_loss: torch.Tensor | None  # [layers] validation loss increase when skipped; None without val blocks
    meta: dict = field(default_factory=dict)  # model_type, shape, source, calibration, seq_agg, batch_agg
    # Optional (None in score files written before they existed); used only by prune's off-by-default options.
    hidden_energy: torch.Tensor | None = None  # [hidden] E[(x_c / rms(x))^2] at the norms' inputs (mean ~1)
    neuron_mean: torch.Tensor | None = None  # [layers, ffn] signed mean of down_proj's input over all tokens

    OPTIONAL = ("layer_loss", "hidden_energy", "neuron_mean")

    def save(self, path, meta: dict | None = None) -> Path:
        from safetensors.torch import save_file

        self.meta.update(meta or {})
        tensors = {k: getattr(self, k).contiguous() for k in ("heads", "kv_groups", "neurons", "hidden", "layer_bi")}
        tensors.update({k: getattr(self, k).contiguous() for k in self.OPTIONAL if getattr(self, k) is not None})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"minitron": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path) -> ImportanceScores:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("minitron", "null"))
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except Exception as err:  # OSError, or safetensors' own SafetensorError for a file that is not one
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise UserError(f"cannot read scores '{path}' ({first}): give the scores.safetensors that "
                            "`minitron importance` wrote") from None
        if not meta or "shape" not in meta:
            raise UserError(f"'{path}' is not a minitron scores file (no metadata): run `minitron importance`")
        return cls(t["heads"], t["kv_groups"], t["neurons"], t["hidden"], t["layer_bi"], t.get("layer_loss"), meta,
                   hidden_energy=t.get("hidden_energy"), neuron_mean=t.get("neuron_mean"))

    def require(self, what: str, option: str) -> torch.Tensor:
        """The optional statistic `what`, or a UserError for a scores file written before it existed."""
        value = getattr(self, what)
        if value is None:
            raise UserError(f"{option} needs '{what}', which these scores lack (written by an older version): "
                            "recompute them with `minitron importance`")
        return value

    @property
    def shape(self) -> Shape:
        return Shape(**self.meta["shape"])

    def check_matches(self, config) -> None:
        shape = shape_of(config)
        mine = (self.meta.get("model_type"), self.shape)
        if mine != (config.model_type, shape):
            raise UserError(f"scores were computed on another model (scores: {mine[0]} {mine[1]}; "
                            f"model: {config.model_type} {shape}): run `minitron importance` on this model")

    def layer_ranking(self, metric: str = "loss") -> torch.Tensor:
        """Layer scores, higher = more important."""
        if metric == "bi":
            return self.layer_bi
        if metric != "loss":
            raise UserError(f"layer metric must be loss or bi, not '{metric}'")
        if self.layer_loss is None:
            raise UserError("these scores have no layer-loss ranking (computed without validation blocks): "
                            "use layer_metric='bi' or recompute with validation data")
        return self.layer_loss


def _normalised_sq_sum(norm, x: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of (x_c / rms(x))^2 per channel [hidden] (fp64) at a norm's input; LayerNorms (Nemotron)
    normalise the centred input, so that is what they see."""
    x = x.float()
    if isinstance(norm, torch.nn.LayerNorm):
        x = x - x.mean(-1, keepdim=True)
    sq = x.square()
    return torch.einsum("bt,btc->c", 1 / sq.mean(-1).clamp_min(1e-12), sq).double()  # no [B, T, H] quotient


def layer_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def lm_loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy of `model` on `blocks` [n, seq_len] (the validation LM loss)."""
    device, total = next(model.parameters()).device, 0.0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                 reduction="sum").item()
    return total / (blocks.shape[0] * (blocks.shape[1] - 1))


@contextmanager
def skipping(model, layers) -> Iterator[None]:
    """Within the block, the decoder layers at the given indices pass their input through (a forward hook hands
    it back), as if they had been removed: what depth pruning would do, without copying a weight."""
    handles = [model.model.layers[i].register_forward_hook(lambda m, a, kw, o: layer_input(a, kw),
                                                            with_kwargs=True) for i in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def layer_skip_losses(model, blocks: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Validation LM loss increase when each layer is skipped."""
    base = lm_loss(model, blocks, batch_size)
    out = []
    for i in range(len(model.model.layers)):
        with skipping(model, [i]):
            out.append(lm_loss(model, blocks, batch_size) - base)
    return torch.tensor(out, dtype=torch.float32)


@torch.no_grad()
def compute_importance(model, calib: torch.Tensor, *, batch_size: int = 8, seq_agg: str = "mean",
                       batch_agg: str = "l2", val_blocks: torch.Tensor | None = None) -> ImportanceScores:
    """One streaming pass over `calib` [n, seq_len] token ids; `val_blocks` adds the layer-skip loss ranking."""
    for name, how in (("seq_agg", seq_agg), ("batch_agg", batch_agg)):
        if how not in AGGREGATIONS:
            raise UserError(f"{name} must be one of {', '.join(AGGREGATIONS)}, not '{how}'")
    config = model.config
    family_of(config)
    shape = shape_of(config)
    layers = model.model.layers
    heads = [_Accumulator() for _ in layers]
    neurons = [_Accumulator() for _ in layers]
    hidden = [_Accumulator() for _ in range(2 * len(layers) + 1)]
    device = next(model.parameters()).device
    bi_sum = torch.zeros(len(layers), dtype=torch.float64, device=device)  # stays on device: no sync per batch
    energy_sum = torch.zeros(shape.hidden, dtype=torch.float64, device=device)  # summed over tokens and norms
    neuron_sum = torch.zeros(len(layers), shape.ffn, dtype=torch.float64, device=device)
    tokens = 0

    def on_o_proj(i):
        def hook(mod, args):
            x = args[0]
            per_head = torch.linalg.vector_norm(x.unflatten(-1, (shape.heads, shape.head_dim)), 2, dim=-1)
            heads[i].add(_seq_agg(per_head, seq_agg))
        return hook

    def on_down_proj(i):
        def hook(mod, args):
            neurons[i].add(_seq_agg(args[0].abs(), seq_agg))
            neuron_sum[i] += args[0].float().sum((0, 1))  # fp32 within a batch, fp64 across batches
        return hook

    def on_norm(j):
        def hook(mod, args, out):
            hidden[j].add(_seq_agg(out.abs(), seq_agg))
            energy_sum.add_(_normalised_sq_sum(mod, args[0]))
        return hook

    def on_layer(i):
        def hook(mod, args, kwargs, out):
            x, y = layer_input(args, kwargs), _layer_output(out)
            bi_sum[i] += (1 - F.cosine_similarity(x.float(), y.float(), dim=-1)).sum().double()
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down_proj(i)))
        for k, norm in enumerate(LAYER_NORMS):
            handles.append(getattr(layer, norm).register_forward_hook(on_norm(2 * i + k)))
        handles.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
    handles.append(model.model.norm.register_forward_hook(on_norm(2 * len(layers))))
    try:
        for start in range(0, len(calib), batch_size):
            ids = calib[start:start + batch_size].to(device)
            model.model(input_ids=ids, use_cache=False)  # the decoder only: the LM head feeds no score
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    head_scores = torch.stack([a.result(batch_agg) for a in heads])
    group = shape.heads // shape.kv_heads
    meta = {"model_type": config.model_type, "shape": asdict(shape),
            "source": str(getattr(model, "name_or_path", "") or ""),
            "calibration": {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1]),
                            "val_blocks": 0 if val_blocks is None else int(val_blocks.shape[0])},
            "seq_agg": seq_agg, "batch_agg": batch_agg}
    return ImportanceScores(
        heads=head_scores,
        kv_groups=head_scores.view(len(layers), shape.kv_heads, group).sum(-1),
        neurons=torch.stack([a.result(batch_agg) for a in neurons]),
        hidden=torch.stack([a.result(batch_agg) for a in hidden]).sum(0),
        layer_bi=(bi_sum / tokens).float().cpu(),
        layer_loss=None if val_blocks is None else layer_skip_losses(model, val_blocks, batch_size),
        meta=meta,
        hidden_energy=(energy_sum / (tokens * len(hidden))).float().cpu(),
        neuron_mean=(neuron_sum / tokens).float().cpu(),
    )
