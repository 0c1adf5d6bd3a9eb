"""adjustments audit and hold member

Revision ID: f8d625e33df8
Revises: c811601afb9a
Create Date: 2026-11-22 18:37:06.145091
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f8d625e33df8"
down_revision: str | None = "c811601afb9a"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "adjustments",
        sa.Column("entry_id", sa.String(length=36), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("member_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.account_id"], name="fk_adjustments_account"),
        sa.ForeignKeyConstraint(["entry_id"], ["entries.entry_id"], name="fk_adjustments_entry"),
        sa.PrimaryKeyConstraint("entry_id"),
    )
    with op.batch_alter_table("adjustments", schema=None) as batch_op:
        batch_op.create_index("ix_adjustments_account_created", ["account_id", "created_at"], unique=False)

    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.add_column(sa.Column("member_id", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.drop_column("member_id")

    with op.batch_alter_table("adjustments", schema=None) as batch_op:
        batch_op.drop_index("ix_adjustments_account_created")

    op.drop_table("adjustments")
