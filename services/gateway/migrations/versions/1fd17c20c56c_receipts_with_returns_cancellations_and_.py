"""receipts with returns, cancellations and points payments; api keys

Revision ID: 1fd17c20c56c
Revises: f92cda43c9b7
Create Date: 2026-11-22 18:40:18.572130
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "1fd17c20c56c"
down_revision: str | None = "f92cda43c9b7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("partner_id", sa.String(length=64), nullable=False),
        sa.Column("store_ids", sa.JSON(), nullable=False),
        sa.Column("description", sa.String(length=200), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key_id"),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_api_keys_partner_id"), ["partner_id"], unique=False)

    op.create_table(
        "idempotency_keys",
        sa.Column("scope", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("response", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("scope", "key"),
    )
    op.create_table(
        "receipt_returns",
        sa.Column("partner_id", sa.String(length=64), nullable=False),
        sa.Column("return_id", sa.String(length=128), nullable=False),
        sa.Column("terminal_id", sa.String(length=64), nullable=False),
        sa.Column("receipt_number", sa.String(length=64), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("points_taken_back", sa.BigInteger(), nullable=False),
        sa.Column("points_refunded", sa.BigInteger(), nullable=False),
        sa.Column("reinstate_coupons", sa.Boolean(), nullable=False),
        sa.Column("response", sa.LargeBinary(), nullable=False),
        sa.Column("saga_state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(length=500), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("partner_id", "return_id"),
    )
    with op.batch_alter_table("receipt_returns", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_receipt_returns_saga_state"), ["saga_state"], unique=False)

    op.create_table(
        "receipts",
        sa.Column("partner_id", sa.String(length=64), nullable=False),
        sa.Column("terminal_id", sa.String(length=64), nullable=False),
        sa.Column("receipt_number", sa.String(length=64), nullable=False),
        sa.Column("store_id", sa.String(length=64), nullable=False),
        sa.Column("receipt_hash", sa.String(length=64), nullable=False),
        sa.Column("receipt", sa.LargeBinary(), nullable=False),
        sa.Column("identifier", sa.LargeBinary(), nullable=False),
        sa.Column("evaluated", sa.Boolean(), nullable=False),
        sa.Column("calculation_id", sa.String(length=36), nullable=False),
        sa.Column("offline", sa.Boolean(), nullable=False),
        sa.Column("member_id", sa.String(length=64), nullable=False),
        sa.Column("holder_id", sa.String(length=64), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column("points_paid", sa.BigInteger(), nullable=False),
        sa.Column("hold_id", sa.String(length=64), nullable=False),
        sa.Column("coupon_reservations", sa.JSON(), nullable=False),
        sa.Column("response", sa.LargeBinary(), nullable=False),
        sa.Column("saga_state", sa.String(length=16), nullable=False),
        sa.Column("accrual_entry_id", sa.String(length=64), nullable=False),
        sa.Column("redemption_entry_id", sa.String(length=64), nullable=False),
        sa.Column("returned", sa.JSON(), nullable=False),
        sa.Column("cancelled", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(length=500), nullable=False),
        sa.Column("committed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("partner_id", "terminal_id", "receipt_number"),
    )
    with op.batch_alter_table("receipts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_receipts_saga_state"), ["saga_state"], unique=False)

    with op.batch_alter_table("cheques", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cheques_state"))

    op.drop_table("cheques")
    # Calculations live for minutes (their holds lapse), so the table is recreated rather
    # than migrated; committed receipts move to `receipts`, keyed by partner as well.
    with op.batch_alter_table("calculations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_calculations_created_at"))
    op.drop_table("calculations")
    op.create_table(
        "calculations",
        sa.Column("calculation_id", sa.String(length=36), nullable=False),
        sa.Column("partner_id", sa.String(length=64), nullable=False),
        sa.Column("receipt_hash", sa.String(length=64), nullable=False),
        sa.Column("member_id", sa.String(length=64), nullable=False),
        sa.Column("holder_id", sa.String(length=64), nullable=False),
        sa.Column("hold_id", sa.String(length=64), nullable=False),
        sa.Column("points_to_pay", sa.BigInteger(), nullable=False),
        sa.Column("coupon_reservations", sa.JSON(), nullable=False),
        sa.Column("evaluation", sa.LargeBinary(), nullable=False),
        sa.Column("response", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("expire_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("calculation_id"),
    )
    with op.batch_alter_table("calculations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_calculations_created_at"), ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("calculations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_calculations_created_at"))
    op.drop_table("calculations")
    op.create_table(
        "calculations",
        sa.Column("calculation_id", sa.String(length=36), nullable=False),
        sa.Column("receipt_hash", sa.String(length=64), nullable=False),
        sa.Column("member_id", sa.String(length=64), nullable=False),
        sa.Column("holder_id", sa.String(length=64), nullable=False),
        sa.Column("response", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("calculation_id"),
    )
    with op.batch_alter_table("calculations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_calculations_created_at"), ["created_at"], unique=False)

    op.create_table(
        "cheques",
        sa.Column("terminal_id", sa.VARCHAR(length=64), nullable=False),
        sa.Column("receipt_number", sa.VARCHAR(length=64), nullable=False),
        sa.Column("receipt_hash", sa.VARCHAR(length=64), nullable=False),
        sa.Column("member_id", sa.VARCHAR(length=64), nullable=False),
        sa.Column("holder_id", sa.VARCHAR(length=64), nullable=False),
        sa.Column("points", sa.BIGINT(), nullable=False),
        sa.Column("response", sa.BLOB(), nullable=False),
        sa.Column("state", sa.VARCHAR(length=16), nullable=False),
        sa.Column("attempts", sa.INTEGER(), nullable=False),
        sa.Column("last_error", sa.VARCHAR(length=500), nullable=False),
        sa.Column("committed_at", sa.DATETIME(), nullable=False),
        sa.Column("completed_at", sa.DATETIME(), nullable=True),
        sa.PrimaryKeyConstraint("terminal_id", "receipt_number"),
    )
    with op.batch_alter_table("cheques", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_cheques_state"), ["state"], unique=False)

    with op.batch_alter_table("receipts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_receipts_saga_state"))

    op.drop_table("receipts")
    with op.batch_alter_table("receipt_returns", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_receipt_returns_saga_state"))

    op.drop_table("receipt_returns")
    op.drop_table("idempotency_keys")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_partner_id"))
        batch_op.drop_index(batch_op.f("ix_api_keys_created_at"))

    op.drop_table("api_keys")
