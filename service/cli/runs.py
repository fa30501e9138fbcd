"""One-shot runs of the loop: `retrain`, `monitor`, and the `demo` of it all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from service.cli.common import console, open_loop, read_settings


def retrain(wait: bool = True) -> None:
    """Start a manual retrain run (single-flight across processes)."""
    from core.schema import Trigger
    from retrain.runs import NoChampion, RunInProgress

    settings = read_settings()
    with open_loop(settings) as loop:
        try:
            handle = loop.launch_retrain(trigger=Trigger.manual, reason="manual trigger via CLI")
        except RunInProgress as exc:
            console.print(f"[yellow]retrain run {exc.run_id} is already running[/]")
            raise typer.Exit(1) from None
        except NoChampion as exc:
            console.print(f"[red]{escape(str(exc))}[/]", highlight=False)
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


def monitor() -> None:
    """Run the monitor once now and print its verdict."""
    from core.registry import ArtifactIntegrityError, FeatureMismatchError
    from monitor.jobs import MonitorBusy

    with open_loop(read_settings()) as loop:
        try:
            outcome = loop.run_monitor()
        except (ArtifactIntegrityError, FeatureMismatchError) as exc:
            console.print(f"[red]the monitor cannot run: {escape(str(exc))}[/]", highlight=False)
            raise typer.Exit(2) from None
        except MonitorBusy as exc:
            console.print(f"[yellow]{exc}: try again when it has finished[/]")
            raise typer.Exit(1) from None
    typer.echo(json.dumps(outcome.to_json(), indent=2, default=str))


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
