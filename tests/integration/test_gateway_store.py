"""The gateway's durable receipt records against real SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from loyalty.rules.v1 import rules_service_pb2 as rules
from loyalty.runtime import db
from loyalty.runtime.timeutil import utcnow
from services.gateway import store
from services.gateway.domain import ReceiptKey, SagaState
from services.gateway.saga import cheque_lots, lot_reversals
from tests import infra


def cheque(number: str, minutes_ago: int = 10, partner: str = "P1") -> store.ChequeRow:
    return store.ChequeRow(
        partner_id=partner,
        terminal_id="T1",
        receipt_number=number,
        store_id="S1",
        receipt_hash="h" * 64,
        receipt=b"",
        identifier=b"",
        evaluated=True,
        calculation_id="",
        offline=False,
        member_id="m-1",
        holder_id="m-1",
        points=500,
        points_paid=0,
        hold_id="",
        coupon_reservations=[["CODE", "r-1", "receipt:P1:T1:1"]],
        response=b"\x08\x02",
        saga_state=SagaState.COMMITTED.value,
        accrual_entry_id="",
        redemption_entry_id="",
        returned={"1": 500},
        cancelled=False,
        attempts=0,
        last_error="",
        committed_at=utcnow() - timedelta(minutes=minutes_ago),
        completed_at=None,
    )


async def test_a_receipt_is_recorded_once_per_partner_terminal_and_number(database_url: str) -> None:
    async with infra.migrated_engine("gateway", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            assert await store.add_cheque_if_new(session, cheque("1"))
        retry = cheque("1")
        retry.points = 999
        async with sessions() as session, session.begin():
            assert not await store.add_cheque_if_new(session, retry)
            assert await store.add_cheque_if_new(session, cheque("1", partner="P2")), "another partner's terminal"
        async with sessions() as session:
            found = await store.find_cheque(session, ReceiptKey("P1", "T1", "1"))
        assert found is not None and found.points == 500 and found.committed_at.tzinfo is not None
        assert found.returned_quantities == {1: 500}
        assert found.coupon_reservations == [["CODE", "r-1", "receipt:P1:T1:1"]]


async def test_unfinished_receipts_are_found_oldest_first_until_completed(database_url: str) -> None:
    async with infra.migrated_engine("gateway", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            await store.add_cheque_if_new(session, cheque("new", minutes_ago=0))
            await store.add_cheque_if_new(session, cheque("old", minutes_ago=30))
            await store.add_cheque_if_new(session, cheque("older", minutes_ago=60))
        cutoff = utcnow() - timedelta(minutes=1)
        async with sessions() as session:
            pending = await store.unfinished_cheques(session, cutoff, limit=10)
        assert [key.receipt_number for key in pending] == ["older", "old"], "a fresh commit is left to its caller"

        async with sessions() as session, session.begin():
            await store.record_attempt(session, ReceiptKey("P1", "T1", "old"), "UPSTREAM_UNAVAILABLE: accounts down")
            older = await store.find_cheque(session, ReceiptKey("P1", "T1", "older"), lock=True)
            assert older is not None
            older.saga_state = SagaState.COMPLETED.value
        async with sessions() as session:
            pending = await store.unfinished_cheques(session, cutoff, limit=10)
            old = await store.find_cheque(session, ReceiptKey("P1", "T1", "old"))
            assert await store.count_unfinished(session) == 2
        assert [key.receipt_number for key in pending] == ["old"]
        assert old is not None and (old.attempts, old.last_error) == (1, "UPSTREAM_UNAVAILABLE: accounts down")


async def test_lapsed_calculations_are_purged_and_recent_ones_kept(database_url: str) -> None:
    async with infra.migrated_engine("gateway", database_url) as engine:
        sessions = db.create_session_factory(engine)

        def calculation(calculation_id: str, hours_ago: int) -> store.CalculationRow:
            created = utcnow() - timedelta(hours=hours_ago)
            return store.CalculationRow(
                calculation_id=calculation_id,
                partner_id="P1",
                receipt_hash="h" * 64,
                member_id="",
                holder_id="",
                hold_id="",
                points_to_pay=0,
                coupon_reservations=[],
                evaluation=b"",
                response=b"",
                state="open",
                expire_at=created + timedelta(minutes=15),
                created_at=created,
            )

        async with sessions() as session, session.begin():
            await store.add_calculation(session, calculation("old", hours_ago=30))
            await store.add_calculation(session, calculation("recent", hours_ago=2))
        async with sessions() as session, session.begin():
            assert await store.purge_calculations(session, utcnow() - timedelta(days=1)) == 1
        async with sessions() as session:
            assert await store.find_calculation(session, "old") is None
            assert await store.find_calculation(session, "recent") is not None


async def test_a_receipt_keeps_its_lots_and_their_entries_and_one_from_before_lots_has_one(
    database_url: str,
) -> None:
    promo = rules.PointsLotResult(points=100, currency="PROMO", lifetime_days=30)
    with_lots = cheque("lots")
    with_lots.points_lots = rules.EvaluateReceiptResponse(
        points_lots=[rules.PointsLotResult(points=400), promo]
    ).SerializeToString()
    with_lots.accrual_entry_ids = ["e-1", "e-2"]
    async with infra.migrated_engine("gateway", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            assert await store.add_cheque_if_new(session, with_lots)
            assert await store.add_cheque_if_new(session, cheque("old"))
        async with sessions() as session:
            found = await store.find_cheque(session, ReceiptKey("P1", "T1", "lots"))
            old = await store.find_cheque(session, ReceiptKey("P1", "T1", "old"))
    assert found is not None and old is not None
    assert [(lot.points, lot.currency, lot.lifetime_days) for lot in cheque_lots(found)] == [
        (400, "", 0),
        (100, "PROMO", 30),
    ]
    assert found.accrual_entry_ids == ["e-1", "e-2"]
    assert (old.points_lots, old.accrual_entry_ids) == (None, None)
    assert [lot.points for lot in cheque_lots(old)] == [500], "a receipt from before lots is one lot"
    old.accrual_entry_id = "e-old"
    legacy_return = store.ReturnRow(points_taken_back=120, lots_taken_back=None)
    assert lot_reversals(old, legacy_return) == [("e-old", 120)]
    assert lot_reversals(found, store.ReturnRow(points_taken_back=120, lots_taken_back=[96, 24])) == [
        ("e-1", 96),
        ("e-2", 24),
    ]
