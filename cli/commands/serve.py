"""`minitron serve`: serve the compress-on-demand and compress-nightly deployments from this process."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the on-demand and nightly deployments (prefect.serve)",
                       description="Serve the compress-on-demand (no schedule) and compress-nightly (02:00, "
                                   "MINITRON_TIMEZONE or UTC) deployments; runs until interrupted.")
    p.add_argument("--preset", default="demo-cpu", help="preset (configs/NAME.yaml or a path) whose values are "
                                                       "both deployments' default parameters (default: demo-cpu)")
    p.add_argument("--nightly-preset", default=None, help="a different preset for compress-nightly (default: "
                                                         "--preset's)")
    p.add_argument("--limit", type=int, default=None, help="flow runs executed at once by this process")
    p.set_defaults(func=run)


def run(args) -> int:
    from flows.deployments import nightly_timezone
    from flows.environment import embedded_api, use_embedded_defaults

    nightly_timezone()  # a bad MINITRON_TIMEZONE: one line, before anything starts
    use_embedded_defaults()
    from flows.deployments import serve

    with embedded_api():
        serve(args.preset, args.nightly_preset, limit=args.limit)
    return 0
