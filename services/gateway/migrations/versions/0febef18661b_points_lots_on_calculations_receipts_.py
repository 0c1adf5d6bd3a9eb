"""points lots on calculations, receipts and returns

Revision ID: 0febef18661b
Revises: 1fd17c20c56c
Create Date: 2026-11-22 22:17:01.509218
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0febef18661b"
down_revision: str | None = "1fd17c20c56c"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("calculations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("points_lots", sa.LargeBinary(), nullable=True))

    with op.batch_alter_table("receipt_returns", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lots_taken_back", sa.JSON(), nullable=True))

    with op.batch_alter_table("receipts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("points_lots", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("accrual_entry_ids", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("receipts", schema=None) as batch_op:
        batch_op.drop_column("accrual_entry_ids")
        batch_op.drop_column("points_lots")

    with op.batch_alter_table("receipt_returns", schema=None) as batch_op:
        batch_op.drop_column("lots_taken_back")

    with op.batch_alter_table("calculations", schema=None) as batch_op:
        batch_op.drop_column("points_lots")
