"""Naming why a file given by a user could not be read, the same way for every kind of file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def read_errors(
    path: Path, error: Callable[[str], Exception], *, kind: str, missing: str | None = None
) -> Iterator[None]:
    """Turn an OSError raised inside into `error(message)` naming the problem: missing (`missing`, by
    default "file not found: PATH"), a directory (where the `kind` of file was expected), or unreadable."""
    try:
        yield
    except FileNotFoundError:
        raise error(missing or f"file not found: {path}") from None
    except IsADirectoryError:
        raise error(f"{path} is a directory; give the {kind} in it") from None
    except OSError as exc:
        raise error(f"{path} cannot be read: {exc.strerror or exc}") from None
