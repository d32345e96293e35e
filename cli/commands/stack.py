"""`minitron stack up|down|status`: the local service stack (Prefect server, MLflow server, S3) on 127.0.0.1."""

from __future__ import annotations


def register(sub) -> None:
    from infra.stack import add_arguments  # stdlib-only module: cheap at parse time

    p = sub.add_parser("stack", help="start, stop or inspect the local Prefect + MLflow + S3 stack",
                       description="Start, stop or inspect the local service stack: prefect server, mlflow server "
                                   "(SQLite, artifacts on S3) and an S3 endpoint, all on 127.0.0.1 with auth; with "
                                   "--ray also a Ray head (token auth) for backend: ray.")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from infra.stack import run_stack

    return run_stack(args) or 0
