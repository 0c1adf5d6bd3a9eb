"""Blocked accounts through the real accounts service, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from loyalty.accounts.v1 import accounts_service_pb2 as pb
from services.accounts import store
from tests.integration.test_accounts_store import accounts_stub, accrue_request
from tests.integration.test_ledger_adjustments import adjust, payloads, tables
from tests.integration.test_ledger_holds import balance, credit, hold, refusal


def block(key: str, actor: str = "fraud-desk", reason: str = "fraud review #12") -> pb.BlockAccountRequest:
    return pb.BlockAccountRequest(request_id=key, holder_id="member-1", actor=actor, reason=reason)


def unblock(key: str, actor: str = "fraud-desk", reason: str = "review closed") -> pb.UnblockAccountRequest:
    return pb.UnblockAccountRequest(request_id=key, holder_id="member-1", actor=actor, reason=reason)


def redeem(key: str, amount: int) -> pb.RedeemPointsRequest:
    return pb.RedeemPointsRequest(request_id=key, holder_id="member-1", amount=amount, source_ref=key)


async def test_a_blocked_account_takes_and_pays_nothing_new_but_returns_and_earlier_holds_still_work(
    tmp_path: Path, database_url: str
) -> None:
    async with accounts_stub(tmp_path, database_url) as stub, tables(database_url) as sessions:
        await credit(stub, "r1", 1000)
        spent = await stub.RedeemPoints(redeem("spend-1", 200))
        placed = await stub.PlaceHold(hold("h-before", 100))
        kept = await stub.PlaceHold(hold("h-kept", 50))

        blocked = await stub.BlockAccount(block("b1"))
        assert (blocked.balance.blocked, blocked.balance.available) == (True, 650)
        assert await stub.BlockAccount(block("b1")) == blocked, "a retry answers the first"
        assert (await balance(stub)).blocked

        assert await refusal(stub.AccruePoints(accrue_request("r2", 50))) == "ACCOUNT_BLOCKED"
        assert await refusal(stub.PlaceHold(hold("h-after", 10))) == "ACCOUNT_BLOCKED"
        assert await refusal(stub.RedeemPoints(redeem("spend-2", 10))) == "ACCOUNT_BLOCKED"
        # A receipt calculated before the block is still paid: its goods are already handed over.
        capture = pb.CaptureHoldRequest(request_id="c1", hold_id=placed.hold.hold_id)
        captured = await stub.CaptureHold(capture)
        assert (captured.balance.active, captured.balance.available) == (700, 650)
        transfer = pb.TransferPointsRequest(
            request_id="t1", from_holder_id="member-1", to_holder_id="member-2", amount=10, reason="gift"
        )
        assert await refusal(stub.TransferPoints(transfer)) == "ACCOUNT_BLOCKED"
        inbound = pb.TransferPointsRequest(
            request_id="t2", from_holder_id="member-2", to_holder_id="member-1", amount=1, reason="gift"
        )
        await stub.AccruePoints(accrue_request("r-other", 5, holder_id="member-2"))
        assert await refusal(stub.TransferPoints(inbound)) == "ACCOUNT_BLOCKED"
        merge = pb.MergeAccountsRequest(request_id="m1", from_holder_id="member-2", to_holder_id="member-1", reason="x")
        assert await refusal(stub.MergeAccounts(merge)) == "ACCOUNT_BLOCKED"

        # The return of the earlier redemption, the release of a hold and a staff correction go through.
        reverse = pb.ReverseOperationRequest(request_id="ret-1", entry_id=spent.entry.entry_id, amount=200)
        returned = await stub.ReverseOperation(reverse)
        assert returned.balance.active == 900
        await stub.ReleaseHold(pb.ReleaseHoldRequest(request_id="rel-1", hold_id=kept.hold.hold_id))
        assert (await stub.AdjustPoints(adjust("fix-1", -1))).balance.available == 899
        assert (await balance(stub)).available == 899, "nothing refused was written"

        lifted = await stub.UnblockAccount(unblock("u1"))
        assert not lifted.balance.blocked
        assert (await stub.RedeemPoints(redeem("spend-3", 9))).balance.available == 890
        assert (await stub.AccruePoints(accrue_request("r3", 10))).balance.available == 900

        assert not (await stub.UnblockAccount(unblock("u2"))).balance.blocked, "unblocking twice changes nothing"
        async with sessions() as session:
            audit = (
                await session.execute(
                    select(
                        store.AccountBlockRow.blocked, store.AccountBlockRow.actor, store.AccountBlockRow.reason
                    ).order_by(store.AccountBlockRow.created_at)
                )
            ).all()
        assert [tuple(row) for row in audit] == [
            (True, "fraud-desk", "fraud review #12"),
            (False, "fraud-desk", "review closed"),
        ]
        assert [(e["holder_id"], e["actor"], e["reason"]) for e in await payloads(sessions, "account.blocked")] == [
            ("member-1", "fraud-desk", "fraud review #12")
        ]
        assert len(await payloads(sessions, "account.unblocked")) == 1


async def test_an_unknown_holder_can_be_blocked_before_the_first_accrual(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        assert (await stub.BlockAccount(block("b1"))).balance.blocked
        assert await refusal(stub.AccruePoints(accrue_request("r1", 50))) == "ACCOUNT_BLOCKED"
        assert (await balance(stub)).active == 0


async def test_a_block_needs_an_actor_and_a_reason(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        assert await refusal(stub.BlockAccount(block("b1", actor=" "))) == "INVALID_ARGUMENT"
        assert await refusal(stub.UnblockAccount(unblock("u1", reason=""))) == "INVALID_ARGUMENT"
        assert not (await balance(stub)).blocked
