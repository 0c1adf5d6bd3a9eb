"""coalition partners of lots, redemptions and holds

Revision ID: e99152e192eb
Revises: a145ed1d3434
Create Date: 2026-11-22 19:30:02.196321
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e99152e192eb"
down_revision: str | None = "a145ed1d3434"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("entries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("partner_id", sa.String(length=64), nullable=True))

    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.add_column(sa.Column("partner_id", sa.String(length=64), nullable=True))

    with op.batch_alter_table("lots", schema=None) as batch_op:
        batch_op.add_column(sa.Column("partner_id", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("lots", schema=None) as batch_op:
        batch_op.drop_column("partner_id")

    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.drop_column("partner_id")

    with op.batch_alter_table("entries", schema=None) as batch_op:
        batch_op.drop_column("partner_id")
