"""The `driftloop` command line: one Typer app; each module holds a group of its commands."""

from __future__ import annotations

import logging

import typer

from service.cli.data import bootstrap, generate, ingest
from service.cli.processes import migrate, serve, worker
from service.cli.replay import backtest
from service.cli.retention import prune
from service.cli.runs import demo, monitor, retrain
from service.cli.versions import models, promote, rollback

cli = typer.Typer(help="driftloop: serve, monitor and retrain a regression model.", no_args_is_help=True)
for command in (
    migrate, bootstrap, serve, worker, ingest, prune, models, promote, rollback, retrain, monitor, generate,
    demo, backtest,
):  # fmt: skip
    cli.command()(command)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apscheduler", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cli()
