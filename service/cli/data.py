"""Labelled data in: `bootstrap` (v1), `ingest`, and `generate` (the worked example's data)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from core.figures import figure
from service.cli.common import (
    SHIPPED_SPEC,
    console,
    given,
    open_registry,
    open_sessions,
    progress_bar,
    read_settings,
    read_spec,
)

if TYPE_CHECKING:
    from core.spec import FeatureSpec


def bootstrap(
    context: typer.Context,
    csv: Annotated[
        Path | None, typer.Option(help="Labelled CSV to train v1 on (default: generated data).")
    ] = None,
    rows: Annotated[int, typer.Option(help="Generated rows when no CSV is given.")] = 20_000,
    seed: int = 0,
) -> None:
    """Train, register and promote v1 if there is no champion yet (idempotent)."""
    from core.registry import RegistryError
    from core.spec import SpecError
    from retrain.bootstrap import bootstrap as do_bootstrap
    from retrain.data import DataError, MissingColumnsError
    from retrain.train import TrainParams

    # as the backtest refuses them with a CSV: `--rows 100` trained on every row
    if csv is not None and (extra := given(context, "rows", "seed")):
        console.print(
            f"[red]bootstrap: --{extra[0]} makes generated data (bootstrap without --csv); "
            f"{escape(str(csv))} is read as it is, every row[/]"
        )
        raise typer.Exit(2)
    settings = read_settings()
    spec = read_spec(settings)
    try:
        with console.status("training v1…"), open_registry(settings) as registry:
            result = do_bootstrap(
                registry=registry,
                spec=spec,
                params=TrainParams.from_settings(settings),
                holdout_fraction=settings.holdout_fraction,
                csv_path=csv,
                rows=rows,
                seed=seed,
            )
    except (DataError, SpecError, RegistryError) as exc:  # a champion that does not fit, or a damaged file
        shipped = isinstance(exc, MissingColumnsError) and settings.spec_path is None
        note = SHIPPED_SPEC.format(how="set DRIFTLOOP_SPEC_PATH to a spec") if shipped else ""
        console.print(f"[red]bootstrap: {escape(str(exc))}{note}[/]", highlight=False)
        raise typer.Exit(2) from None
    row = result.version
    verb = "trained and promoted" if result.created else "already the champion:"
    console.print(
        f"[green]{verb} v{row.version}[/] (validation MAE {figure(row.metrics.get('val_mae', float('nan')))})"
    )
    if result.rejected is not None:
        console.print(
            f"[yellow]this bootstrap trained v{result.rejected}, but another promoted v{row.version} first: "
            f"v{result.rejected} stays as a rejected version[/]"
        )
    elif csv is not None and not result.created:
        named = escape(str(csv))
        console.print(
            f"[yellow]{named} was not read: bootstrap only trains the first model. To learn from it, "
            f"`driftloop ingest {named}`, then `driftloop retrain`.[/]",
            highlight=False,
        )


def _to_load_the_rest(spec: FeatureSpec, loaded: int) -> str:
    if spec.time_column:  # rows carry their own time: a second ingest knows the rows it loaded
        return (
            "To load those, fix them and ingest the file again: the rows loaded now are known by their "
            f"{escape(spec.time_column)}, features and {escape(spec.target)}, and are not loaded a second "
            "time."
        )
    return (
        "To load those, put them, fixed, in a new file under the same header and ingest that: with no time "
        f"column in the spec, ingesting this file again, fixed, would load its {loaded} good row(s) a second "
        "time."
    )


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
    from core.csvcheck import IngestError, inspect_file
    from core.ingest import ingest_csv

    settings = read_settings()
    spec = read_spec(settings)
    try:
        csv_file = inspect_file(file)  # a missing or unreadable file is reported before any migration
        with open_sessions(settings) as sessions, progress_bar() as progress:
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
        console.print(f"[red]{escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(2) from None
    if report.already:
        before = report.already
        named = "" if before.name == str(file) else f" (from {escape(before.name)})"
        console.print(
            f"[yellow]{escape(str(file))} was already loaded[/]{named} as source "
            f"{escape(repr(before.source))}, last on {before.last_loaded_at:%Y-%m-%d %H:%M} UTC: "
            f"{before.rows} good row(s) in it (those an earlier file had loaded stay under that file's "
            "source). Nothing loaded now."
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
            f"[green]{report.loaded} row(s) loaded[/] as source {escape(repr(source or file.name))}, "
            f"{report.bad} bad line(s) skipped (listed below). {_to_load_the_rest(spec, report.loaded)}"
        )
    else:
        console.print(
            f"[green]{report.loaded} row(s) loaded[/] as source {escape(repr(source or file.name))}"
        )
    if report.repeated:
        console.print(
            f"{report.repeated} row(s) an earlier file loaded (the same {escape(str(spec.time_column))}, "
            f"features and {escape(spec.target)}) were not loaded again; --force loads them a second time."
        )
    if report.ignored_columns:
        ignored = ", ".join(map(repr, report.ignored_columns))
        console.print(f"column(s) the spec does not read, not loaded: {escape(ignored)}")
    for line, problems in report.rejected[:show]:
        console.print(f"  line {line}: " + escape("; ".join(problems)))
    if report.bad > min(show, len(report.rejected)):
        console.print(f"  … and {report.bad - min(show, len(report.rejected))} more")
    if report.bad and not skip_bad:
        raise typer.Exit(1)


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
    console.print(f"wrote {len(frame)} rows to {escape(str(out))}", highlight=False)
