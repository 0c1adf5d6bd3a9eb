"""promo lot restrictions and receipt of a hold

Revision ID: a145ed1d3434
Revises: f8d625e33df8
Create Date: 2026-11-22 19:02:19.443104
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a145ed1d3434"
down_revision: str | None = "f8d625e33df8"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.add_column(sa.Column("store_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("receipt_amount", sa.BigInteger(), nullable=True))

    with op.batch_alter_table("lots", schema=None) as batch_op:
        batch_op.add_column(sa.Column("store_ids", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("max_receipt_share_bp", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("lots", schema=None) as batch_op:
        batch_op.drop_column("max_receipt_share_bp")
        batch_op.drop_column("store_ids")

    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.drop_column("receipt_amount")
        batch_op.drop_column("store_id")
