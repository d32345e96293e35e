"""Benchmark: one importance pass (all hooks) for the SmolLM2-135M shape, against a plain forward of the same tokens.

Target (issue 3): 1024 x 2048 tokens in <= 8 s on an H100 in bf16, i.e. hooks at most double the forward time.
Random weights (timing does not depend on them). CPU demo size: `--device cpu --samples 64 --seq-len 256`.

    python bench/importance.py                                   # GPU, 1024 x 2048
    python bench/importance.py --device cpu --samples 64 --seq-len 256 --batch-size 8

Prints a table and writes bench/results/importance-<device>.json (device = GPU name or "cpu").
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import torch

from minitron.importance import compute_importance, layer_skip_losses
from minitron.models import resolve_device, resolve_dtype

SMOLLM2_135M = dict(  # HuggingFaceTB/SmolLM2-135M architecture
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0)


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1024, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    p.add_argument("--val-samples", type=int, default=16, help="validation blocks for the layer-skip ranking")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32")
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"), help="where the JSON goes")
    args = p.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(dtype).eval()
    calib = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.samples, args.seq_len))
    val = calib[: args.val_samples]

    def plain_forward():
        with torch.no_grad():
            for i in range(0, len(calib), args.batch_size):
                model.model(input_ids=calib[i:i + args.batch_size].to(device), use_cache=False)

    small = calib[: args.batch_size]
    compute_importance(model, small, batch_size=args.batch_size)  # warm-up: kernels, allocator
    forward_s, _ = timed(plain_forward, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    hooks_s, _ = timed(lambda: compute_importance(model, calib, batch_size=args.batch_size), device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    skip_s, _ = timed(lambda: layer_skip_losses(model, val, args.batch_size), device) if len(val) else (0.0, None)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tokens = calib.numel()
    result = {
        "device": name, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "host": platform.node(), "shape": "SmolLM2-135M (random weights)", "samples": args.samples,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "tokens": tokens,
        "forward_s": round(forward_s, 3), "importance_s": round(hooks_s, 3),
        "hook_overhead": round(hooks_s / forward_s, 3), "importance_tokens_per_s": round(tokens / hooks_s),
        "layer_skip_val_blocks": len(val), "layer_skip_s": round(skip_s, 3),
        "peak_gpu_gib": None if peak is None else round(peak, 2),
    }
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k.ljust(width)}  {v}")
    out = Path(args.out_dir) / f"importance-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
