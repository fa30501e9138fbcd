"""drift_report.mean_error: the accuracy window's bias (prediction − actual), beside its MAE

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("drift_report", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mean_error", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("drift_report", schema=None) as batch_op:
        batch_op.drop_column("mean_error")
