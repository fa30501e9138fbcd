"""The long-running processes (`serve`, `worker`) and `migrate`."""

from __future__ import annotations

import copy
import logging
from typing import Annotated, Any

import typer
from rich.markup import escape

from core.settings import Settings
from service.cli.common import console, migrate_schema, open_database, read_settings, read_spec

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def _log_level(text: str) -> str:
    """A uvicorn log level, refused here by name: uvicorn's own check is a KeyError traceback."""
    level = text.strip().lower()
    if level not in _LOG_LEVELS:
        raise typer.BadParameter(f"{text!r} is not a log level: give one of {', '.join(_LOG_LEVELS)}")
    return level


def _log_at(level: str) -> None:
    """driftloop's own loggers at `level` too, not only uvicorn's (which uvicorn sets): at warning, a replica
    went on logging every champion poll and monitor run at INFO. `main` has set info, the default; setting it
    again would only change a caller's logging (a test's, running the command in its own process)."""
    if level != "info":
        logging.getLogger().setLevel(logging.DEBUG if level == "trace" else level.upper())


LogLevel = Annotated[
    str,
    typer.Option(
        parser=_log_level, metavar="LEVEL", help=", ".join(_LOG_LEVELS) + ": uvicorn's and driftloop's logs."
    ),
]


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, its access-log lines ending in the answer's X-Request-ID (`(request 9f…)`), so a
    line there and a client's or a load balancer's record of the request find each other."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["request_id"] = {"()": "service.middleware.RequestIdFilter"}
    config["handlers"]["access"]["filters"] = ["request_id"]
    config["formatters"]["access"]["fmt"] += " (request %(request_id)s)"
    return config


# uvicorn would bind 70000 as 70000 mod 65536, its log still saying :70000
Port = Annotated[int, typer.Option(min=1, max=65535)]


def _spool_free(settings: Settings) -> None:
    """A spool directory another serving process owns (two replicas started from one working directory
    share the default var/spool), or one that cannot be made, is a message and exit 2, not a traceback
    from the app's start."""
    from service.spool import Spool, SpoolInUse

    spool = Spool(settings.spool_dir)
    try:
        spool.claim()
    except (SpoolInUse, OSError) as exc:
        console.print(f"[red]DRIFTLOOP_SPOOL_DIR: {escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(2) from None
    spool.release()  # the app's prediction logger claims it for the life of the process


def migrate() -> None:
    """Bring the database schema up to date (alembic upgrade head)."""
    before, now = migrate_schema(read_settings())
    if before == now:
        console.print(f"[green]schema is up to date[/] (revision {now})")
    elif before is None:
        console.print(f"[green]created the schema[/] (revision {now})")
    else:
        console.print(f"[green]migrated the schema[/] from revision {before} to {now}")


def serve(
    host: str = "127.0.0.1",
    port: Port = 8000,
    no_scheduler: Annotated[
        bool, typer.Option("--no-scheduler", help="API replica: no monitor jobs.")
    ] = False,
    log_level: LogLevel = "info",
    access_log: Annotated[bool, typer.Option(help="Log every request (metrics count them anyway).")] = False,
) -> None:
    """Run the API (and, unless --no-scheduler, the monitor scheduler) in this process."""
    import uvicorn

    from service.app import create_app

    _log_at(log_level)
    settings = read_settings()
    read_spec(settings)  # refused here, by name, rather than as a traceback from the app's start
    # Without auto_migrate, a schema the migrate job has not brought up yet is refused here too, rather than
    # served with a traceback per registry poll and lease renewal ('no such table').
    open_database(settings, migrate=settings.auto_migrate)
    _spool_free(settings)
    app = create_app(settings, scheduler=False if no_scheduler else None)  # None: DRIFTLOOP_SCHEDULER decides
    uvicorn.run(
        app, host=host, port=port, log_level=log_level, access_log=access_log, log_config=_log_config(),
        timeout_graceful_shutdown=30,
    )  # fmt: skip


def worker(
    host: str = "127.0.0.1",
    port: Port = 9100,
    log_level: LogLevel = "info",
    access_log: Annotated[
        bool, typer.Option(help="Log every request (health probes and Prometheus scrapes, mostly).")
    ] = False,
) -> None:
    """Scale-out worker: monitor scheduler + retrain runner, /metrics and /health on --port."""
    import uvicorn

    from service.worker import create_worker_app

    _log_at(log_level)
    settings = read_settings()
    read_spec(settings)
    open_database(settings, migrate=settings.auto_migrate)
    uvicorn.run(
        create_worker_app(settings), host=host, port=port, log_level=log_level, access_log=access_log,
        log_config=_log_config(),
    )  # fmt: skip
