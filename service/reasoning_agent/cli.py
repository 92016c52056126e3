"""The `reasoning-agent` command: `serve` (gunicorn + uvicorn workers, or `--reload`), `worker`
and `migrate`."""

from __future__ import annotations

import argparse
import sys

from reasoning_agent import server
from reasoning_agent.config import ConfigError, load_settings

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reasoning-agent", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument(
        "--reload", action="store_true", help="one uvicorn process, reload on change"
    )
    serve.add_argument(
        "--no-migrate", action="store_true", help="do not apply migrations before serving"
    )
    serve.add_argument(
        "--wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help="keep trying this long while the database is not reachable yet",
    )
    work = commands.add_parser("worker", help="run background tasks from the Redis queue (arq)")
    work.add_argument(
        "--check",
        action="store_true",
        help="exit 0 if this machine's worker is alive and reaching Redis (a liveness probe)",
    )
    work.add_argument(
        "--max-age",
        type=float,
        default=30,
        metavar="SECONDS",
        help="with --check: how old the worker's last heartbeat may be",
    )
    migrate = commands.add_parser("migrate", help="apply the database migrations")
    migrate.add_argument(
        "--wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help="keep trying this long while the database is not reachable yet",
    )
    args = parser.parse_args(argv)
    if args.command == "serve" and not args.reload:
        server.prepare_metrics_dir()  # before anything imports prometheus_client

    try:
        if args.command == "migrate":
            server.migrate(load_settings(), wait_s=args.wait)
        elif args.command == "worker":
            from reasoning_agent.runners import worker

            if args.check:
                return 0 if worker.check(load_settings(), max_age_s=args.max_age) else 1
            worker.run(load_settings())
        else:
            from reasoning_agent.services import check_settings

            settings = load_settings()
            check_settings(settings)
            if not args.no_migrate:
                server.migrate(settings, wait_s=args.wait)
            server.recover(settings)
            server.serve(settings, reload=args.reload)
    except ConfigError as exc:
        print(f"reasoning-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0
