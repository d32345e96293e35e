"""`minitron correct-teacher MODEL --data DATA --tokens N --out OUT`: fine-tune the teacher on the corpus first."""

from __future__ import annotations

from cli.commands.distill import add_train_args, report, train_job


def register(sub) -> None:
    p = sub.add_parser("correct-teacher", help="fine-tune the teacher on the distillation corpus (CE)",
                       description="Teacher correction (arXiv 2408.11796): a light next-token fine-tune of the "
                                   "teacher on the distillation corpus, reporting validation loss before and after.")
    p.add_argument("model", help="teacher: folder, .gguf, hub id or alias")
    add_train_args(p, kd=False)
    p.set_defaults(func=run)


def run(args) -> int:
    from minitron.distill.worker import launch

    report(launch(train_job(args, "correct", args.model)), args.out)
    return 0
