"""mass operation chunks and capped points

Revision ID: e7a9ec8b1aa6
Revises: 6d7c72f93e08
Create Date: 2026-11-22 21:45:24.625416
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e7a9ec8b1aa6"
down_revision: str | None = "6d7c72f93e08"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "mass_operation_chunks",
        sa.Column("operation_id", sa.String(length=36), nullable=False),
        sa.Column("first_index", sa.Integer(), nullable=False),
        sa.Column("last_index", sa.Integer(), nullable=False),
        sa.Column("applied", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column("capped", sa.BigInteger(), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["operation_id"], ["mass_operations.operation_id"], name="fk_mass_operation_chunks_operation"
        ),
        sa.PrimaryKeyConstraint("operation_id", "first_index"),
    )
    with op.batch_alter_table("mass_operation_items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("capped", sa.BigInteger(), nullable=True))
    # Progress is now summed over chunks: what operations applied before this revision
    # becomes one chunk each.
    op.execute(
        """
        INSERT INTO mass_operation_chunks
            (operation_id, first_index, last_index, applied, failed, points, capped, applied_at)
        SELECT items.operation_id, MIN(items.item_index), MAX(items.item_index),
               SUM(CASE WHEN items.status = 'applied' THEN 1 ELSE 0 END),
               SUM(CASE WHEN items.status = 'failed' THEN 1 ELSE 0 END),
               SUM(CASE WHEN items.status <> 'applied' THEN 0
                        WHEN operations.kind = 'deduction' THEN -items.amount ELSE items.amount END),
               0, CURRENT_TIMESTAMP
        FROM mass_operation_items AS items
        JOIN mass_operations AS operations ON operations.operation_id = items.operation_id
        WHERE items.status <> 'pending'
        GROUP BY items.operation_id
        """
    )


def downgrade() -> None:
    with op.batch_alter_table("mass_operation_items", schema=None) as batch_op:
        batch_op.drop_column("capped")

    op.drop_table("mass_operation_chunks")
