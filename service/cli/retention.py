"""`prune`: what grows, deleted in short batches."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from service.cli.common import console, database_errors, open_sessions, progress_bar, read_settings

if TYPE_CHECKING:
    from core.retention import Retention


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

    settings = read_settings()
    now = datetime.now(UTC)
    cutoff = now - timedelta(days=older_than)
    with open_sessions(settings) as sessions:
        with database_errors(), sessions() as session:
            retention = plan(
                session, cutoff=cutoff, window_rows=settings.window_rows, labelled=labelled,
                artifact_dir=settings.artifact_dir if artifacts else None,
            )  # fmt: skip
        _print_retention(retention, artifacts=artifacts)
        if artifacts and not settings.artifact_dir.is_dir():  # "none" alone read as nothing to prune
            console.print(
                f"[yellow]warning: DRIFTLOOP_ARTIFACT_DIR {escape(str(settings.artifact_dir))} is not a "
                "directory here, so no artifacts were looked at: is the artifact volume mounted?[/]",
                highlight=False,
            )
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
            with progress_bar() as progress:
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
