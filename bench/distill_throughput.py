"""Distillation throughput: our loop vs naive transformers loops, in one run on one device.

Teacher of the SmolLM2-135M shape (30 layers, hidden 576, 9 heads, 3 KV heads, MLP 1536, vocab 49152, tied), random
weights and tokens. Students: `depth15` (15 layers, same width, 81.4M) and `width` (30 layers, hidden 448, 7 heads,
1 KV head, MLP 1024, 77.1M). Variants:
  ours        `minitron.distill.distill` itself (fused chunked lm_head + KL, bf16 autocast, fused AdamW,
              compiled decoder blocks on CUDA), timed per optimizer step through its metrics callback
  naive-fp32  HF forward of both models to full logits, full-vocabulary KL, fp32
  naive-bf16  the same under bf16 autocast (teacher in bf16)
MFU = (teacher 2N + 4·L·d_attn·T  +  student 6N + 12·L·d_attn·T) · tokens/s / peak, N = matmul parameters (decoder
linears + lm_head; the embedding lookup is not a matmul), attention as in PaLM (no causal discount), peak = a bf16
matmul measured in the same run. Median of --steps timed steps after --warmup steps.

    python bench/distill_throughput.py                                   # GPU: batch 16 x 1024
    python bench/distill_throughput.py --batch 2 --seq-len 128 --steps 2 --warmup 1 --peak-size 1024  # CPU smoke
Writes bench/results/distill_throughput-<device>.json (rows: variant, student, tokens_per_s, mfu, peak_gib, device).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from minitron.data import TokenData
from minitron.distill import DistillConfig, distill
from minitron.distill.loss import KDLossConfig, reference_kd_loss

TEACHER = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
               max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0)
STUDENTS = {"depth15": dict(TEACHER, num_hidden_layers=15),
            "width": dict(TEACHER, hidden_size=448, num_attention_heads=7, num_key_value_heads=1,
                          intermediate_size=1024)}


def build(shape: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**shape))


def matmul_params(shape: dict) -> int:
    d, f, h, kv, hd, v = (shape[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                             "num_key_value_heads", "head_dim", "vocab_size"))
    per_layer = d * hd * (2 * h + 2 * kv) + 3 * d * f
    return shape["num_hidden_layers"] * per_layer + v * d


def flops_per_token(student: dict, seq_len: int) -> float:
    def attn(s):
        return s["num_hidden_layers"] * s["num_attention_heads"] * s["head_dim"] * seq_len

    return 2 * matmul_params(TEACHER) + 4 * attn(TEACHER) + 6 * matmul_params(student) + 12 * attn(student)


def measure_peak(device: torch.device, n: int) -> float:
    """Achieved bf16 matmul FLOP/s on an n^3 product (the denominator of MFU)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def random_data(n_blocks: int, seq_len: int) -> TokenData:
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, TEACHER["vocab_size"], (n_blocks, seq_len), generator=g)
    return TokenData(train=train, val=train[:1], documents=1, tokens=train.numel(), seq_len=seq_len, source="rand")


def run_ours(name: str, args, device: torch.device) -> list[float]:
    """Step times of the real loop, from its per-step metric callback (each record follows a device sync)."""
    teacher, student = build(TEACHER, 0), build(STUDENTS[name], 1)
    n_steps = args.warmup + args.steps
    cfg = DistillConfig(tokens=n_steps * args.batch * args.seq_len, batch_size=args.batch, lr=1e-4,
                        eval_every=10**9, val_batches=1, checkpoint_every=10**9, log_every=1, progress=False,
                        compile=args.compile, device=str(device), dtype="bf16", chunk_tokens=args.chunk_tokens)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        distill(teacher, student, random_data(n_steps * args.batch, args.seq_len), cfg, out_dir=out,
                callback=lambda rec: stamps.append(time.perf_counter()) if "loss" in rec else None)
    return [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:], strict=False)]


def run_naive(name: str, args, device: torch.device, bf16: bool) -> list[float]:
    """The plain transformers loop: full logits of both models, full-vocabulary KL."""
    teacher, student = build(TEACHER, 0).to(device), build(STUDENTS[name], 1).to(device).train()
    if bf16:
        teacher.to(torch.bfloat16)
    teacher.requires_grad_(False).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=device.type == "cuda")
    data = random_data(args.batch, args.seq_len).train.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    times = []
    for _ in range(args.warmup + args.steps):
        t = time.perf_counter()
        with autocast:
            with torch.no_grad():
                zt = teacher(data).logits
            zs = student(data).logits
            loss, _, _ = reference_kd_loss(zs.flatten(0, 1), zt.flatten(0, 1), data.flatten(), None, KDLossConfig())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t)
        del zt, zs, loss
    return times[args.warmup:]


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps first (compilation, allocator)")
    ap.add_argument("--students", default="depth15,width", help="comma list of: " + ", ".join(STUDENTS))
    ap.add_argument("--variants", default="ours,naive-bf16,naive-fp32", help="comma list of variants")
    ap.add_argument("--chunk-tokens", type=int, default=1024, help="fused-loss chunk (ours)")
    ap.add_argument("--peak-size", type=int, default=8192, help="n of the n^3 bf16 matmul measuring the peak")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="ours without torch.compile")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"), help="where the JSON goes")
    args = ap.parse_args()
    from minitron.models import resolve_device

    device = resolve_device(args.device)
    args.compile = args.compile and device.type == "cuda"
    slug = device_slug(device)
    peak = measure_peak(device, args.peak_size)
    print(f"device {slug}, bf16 matmul peak {peak / 1e12:.3f} TFLOP/s, batch {args.batch} x {args.seq_len}")
    rows = []
    for name in args.students.split(","):
        for variant in args.variants.split(","):
            reset_peak(device)
            if variant == "ours":
                times = run_ours(name, args, device)
            else:
                times = run_naive(name, args, device, bf16=variant == "naive-bf16")
            tps = args.batch * args.seq_len / statistics.median(times)
            rows.append({"variant": variant, "student": name, "tokens_per_s": round(tps, 1),
                         "mfu": round(flops_per_token(STUDENTS[name], args.seq_len) * tps / peak, 4),
                         "peak_gib": None if peak_gib(device) is None else round(peak_gib(device), 2),
                         "device": slug, "batch": args.batch, "seq_len": args.seq_len})
            r = rows[-1]
            print(f"{variant:>11} {name:>8}  {r['tokens_per_s']:>10,.0f} tok/s  MFU {100 * r['mfu']:5.1f}%  "
                  f"peak {r['peak_gib'] if r['peak_gib'] is not None else '-'} GiB", flush=True)
    out = Path(args.out_dir) / f"distill_throughput-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"peak_flops": peak, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
