"""What every command shares: settings, spec and database opened or refused by name, exit 2."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from core.settings import Settings, SettingsError, load_settings

console = Console(stderr=True)


SHIPPED_SPEC = "; the spec used was the shipped apartment spec: {how} describing your data's columns"


def read_settings() -> Settings:
    """The configured settings; a bad value (naming its DRIFTLOOP_ variable) is a message and exit 2."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        console.print(f"[red]bad setting: {escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(2) from None
    _warn_misspelt_variables()
    return settings


def _warn_misspelt_variables() -> None:
    """A DRIFTLOOP_ variable (or .env key) that nearly spells a setting is named: it is read by nobody."""
    from dotenv import dotenv_values

    from core.settings import misspelt_variables

    dotenv = dotenv_values(".env") if os.path.isfile(".env") else {}
    for warning in misspelt_variables({**dotenv, **os.environ}):
        console.print(f"[yellow]warning: {escape(warning)}[/]", highlight=False)


def read_spec(settings: Settings) -> Any:
    """The configured spec; a bad one (missing, not YAML, a slip in it) is a message naming
    DRIFTLOOP_SPEC_PATH, and exit 2."""
    from core.spec import SpecError, load_spec

    try:
        return load_spec(settings.spec_path)
    except SpecError as exc:
        console.print(f"[red]bad setting: DRIFTLOOP_SPEC_PATH: {escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(2) from None


def given(context: typer.Context, *names: str) -> list[str]:
    """Those of the options `names` given (on the command line or by an environment variable), not left
    at their defaults, in the order named."""
    return [name for name in names if getattr(context.get_parameter_source(name), "name", None) != "DEFAULT"]


@contextmanager
def database_errors() -> Iterator[None]:
    """A database that cannot be opened (refused, unreachable, a file that is not SQLite's) is a message and
    exit 2, naming DRIFTLOOP_DATABASE_URL and the driver's first line (never the URL: it may hold a
    password), not a traceback of some 500 lines."""
    from sqlalchemy.exc import DBAPIError

    from core.db import error_line

    try:
        yield
    except DBAPIError as exc:
        reason = escape(error_line(exc.orig or exc))
        console.print(f"[red]cannot open the database (DRIFTLOOP_DATABASE_URL): {reason}[/]", highlight=False)
        raise typer.Exit(2) from None


def migrate_schema(settings: Settings) -> tuple[str | None, str | None]:
    """Migrate the configured database; the revisions before (None: no schema yet) and after."""
    from core.db import migrate

    with database_errors():
        return migrate(settings.database_url)


def open_database(settings: Settings, *, migrate: bool) -> None:
    """Migrate the configured database (`migrate`), or check that its schema is the newest: without
    auto_migrate, a schema that is not the newest is a message and exit 2, not a traceback from the first
    query."""
    from core.db import schema_problem

    if migrate:
        migrate_schema(settings)
        return
    with database_errors():
        problem = schema_problem(settings.database_url)
    if problem:
        console.print(
            f"[red]{problem}. DRIFTLOOP_AUTO_MIGRATE is false: run `driftloop migrate` (or wait for the "
            "migrate job), then run this again[/]"
        )
        raise typer.Exit(2)


@contextmanager
def open_sessions(settings: Settings) -> Iterator[Any]:
    """Sessions on the configured database (migrated first if auto_migrate, see open_database), for one
    command; the engine is disposed afterwards."""
    from core.db import make_engine, make_sessions

    open_database(settings, migrate=settings.auto_migrate)
    engine = make_engine(settings.database_url)
    try:
        yield make_sessions(engine)
    finally:
        engine.dispose()


@contextmanager
def open_registry(settings: Settings) -> Iterator[Any]:
    """The registry on the configured database, for one command."""
    from core.registry import ArtifactStore, Registry

    with open_sessions(settings) as sessions:
        yield Registry(sessions, ArtifactStore(settings.artifact_dir))


@contextmanager
def open_loop(settings: Settings) -> Iterator[Any]:
    """The loop on its own (no scheduler), for one-shot CLI runs."""
    from prometheus_client import CollectorRegistry

    from core.metrics import build_metrics
    from monitor.jobs import Loop

    spec = read_spec(settings)
    with open_registry(settings) as registry:
        loop = Loop(
            settings=settings,
            spec=spec,
            sessions=registry.sessions,
            registry=registry,
            metrics=build_metrics(CollectorRegistry()),
            unscraped=True,  # its counters die with it: a run's outcome is the leader's to count
        )
        try:
            yield loop
        finally:
            loop.stop()  # a waited-for run's outcome is announced before the engine goes


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
