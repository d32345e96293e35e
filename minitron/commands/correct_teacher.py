"""`minitron correct-teacher MODEL --data DATA --tokens N --out OUT`: fine-tune the teacher on the corpus first."""

from __future__ import annotations

from minitron.commands.common import load_data_from_args
from minitron.commands.distill import add_train_args, check_budget, distill_config, report


def register(sub) -> None:
    p = sub.add_parser("correct-teacher", help="fine-tune the teacher on the distillation corpus (CE)",
                       description="Teacher correction (arXiv 2408.11796): a light next-token fine-tune of the "
                                   "teacher on the distillation corpus, reporting validation loss before and after.")
    p.add_argument("model", help="teacher: folder, .gguf, hub id or alias")
    add_train_args(p)
    p.set_defaults(func=run, _parser=p)


def run(args) -> int:
    from minitron.distill.launch import argv_of, run_under_torchrun, under_torchrun

    cfg = distill_config(args)
    check_budget(cfg, args.seq_len, args.nproc)
    if args.nproc > 1 and not under_torchrun():
        return run_under_torchrun("correct-teacher", argv_of(args._parser, args), args.nproc)

    from minitron.distill import correct_teacher
    from minitron.models import load_model

    # the teacher is the trained model here: fp32 master weights on the CPU, the loop moves it and autocasts
    teacher, tokenizer = load_model(args.model, dtype="fp32", device="cpu", allow_pickle=args.allow_pickle,
                                    trust_remote_code=args.trust_remote_code)
    data = load_data_from_args(args, tokenizer, args.seq_len)
    result = correct_teacher(teacher, data, cfg, out_dir=args.out, tokenizer=tokenizer, resume=args.resume)
    report(result, args.out)
    return 0
