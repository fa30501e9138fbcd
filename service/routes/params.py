"""Parameters shared by the routes."""

from typing import Annotated

from fastapi import Path

from core.schema import MAX_ID

# A row's id in the URL: out of the columns' range it is refused by name (422), never sent to the database.
RowId = Annotated[int, Path(ge=1, le=MAX_ID)]
