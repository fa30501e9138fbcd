"""Parameters shared by the routes."""

from typing import Annotated

from fastapi import Path, Query
from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from core.schema import MAX_ID

# A row's id in the URL: out of the columns' range it is refused by name (422), never sent to the database.
RowId = Annotated[int, Path(ge=1, le=MAX_ID)]

MAX_LIST = 500
# How many rows a list returns: 0 or fewer is refused by name (422); more than MAX_LIST returns MAX_LIST.
Limit = Annotated[int, Query(ge=1, description=f"How many, newest first; at most {MAX_LIST} are returned.")]


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise PydanticCustomError("nul_character", "must not contain the NUL character (\\u0000)")
    return value


# Text that reaches a database column: PostgreSQL cannot store NUL in text (a 500, it was), SQLite can.
Text = Annotated[str, AfterValidator(_no_nul)]
