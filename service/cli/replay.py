"""`backtest`: replay labelled history through retraining policies."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from service.cli.common import SHIPPED_SPEC, console, given, progress_bar, read_settings

BACKTEST_TABLE_WIDTH = 180  # every column of the backtest table, unabridged


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

    settings = read_settings()
    chosen = tuple(p.strip() for p in policies.split(",") if p.strip())
    try:
        check_policies(chosen)
        if not data.startswith(GENERATED_PREFIX) and (extra := given(context, "rows", "seed")):
            raise BacktestInputError(
                f"--{extra[0]} makes generated data (--data generated:SCENARIO); {data} is replayed as it "
                "is, every row"
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
        timing = ("step", "label_delay", "monitor_every", "period")
        defaulted = frozenset(timing) - set(given(context, *timing))
        last = replayed[stream.time_column].iloc[-1]
        check_timing(config, until=until, last=last, policies=chosen, defaulted=defaulted)
        check_workdir(out / "work")
    except MissingColumnsError as exc:
        shipped = "" if spec or settings.spec_path else SHIPPED_SPEC.format(how="pass --spec FILE")
        console.print(f"[red]backtest: {escape(str(exc))}{shipped}[/]", highlight=False)
        raise typer.Exit(2) from None
    except (BacktestInputError, SpecError, ValueError) as exc:
        chosen_by_env = data.startswith(GENERATED_PREFIX) and spec is None and settings.spec_path
        hint = (
            f" (the spec is DRIFTLOOP_SPEC_PATH's, {settings.spec_path}: generated data needs the apartment "
            "spec, so pass --spec core/specs/apartments.yaml or unset the variable)"
            if chosen_by_env and "makes the apartment columns" in str(exc)
            else ""
        )
        console.print(f"[red]backtest: {escape(str(exc))}{hint}[/]", highlight=False)
        raise typer.Exit(2) from None

    workdir = out / "work"
    clear_outputs(out)  # checked; an earlier run's outputs must not outlive this one cut short
    console.print(
        f"{escape(stream.source)}: {len(stream.frame):,} rows; v1 trains before {_instant(until)}; "
        f"policies {', '.join(chosen)}; steps of {duration_words(config.step)}, labels "
        f"{duration_words(config.label_delay)} after their predictions"
    )
    with progress_bar() as progress:
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
                console.print(f"[yellow]warning: {escape(warning)}[/]", highlight=False)
    for kind, path in paths.items():
        console.print(f"{kind}: {escape(str(path))}", highlight=False)  # under --out, the user's text


def _backtest_table(summaries: list[Any]) -> Table:
    from monitor.backtest.results import TABLE_COLUMNS, table_row

    table = Table(*TABLE_COLUMNS, title="backtest")
    for x in summaries:
        table.add_row(*table_row(x))
    return table


def _instant(at: datetime) -> str:
    """A day when the time is midnight (2022-01-01), else to the second (2023-07-04 18:46:12+00:00)."""
    return f"{at:%Y-%m-%d}" if (at.hour, at.minute, at.second, at.microsecond) == (0, 0, 0, 0) else str(at)
