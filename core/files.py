"""Naming why a file or folder given by a user could not be read or used, the same way for every kind."""

from __future__ import annotations

import difflib
import unicodedata
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


def missing_columns(header: list[str], required: list[str]) -> str:
    """The `required` columns the CSV `header` lacks, each with a header column spelt nearly the same
    (`floor (the header has 'Floor')`), and why all are missing when the file is not comma-separated; ""
    when none is missing."""
    missing = [c for c in required if c not in header]
    if not missing:
        return ""
    hint = ""
    if len(header) == 1 and ";" in header[0]:
        hint = " (the header is one column holding ';': save the file comma-separated)"
    return ", ".join(name + _near(name, header, required) for name in missing) + hint


def _near(name: str, header: list[str], required: list[str]) -> str:
    """' (the header has 'x ')' for a column named nearly as the spec names it, else ''."""
    others = [h for h in header if h not in required]
    nfc = unicodedata.normalize("NFC", name)
    if same := [h for h in others if unicodedata.normalize("NFC", h) == nfc]:  # 기온 as NFC and as NFD
        return (
            f" (the header has {same[0]!r}, the same text in another Unicode form: save the spec and the "
            "file in one form, NFC)"
        )
    close = [h for h in others if h.strip().casefold() == name.casefold()]
    close = close or difflib.get_close_matches(name, others, n=1, cutoff=0.8)
    return f" (the header has {close[0]!r})" if close else ""


def file_in_the_way(folder: Path) -> Path | None:
    """The nearest of `folder` and its parents that exists, when it is a file: a folder cannot be made
    there. None when that one is a directory, or none exists yet (it can be made)."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None
