"""ground_truth.received_at, labelled_row.ingested_at indexed: the policy counts the labels that arrived
since a rejected run on every monitor run, and without them each count read the whole table

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_ground_truth_received_at", "ground_truth", ["received_at"])
    op.create_index("ix_labelled_row_ingested_at", "labelled_row", ["ingested_at"])


def downgrade() -> None:
    op.drop_index("ix_labelled_row_ingested_at", table_name="labelled_row")
    op.drop_index("ix_ground_truth_received_at", table_name="ground_truth")
