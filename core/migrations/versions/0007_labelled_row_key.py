"""labelled_row.row_key: a row a later file repeats (overlapping exports) is not loaded twice; the
event_time index becomes (event_time, row_key), where an ingest looks a row up

Rows already loaded get their key here, those whose file gave an event time: without a time column an
ingest stamps event_time with its own ingested_at, and such rows stay NULL (never compared).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from core.schema import UTCDateTime, row_key

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 5000


def upgrade() -> None:
    with op.batch_alter_table("labelled_row", schema=None) as batch_op:
        batch_op.add_column(sa.Column("row_key", sa.BigInteger(), nullable=True))
    _backfill()
    op.drop_index("ix_labelled_row_event_time", table_name="labelled_row")
    op.create_index("ix_labelled_row_event_time_row_key", "labelled_row", ["event_time", "row_key"])


def _backfill() -> None:
    rows = sa.table(
        "labelled_row",
        sa.column("id", sa.Integer),
        sa.column("features", sa.JSON),
        sa.column("target", sa.Float),
        sa.column("event_time", UTCDateTime()),
        sa.column("ingested_at", UTCDateTime()),
        sa.column("row_key", sa.BigInteger),
    )
    conn = op.get_bind()
    after = 0
    while batch := conn.execute(
        sa.select(rows.c.id, rows.c.features, rows.c.target, rows.c.event_time)
        .where(rows.c.id > after, rows.c.event_time != rows.c.ingested_at)
        .order_by(rows.c.id)
        .limit(BATCH)
    ).all():
        conn.execute(
            sa.update(rows).where(rows.c.id == sa.bindparam("row_id")).values(row_key=sa.bindparam("key")),
            [{"row_id": r.id, "key": row_key(r.event_time, r.features, r.target)} for r in batch],
        )
        after = batch[-1].id


def downgrade() -> None:
    op.drop_index("ix_labelled_row_event_time_row_key", table_name="labelled_row")
    op.create_index("ix_labelled_row_event_time", "labelled_row", ["event_time"])
    with op.batch_alter_table("labelled_row", schema=None) as batch_op:
        batch_op.drop_column("row_key")
