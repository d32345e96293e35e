"""Benchmark: peak host memory (RSS) of each rank of a training stage on CPU, one process against 2 FSDP ranks.

Distillation of the SmolLM2-135M shape (random weights saved in bf16, as pruned checkpoints are) into its 15-layer
depth-pruned student, through the stages' launch path (`minitron.distill.worker`), a few steps at the same
micro-batch per rank. Each rank reports its own peak (`ru_maxrss`) once the models and data are loaded, and at the
end. On CPU the device is the host, so a rank's peak
holds what it trains with (the teacher in fp32 compute dtype, its share of the student's weights, gradients and AdamW
moments, the activations and loss temporaries of its micro-batch); under FSDP no rank ever builds the whole
student, and only rank 0 reads the checkpoint, in its stored bf16.

    python bench/host_memory.py                 # prints a table, writes bench/results/host_memory-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

SMOLLM2_135M = "smollm2-135m"  # the shipped config (minitron/model_configs): the real shape, no weights needed


def make_models(root: Path) -> tuple[str, str]:
    import torch
    from transformers import AutoModelForCausalLM

    from minitron.models import load_config, make_byte_tokenizer, save_model

    config = load_config(SMOLLM2_135M)
    tokenizer = make_byte_tokenizer()  # ids < 257 of the 49152-token vocabulary: the logits keep their real size
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    save_model(teacher, tokenizer, root / "teacher")
    teacher.model.layers = teacher.model.layers[:15]
    teacher.config.num_hidden_layers = 15
    save_model(teacher, tokenizer, root / "student")
    return str(root / "teacher"), str(root / "student")


def run(teacher: str, student: str, out: Path, nproc: int, seq_len: int, batch: int, steps: int) -> dict:
    from minitron.config import DistillConfig
    from minitron.distill.worker import TrainJob

    train = DistillConfig(tokens=steps * batch * nproc * seq_len, batch_size=batch, eval_every=10**6, val_batches=1,
                          checkpoint_every=10**6, device="cpu", parallel="fsdp", progress=False)
    data = {"spec": "shakespeare", "seq_len": seq_len, "max_tokens": 200_000}
    job = TrainJob("distill", student, data, train, str(out), teacher=teacher, nproc=nproc, resume=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.json").write_text(job.to_json())
    # a fresh process per measurement: one process runs the job itself, 2 become a torchrun agent and its ranks
    subprocess.run([sys.executable, "-m", "minitron.distill.worker", str(out / "job.json")], check=True)
    return json.loads((out / "result.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="sequences per micro-batch on each rank")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"), help="where the JSON goes")
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="minitron-bench-") as tmp:
        teacher, student = make_models(Path(tmp))
        for nproc in (1, 2):
            result = run(teacher, student, Path(tmp) / f"run{nproc}", nproc, args.seq_len, args.batch, args.steps)
            for rank, (loaded, peak) in enumerate(zip(result["load_peak_rss_mib"], result["peak_rss_mib"],
                                                      strict=True)):
                rows.append({"processes": nproc, "parallel": "fsdp" if nproc > 1 else "-", "rank": rank,
                             "loaded_peak_rss_mib": loaded, "peak_rss_mib": peak})
    print(f"{'processes':>9}  {'parallel':>8}  {'rank':>4}  {'peak RSS, loaded':>16}  {'peak RSS, trained':>17}")
    for r in rows:
        print(f"{r['processes']:>9}  {r['parallel']:>8}  {r['rank']:>4}  {r['loaded_peak_rss_mib']:>12.0f} MiB  "
              f"{r['peak_rss_mib']:>13.0f} MiB")
    report = {"bench": "host_memory", "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "model": "SmolLM2-135M shape -> 15 layers, weights stored in bf16, fp32 compute on CPU",
              "seq_len": args.seq_len, "batch_per_rank": args.batch, "steps": args.steps, "rows": rows}
    out = Path(args.out_dir) / "host_memory-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
