"""The `driftloop` command line."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from core.figures import figure
from core.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from core.retention import Retention
    from core.spec import FeatureSpec

cli = typer.Typer(help="driftloop: serve, monitor and retrain a regression model.", no_args_is_help=True)
console = Console(stderr=True)
BACKTEST_TABLE_WIDTH = 180  # every column of the backtest table, unabridged
_SHIPPED_SPEC = "; the spec used was the shipped apartment spec: {how} describing your data's columns"


def _settings() -> Settings:
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


def _spec(settings: Settings) -> Any:
    """The configured spec; a bad one (missing, not YAML, a slip in it) is a message and exit 2."""
    from core.spec import SpecError, load_spec

    try:
        return load_spec(settings.spec_path)
    except SpecError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None


@contextmanager
def _database_errors() -> Iterator[None]:
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


def _migrate(settings: Settings) -> tuple[str | None, str | None]:
    """Migrate the configured database; the revisions before (None: no schema yet) and after."""
    from core.db import migrate

    with _database_errors():
        return migrate(settings.database_url)


def _open_database(settings: Settings, *, migrate: bool) -> None:
    """Migrate the configured database (`migrate`), or check that its schema is the newest: without
    auto_migrate, a schema that is not the newest is a message and exit 2, not a traceback from the first
    query."""
    from core.db import schema_problem

    if migrate:
        _migrate(settings)
        return
    with _database_errors():
        problem = schema_problem(settings.database_url)
    if problem:
        console.print(
            f"[red]{problem}. DRIFTLOOP_AUTO_MIGRATE is false: run `driftloop migrate` (or wait for the "
            "migrate job), then run this again[/]"
        )
        raise typer.Exit(2)


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


@contextmanager
def _sessions(settings: Settings) -> Iterator[Any]:
    """Sessions on the configured database (migrated first if auto_migrate, see _open_database), for one
    command; the engine is disposed afterwards."""
    from core.db import make_engine, make_sessions

    _open_database(settings, migrate=settings.auto_migrate)
    engine = make_engine(settings.database_url)
    try:
        yield make_sessions(engine)
    finally:
        engine.dispose()


@contextmanager
def _registry(settings: Settings) -> Iterator[Any]:
    """The registry on the configured database, for one command."""
    from core.registry import ArtifactStore, Registry

    with _sessions(settings) as sessions:
        yield Registry(sessions, ArtifactStore(settings.artifact_dir))


@contextmanager
def _loop(settings: Settings) -> Iterator[Any]:
    """The loop on its own (no scheduler), for one-shot CLI runs."""
    from prometheus_client import CollectorRegistry

    from core.metrics import build_metrics
    from monitor.jobs import Loop

    spec = _spec(settings)
    with _registry(settings) as registry:
        loop = Loop(
            settings=settings,
            spec=spec,
            sessions=registry.sessions,
            registry=registry,
            metrics=build_metrics(CollectorRegistry()),
        )
        try:
            yield loop
        finally:
            loop.stop()  # a waited-for run's outcome is announced before the engine goes


@cli.command()
def migrate() -> None:
    """Bring the database schema up to date (alembic upgrade head)."""
    before, now = _migrate(_settings())
    if before == now:
        console.print(f"[green]schema is up to date[/] (revision {now})")
    elif before is None:
        console.print(f"[green]created the schema[/] (revision {now})")
    else:
        console.print(f"[green]migrated the schema[/] from revision {before} to {now}")


@cli.command()
def bootstrap(
    csv: Annotated[
        Path | None, typer.Option(help="Labelled CSV to train v1 on (default: generated data).")
    ] = None,
    rows: Annotated[int, typer.Option(help="Generated rows when no CSV is given.")] = 20_000,
    seed: int = 0,
) -> None:
    """Train, register and promote v1 if there is no champion yet (idempotent)."""
    from core.registry import RegistryError
    from core.spec import SpecError, load_spec
    from retrain.bootstrap import bootstrap as do_bootstrap
    from retrain.data import DataError, MissingColumnsError
    from retrain.train import TrainParams

    settings = _settings()
    try:
        with console.status("training v1…"), _registry(settings) as registry:
            result = do_bootstrap(
                registry=registry,
                spec=load_spec(settings.spec_path),
                params=TrainParams.from_settings(settings),
                holdout_fraction=settings.holdout_fraction,
                csv_path=csv,
                rows=rows,
                seed=seed,
            )
    except (DataError, SpecError, RegistryError) as exc:  # a champion that does not fit, or a damaged file
        shipped = isinstance(exc, MissingColumnsError) and settings.spec_path is None
        note = _SHIPPED_SPEC.format(how="set DRIFTLOOP_SPEC_PATH to a spec") if shipped else ""
        console.print(f"[red]bootstrap: {exc}{note}[/]")
        raise typer.Exit(2) from None
    row = result.version
    verb = "trained and promoted" if result.created else "already the champion:"
    console.print(
        f"[green]{verb} v{row.version}[/] (validation MAE {figure(row.metrics.get('val_mae', float('nan')))})"
    )
    if csv is not None and not result.created:
        console.print(
            f"[yellow]{csv} was not read: bootstrap only trains the first model. To learn from it, "
            f"`driftloop ingest {csv}`, then `driftloop retrain`.[/]"
        )


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
# uvicorn would bind 70000 as 70000 mod 65536, its log still saying :70000
Port = Annotated[int, typer.Option(min=1, max=65535)]


@cli.command()
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
    settings = _settings()
    _spec(settings)  # refused here, by name, rather than as a traceback from the app's start
    # Without auto_migrate, a schema the migrate job has not brought up yet is refused here too, rather than
    # served with a traceback per registry poll and lease renewal ('no such table').
    _open_database(settings, migrate=settings.auto_migrate)
    _spool_free(settings)
    app = create_app(settings, scheduler=False if no_scheduler else None)  # None: DRIFTLOOP_SCHEDULER decides
    uvicorn.run(
        app, host=host, port=port, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=30
    )


@cli.command()
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
    settings = _settings()
    _spec(settings)
    _open_database(settings, migrate=settings.auto_migrate)
    uvicorn.run(create_worker_app(settings), host=host, port=port, log_level=log_level, access_log=access_log)


def _to_load_the_rest(spec: FeatureSpec, loaded: int) -> str:
    if spec.time_column:  # rows carry their own time: a second ingest knows the rows it loaded
        return (
            "To load those, fix them and ingest the file again: the rows loaded now are known by their "
            f"{spec.time_column}, features and {spec.target}, and are not loaded a second time."
        )
    return (
        "To load those, put them, fixed, in a new file under the same header and ingest that: with no time "
        f"column in the spec, ingesting this file again, fixed, would load its {loaded} good row(s) a second "
        "time."
    )


@cli.command()
def ingest(
    file: Path,
    source: Annotated[str | None, typer.Option(help="Source label stored with the rows.")] = None,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Load the good rows of a file that has bad lines.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Load every row, even of a file or rows already loaded (they then count twice)."
        ),
    ] = False,
    show: Annotated[int, typer.Option(min=0, help="How many bad lines to list.")] = 20,
) -> None:
    """Load labelled transactions from a CSV into labelled_row, all or nothing: if any line violates the
    spec, nothing is loaded and the bad lines are listed (unless --skip-bad). A file already loaded is not
    loaded again, nor a row an earlier file loaded (same time, features and target), unless --force."""
    from core.ingest import IngestError, ingest_csv, inspect_file

    settings = _settings()
    spec = _spec(settings)
    try:
        csv_file = inspect_file(file)  # a missing or unreadable file is reported before any migration
        with _sessions(settings) as sessions, _progress() as progress:
            task = progress.add_task("checking and loading", total=csv_file.lines)
            report = ingest_csv(
                csv_file,
                spec=spec,
                sessions=sessions,
                source=source,
                skip_bad=skip_bad,
                force=force,
                on_progress=lambda n: progress.advance(task, n),
            )
    except IngestError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    if report.already:
        before = report.already
        named = "" if before.name == str(file) else f" (from {before.name})"
        console.print(
            f"[yellow]{file} was already loaded[/]{named}: {before.rows} row(s) as source {before.source!r}, "
            f"last on {before.last_loaded_at:%Y-%m-%d %H:%M} UTC. Nothing loaded now."
        )
        console.print(
            "--force loads it again: its rows then count twice, in training and in the gate's holdout."
        )
        return
    if report.bad and not skip_bad:
        console.print(
            f"[red]nothing loaded:[/] {report.bad} of {report.total} line(s) are bad (listed below). "
            f"Fix them and run again, or pass --skip-bad to load the {report.good} good row(s) only."
        )
    elif report.bad:
        console.print(
            f"[green]{report.loaded} row(s) loaded[/] as source {source or file.name!r}, "
            f"{report.bad} bad line(s) skipped (listed below). {_to_load_the_rest(spec, report.loaded)}"
        )
    else:
        console.print(f"[green]{report.loaded} row(s) loaded[/] as source {source or file.name!r}")
    if report.repeated:
        console.print(
            f"{report.repeated} row(s) an earlier file loaded (the same {spec.time_column}, features and "
            f"{spec.target}) were not loaded again; --force loads them a second time."
        )
    if report.ignored_columns:
        console.print(
            f"column(s) the spec does not read, not loaded: {', '.join(map(repr, report.ignored_columns))}"
        )
    for line, problems in report.rejected[:show]:
        console.print(f"  line {line}: " + "; ".join(problems))
    if report.bad > min(show, len(report.rejected)):
        console.print(f"  … and {report.bad - min(show, len(report.rejected))} more")
    if report.bad and not skip_bad:
        raise typer.Exit(1)


@cli.command()
def prune(
    older_than: Annotated[
        int,
        typer.Option(
            min=1, max=36_500, help="Delete rows logged (or, ingested, whose time is) more than DAYS ago."
        ),
    ],
    labelled: Annotated[
        bool,
        typer.Option(
            "--labelled",
            help="Also delete labelled predictions (with their labels) and ingested rows: training data.",
        ),
    ] = False,
    artifacts: Annotated[
        bool,
        typer.Option(
            "--artifacts",
            help="Also delete the model files of gate-rejected versions created that long ago (rows stay).",
        ),
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would go; delete nothing.")] = False,
) -> None:
    """Delete logged predictions older than --older-than days, in short batches (serving goes on). Kept
    whatever their age: the drift window's rows, and with --labelled the labelled rows newer than the
    champion's training data. --artifacts never touches the champion's, former champions' or candidates'."""
    from datetime import UTC, timedelta

    from sqlalchemy.exc import DBAPIError

    from core.db import error_line
    from core.retention import plan, prune_artifacts
    from core.retention import prune as delete_rows

    settings = _settings()
    now = datetime.now(UTC)
    cutoff = now - timedelta(days=older_than)
    with _sessions(settings) as sessions:
        with _database_errors(), sessions() as session:
            retention = plan(
                session, cutoff=cutoff, window_rows=settings.window_rows, labelled=labelled,
                artifact_dir=settings.artifact_dir if artifacts else None,
            )  # fmt: skip
        _print_retention(retention, artifacts=artifacts)
        _warn_of_training_data(retention, older_than=older_than, train_window_days=settings.train_window_days)
        if dry_run:
            return
        if retention.artifacts:
            try:
                gone = prune_artifacts(sessions, retention, now=now)
            except (OSError, DBAPIError) as exc:
                reason = escape(error_line(exc.orig or exc) if isinstance(exc, DBAPIError) else str(exc))
                console.print(f"[red]pruning artifacts stopped: {reason}; run it again[/]", highlight=False)
                raise typer.Exit(1) from None
            console.print(f"deleted the artifacts of {gone} rejected version(s)")
        if not retention.total:
            return
        deleted = 0

        def advance(rows: int) -> None:
            nonlocal deleted
            deleted += rows
            progress.advance(task, rows)

        try:
            with _progress() as progress:
                task = progress.add_task("deleting", total=retention.total)
                done = delete_rows(sessions, retention, on_progress=advance)
        except DBAPIError as exc:
            reason = escape(error_line(exc.orig or exc))
            console.print(
                f"[red]pruning stopped after {deleted:,} row(s): {reason}. What was deleted stays deleted; "
                "run it again to go on[/]",
                highlight=False,
            )
            raise typer.Exit(1) from None
    console.print(f"deleted {done.total:,} row(s)")
    if settings.database_url.startswith("sqlite"):
        console.print(
            "SQLite keeps the file's size: new rows reuse the freed space (`VACUUM`, with every process "
            "stopped, gives it back to the disk)"
        )


def _warn_of_training_data(retention: Retention, *, older_than: int, train_window_days: int | None) -> None:
    """Labelled rows to go that a retrain would read (DRIFTLOOP_TRAIN_WINDOW_DAYS) are named as such."""
    if not retention.labelled_predictions + retention.labelled_rows:
        return
    if train_window_days is None or train_window_days > older_than:
        reads = (
            "every labelled row"
            if train_window_days is None
            else f"labelled rows up to {train_window_days} days old"
        )
        console.print(
            f"[yellow]warning: a retrain reads {reads} (DRIFTLOOP_TRAIN_WINDOW_DAYS): the labelled rows "
            "pruned are training data it would have used[/]",
            highlight=False,
        )


def _print_retention(retention: Retention, *, artifacts: bool) -> None:
    """What a prune deletes, and what it keeps that is older than asked."""
    console.print(f"older than {retention.cutoff:%Y-%m-%d %H:%M} UTC:")
    if artifacts:
        versions = ", ".join(f"v{version}" for version, _ in retention.artifacts) or "none"
        size = f" ({retention.artifact_bytes / 2**20:.1f} MiB)" if retention.artifacts else ""
        console.print(f"  artifacts of gate-rejected versions: {versions}{size}")
    before = retention.predictions_before
    window = f" (the drift window's rows are kept: {before:%Y-%m-%d %H:%M} UTC on)"
    console.print(
        f"  unlabelled predictions: {retention.predictions:,}" + (window if before < retention.cutoff else "")
    )
    if retention.labelled_before is None:
        console.print("  labelled predictions and ingested rows: kept (--labelled deletes them)")
        return
    kept = (
        f" (kept from {retention.labelled_before:%Y-%m-%d %H:%M} UTC on: the drift window's, and the rows "
        "newer than the champion's training data)"
        if retention.labelled_before < retention.cutoff
        else ""
    )
    console.print(f"  labelled predictions, each with its label: {retention.labelled_predictions:,}{kept}")
    console.print(f"  ingested labelled rows: {retention.labelled_rows:,}{kept}")


@cli.command()
def models() -> None:
    """List model versions."""
    with _registry(_settings()) as registry:
        rows = registry.list()
    table = Table("version", "status", "trigger", "created", "val MAE", "parent")
    for row in rows:
        mae = row.metrics.get("val_mae")
        table.add_row(
            f"v{row.version}", row.status, row.trigger, f"{row.created_at:%Y-%m-%d %H:%M}",
            figure(mae) if mae is not None else "-",
            f"v{row.parent_version}" if row.parent_version else "-",
        )  # fmt: skip
    Console().print(table)


def _version(text: str) -> int:
    """A model version as `driftloop models` prints it ("v2") or as a number ("2")."""
    digits = text.strip().removeprefix("v")
    # 2**31 - 1 is core.schema.MAX_ID, the id columns' range, written out to keep core off the import path
    if not (digits.isascii() and digits.isdigit()) or not 1 <= int(digits) <= 2**31 - 1:
        raise typer.BadParameter(
            f"{text!r} is not a model version: give its number, 2 or v2 (1 … 2147483647)"
        )
    return int(digits)


@cli.command()
def promote(
    version: Annotated[int, typer.Argument(parser=_version, metavar="VERSION", help="2 or v2.")],
    reason: Annotated[str, typer.Option(help="Why; required to promote a version the gate rejected.")] = "",
) -> None:
    """Make VERSION the champion; serving processes swap within their poll interval."""
    from core.registry import ReasonRequired, RegistryError

    try:
        with _registry(_settings()) as registry:
            row = registry.promote(version=version, reason=reason, default_reason="manual promote via CLI")
    except ReasonRequired as exc:
        console.print(f"[red]{exc}: pass --reason TEXT[/]")
        raise typer.Exit(1) from None
    except RegistryError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    console.print(f"[green]v{row.version} is the champion[/]")


@cli.command()
def rollback() -> None:
    """Re-promote the previous champion."""
    from core.registry import RegistryError

    try:
        with _registry(_settings()) as registry:
            row = registry.rollback(reason="rollback via CLI")
    except RegistryError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    console.print(f"[green]rolled back: v{row.version} is the champion[/]")


@cli.command()
def retrain(wait: bool = True) -> None:
    """Start a manual retrain run (single-flight across processes)."""
    from core.schema import Trigger
    from retrain.runs import NoChampion, RunInProgress

    settings = _settings()
    with _loop(settings) as loop:
        try:
            handle = loop.launch_retrain(trigger=Trigger.manual, reason="manual trigger via CLI")
        except RunInProgress as exc:
            console.print(f"[yellow]retrain run {exc.run_id} is already running[/]")
            raise typer.Exit(1) from None
        except NoChampion as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from None
        console.print(f"retrain run {handle.run_id} started (pid {handle.pid})")
        if wait:
            from monitor.notify import format_retrain_outcome

            with console.status("training and validating…"):
                status = handle.wait(settings.retrain_timeout_s + 60)
            if status == "running":
                console.print(f"run {handle.run_id}: still running")
                return
            with loop.sessions() as session:  # what it did and why: the gate's reasons for a rejection
                console.print(
                    format_retrain_outcome(session=session, run_id=handle.run_id)["text"], markup=False
                )
            if status == "failed":  # a rejection is the gate doing its work; a failure is not
                raise typer.Exit(1)


@cli.command()
def monitor() -> None:
    """Run the monitor once now and print its verdict."""
    from core.registry import ArtifactIntegrityError, FeatureMismatchError
    from monitor.jobs import MonitorBusy

    with _loop(_settings()) as loop:
        try:
            outcome = loop.run_monitor()
        except (ArtifactIntegrityError, FeatureMismatchError) as exc:
            console.print(f"[red]the monitor cannot run: {exc}[/]")
            raise typer.Exit(2) from None
        except MonitorBusy as exc:
            console.print(f"[yellow]{exc}: try again when it has finished[/]")
            raise typer.Exit(1) from None
    typer.echo(json.dumps(outcome.to_json(), indent=2, default=str))


@cli.command()
def generate(
    out: Path,
    rows: Annotated[int, typer.Option(min=0)] = 10_000,
    scenario: str = "none",
    start: str = "2019-01-01",
    end: str = "2021-12-31",
    change_at: str | None = None,
    seed: int = 0,
) -> None:
    """Write generated apartment transactions (with a drift scenario) to a CSV."""
    from core.files import file_in_the_way
    from core.generator import generate_transactions

    try:
        frame = generate_transactions(
            rows, start=start, end=end, scenario=scenario, change_at=change_at, seed=seed
        )
    except ValueError as exc:  # an unknown scenario, an unreadable or reversed date: named, not a traceback
        console.print(f"[red]generate: {escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(2) from None
    try:
        if out.is_dir():
            raise OSError(f"{out} is a directory; give the CSV file to write in it")
        if (blocked := file_in_the_way(out.parent)) is not None:
            raise OSError(f"{blocked} is a file, not a directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out, index=False)
    except OSError as exc:  # a directory, a parent that is a file, no permission: named, not a traceback
        reason = exc.strerror or str(exc)
        console.print(f"[red]generate: cannot write {escape(str(out))}: {escape(reason)}[/]", highlight=False)
        raise typer.Exit(2) from None
    console.print(f"wrote {len(frame)} rows to {out}")


@cli.command()
def demo(
    scenario: Annotated[str, typer.Option(help="none, rate_shock, new_town or unit_bug.")] = "rate_shock",
    state: Annotated[Path, typer.Option(help="Where the demo keeps its (wiped) state.")] = Path("var/demo"),
    seed: int = 0,
) -> None:
    """The whole loop on the embedded default: drift, alert, retrain, gate, hot swap."""
    from core.generator import SCENARIOS
    from service.demo import run_demo

    if scenario not in SCENARIOS:  # refused before the state is wiped and minutes of stable traffic streamed
        choices = ", ".join(SCENARIOS)
        console.print(f"[red]demo: unknown scenario {escape(repr(scenario))}; choose one of {choices}[/]")
        raise typer.Exit(2)
    raise typer.Exit(run_demo(scenario=scenario, state=state, seed=seed))


@cli.command()
def backtest(
    context: typer.Context,
    data: Annotated[str, typer.Option(help="A labelled CSV, or generated:SCENARIO (none, rate_shock, …).")],
    spec: Annotated[
        Path | None, typer.Option(help="Feature spec (default: DRIFTLOOP_SPEC_PATH or shipped).")
    ] = None,
    time_column: Annotated[str | None, typer.Option(help="Orders the history (default: the spec's).")] = None,
    label_delay: Annotated[
        str, typer.Option(help="How long after a prediction its label arrives (30d, 12h, 2w; m is minutes).")
    ] = "30d",
    policies: Annotated[str, typer.Option(help="Comma-separated: never, periodic, drift, oracle.")] = (
        "never,periodic,drift,oracle"
    ),
    initial_train_until: Annotated[
        str | None,
        typer.Option(help="v1 trains on rows before this (default: 40 % in; generated: 2022-01-01)."),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="summary.json, periods.csv, backtest.png and scratch state.")
    ] = Path("var/backtest"),
    step: Annotated[str, typer.Option(help="Simulated time per step (serve, labels, policy).")] = "7d",
    monitor_every: Annotated[
        str | None, typer.Option(help="Drift monitor cadence (default: --step).")
    ] = None,
    period: Annotated[str, typer.Option(help="The periodic policy's retrain interval.")] = "90d",
    rows: Annotated[int, typer.Option(help="Rows of generated data.", min=1, max=1_000_000)] = 36_000,
    seed: int = 0,
    change_at: Annotated[
        str | None,
        typer.Option(
            help="Known change points of a CSV's history, comma-separated (or none: a stable stream); "
            "adds detection delays and false retrains."
        ),
    ] = None,
) -> None:
    """Replay labelled history through retraining policies with the live monitor, policy, trainer and gate."""
    from core.spec import SpecError, load_spec
    from monitor.backtest.replay import (
        ReplayConfig,
        check_policies,
        check_timing,
        check_workdir,
        run_replay,
    )
    from monitor.backtest.results import (
        blind_monitor_warning,
        carried_breach_warnings,
        clear_outputs,
        failed_retrain_warning,
        summarize,
        write_outputs,
    )
    from monitor.backtest.stream import (
        GENERATED_PREFIX,
        BacktestInputError,
        duration_words,
        load_stream,
        parse_duration,
        parse_time,
    )
    from retrain.data import MissingColumnsError

    settings = _settings()
    chosen = tuple(p.strip() for p in policies.split(",") if p.strip())
    try:
        check_policies(chosen)
        if not data.startswith(GENERATED_PREFIX):
            for name in ("rows", "seed"):
                if getattr(context.get_parameter_source(name), "name", None) != "DEFAULT":
                    raise BacktestInputError(
                        f"--{name} makes generated data (--data generated:SCENARIO); {data} is replayed as "
                        "it is, every row"
                    )
        config = ReplayConfig(
            step=parse_duration(step, option="--step"),
            label_delay=parse_duration(label_delay, option="--label-delay"),
            monitor_every=parse_duration(monitor_every or step, option="--monitor-every"),
            period=parse_duration(period, option="--period"),
        )
        stream = load_stream(
            data, load_spec(spec or settings.spec_path), time_column=time_column, rows=rows, seed=seed
        )
        typed = initial_train_until is not None  # "" too: refused, not taken for the default
        until = (
            parse_time(initial_train_until, option="--initial-train-until")
            if initial_train_until is not None
            else stream.default_train_until()
        )
        cut = "--initial-train-until" if typed else "the default --initial-train-until"
        _, replayed = stream.split(until, cut=cut)
        if change_at is not None:
            stream = stream.with_change_points(change_at, until=until, cut=cut)
        defaulted = frozenset(
            name
            for name in ("step", "label_delay", "monitor_every", "period")
            if getattr(context.get_parameter_source(name), "name", None) == "DEFAULT"
        )
        last = replayed[stream.time_column].iloc[-1]
        check_timing(config, until=until, last=last, policies=chosen, defaulted=defaulted)
        check_workdir(out / "work")
    except MissingColumnsError as exc:
        shipped = "" if spec or settings.spec_path else _SHIPPED_SPEC.format(how="pass --spec FILE")
        console.print(f"[red]backtest: {exc}{shipped}[/]")
        raise typer.Exit(2) from None
    except (BacktestInputError, SpecError, ValueError) as exc:
        chosen_by_env = data.startswith(GENERATED_PREFIX) and spec is None and settings.spec_path
        hint = (
            f" (the spec is DRIFTLOOP_SPEC_PATH's, {settings.spec_path}: generated data needs the apartment "
            "spec, so pass --spec core/specs/apartments.yaml or unset the variable)"
            if chosen_by_env and "makes the apartment columns" in str(exc)
            else ""
        )
        console.print(f"[red]backtest: {exc}{hint}[/]")
        raise typer.Exit(2) from None

    workdir = out / "work"
    clear_outputs(out)  # checked; an earlier run's outputs must not outlive this one cut short
    console.print(
        f"{stream.source}: {len(stream.frame):,} rows; v1 trains before {_instant(until)}; "
        f"policies {', '.join(chosen)}; steps of {duration_words(config.step)}, labels "
        f"{duration_words(config.label_delay)} after their predictions"
    )
    with _progress() as progress:
        task = progress.add_task("training v1", total=None)

        def on_step(now: Any, k: int, n: int) -> None:
            progress.update(task, total=n, completed=k, description=f"replaying {now:%Y-%m-%d}")

        replay = run_replay(
            stream, settings=settings, config=config, policies=chosen, until=until, workdir=workdir,
            on_step=on_step,
        )  # fmt: skip
    summaries, periods = summarize(replay)
    paths = write_outputs(replay, summaries, periods, out)
    # The table is wide; on a narrow or non-terminal console rich would cut its figures short.
    Console(width=max(console.width, BACKTEST_TABLE_WIDTH)).print(_backtest_table(summaries))
    for summary in summaries:
        for warning in (
            blind_monitor_warning(summary, settings.min_window_rows),
            *carried_breach_warnings(summary),
            failed_retrain_warning(summary),
        ):
            if warning:
                console.print(f"[yellow]warning: {warning}[/]")
    for kind, path in paths.items():
        console.print(f"{kind}: {path}")


def _backtest_table(summaries: list[Any]) -> Table:
    from monitor.backtest.results import TABLE_COLUMNS, table_row

    table = Table(*TABLE_COLUMNS, title="backtest")
    for x in summaries:
        table.add_row(*table_row(x))
    return table


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _instant(at: datetime) -> str:
    """A day when the time is midnight (2022-01-01), else to the second (2023-07-04 18:46:12+00:00)."""
    return f"{at:%Y-%m-%d}" if (at.hour, at.minute, at.second, at.microsecond) == (0, 0, 0, 0) else str(at)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apscheduler", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cli()


if __name__ == "__main__":
    main()
