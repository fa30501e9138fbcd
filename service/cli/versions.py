"""The registry by hand: `models`, `promote`, `rollback`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.figures import figure
from service.cli.common import console, open_registry, read_settings


def models() -> None:
    """List model versions."""
    with open_registry(read_settings()) as registry:
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


def promote(
    version: Annotated[int, typer.Argument(parser=_version, metavar="VERSION", help="2 or v2.")],
    reason: Annotated[str, typer.Option(help="Why; required to promote a version the gate rejected.")] = "",
) -> None:
    """Make VERSION the champion; serving processes swap within their poll interval."""
    from core.registry import ReasonRequired, RegistryError

    try:
        with open_registry(read_settings()) as registry:
            row = registry.promote(version=version, reason=reason, default_reason="manual promote via CLI")
    except ReasonRequired as exc:
        console.print(f"[red]{escape(str(exc))}: pass --reason TEXT[/]", highlight=False)
        raise typer.Exit(1) from None
    except RegistryError as exc:
        console.print(f"[red]{escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"[green]v{row.version} is the champion[/]")


def rollback() -> None:
    """Re-promote the previous champion."""
    from core.registry import RegistryError

    try:
        with open_registry(read_settings()) as registry:
            row = registry.rollback(reason="rollback via CLI")
    except RegistryError as exc:
        console.print(f"[red]{escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"[green]rolled back: v{row.version} is the champion[/]")
