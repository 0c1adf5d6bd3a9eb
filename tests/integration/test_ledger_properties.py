"""Conservation over random sequences of ledger operations, on SQLite and PostgreSQL.

Hypothesis draws sequences of accruals (some activating later, some expiring), holds
placed, captured in part and released, redemptions, reversals in part, and a clock that
moves forward with or without the expiry job. After every step the ledger must agree
with itself: the entries add up to the balance, no lot holds less than nothing or more
than it was credited, a refusal happens exactly when the model says it must, and the
balance only goes below zero by a recorded return.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.runtime import db
from loyalty.runtime.errors import DomainError
from services.accounts import jobs, service, store
from services.accounts.domain import (
    Accrual,
    AccrualSource,
    Adjustment,
    Balance,
    balance_at,
    held_total,
    next_expiries,
)
from services.accounts.metrics import LedgerMetrics
from tests import infra

CURRENCY = "BONUS"
START = datetime(2031, 1, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Accrue:
    amount: int
    activates_in_days: int
    lifetime_days: int | None


@dataclass(frozen=True)
class PlaceHold:
    amount: int
    ttl_hours: int


@dataclass(frozen=True)
class Capture:
    pick: int
    amount: int  # 0 captures the whole hold


@dataclass(frozen=True)
class Release:
    pick: int


@dataclass(frozen=True)
class Redeem:
    amount: int


@dataclass(frozen=True)
class Reverse:
    pick: int
    amount: int  # 0 reverses all that is left


@dataclass(frozen=True)
class Adjust:
    amount: int  # positive credits, negative debits


@dataclass(frozen=True)
class Transfer:
    amount: int
    outward: bool  # from the holder to its partner, else back


@dataclass(frozen=True)
class Merge:
    outward: bool  # the holder into its partner, else the partner into the holder


@dataclass(frozen=True)
class Advance:
    hours: int
    run_expiry_job: bool


Step = Accrue | PlaceHold | Capture | Release | Redeem | Reverse | Adjust | Transfer | Merge | Advance

credits = st.integers(min_value=20, max_value=300)
spends = st.integers(min_value=1, max_value=80)
parts = st.one_of(st.just(0), spends)  # 0: all of it
picks = st.integers(min_value=0, max_value=50)
accruals = st.builds(
    Accrue, credits, st.sampled_from([0, 0, 0, 1, 3]), st.one_of(st.none(), st.integers(min_value=1, max_value=4))
)
reversals = st.builds(Reverse, picks, st.one_of(st.just(0), st.integers(min_value=1, max_value=40)))
steps = st.one_of(
    accruals,
    accruals,  # twice as likely as each other step, so there are points to spend
    st.builds(PlaceHold, spends, st.integers(min_value=1, max_value=24)),
    st.builds(Capture, picks, parts),
    st.builds(Release, picks),
    st.builds(Redeem, spends),
    reversals,
    reversals,  # twice as likely too: debts and restored lots need them
    st.builds(Adjust, st.integers(min_value=-80, max_value=150).filter(bool)),
    st.builds(Transfer, spends, st.booleans()),
    st.builds(Merge, st.booleans()),
    st.builds(Advance, st.integers(min_value=6, max_value=96), st.booleans()),
)


class Clock:
    """The ledger's `utcnow`, moved forward by the test."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@dataclass
class HoldModel:
    hold_id: str
    amount: int
    expires_at: datetime
    state: str = "active"


@dataclass
class Operation:
    """An accrual or redemption that may be reversed, and how much of it has been."""

    entry_id: str
    amount: int
    reversed: int = 0


@dataclass
class Model:
    holder_id: str
    partner_id: str  # a second holder points are transferred to and merged with
    holds: list[HoldModel] = field(default_factory=list)
    operations: list[Operation] = field(default_factory=list)


@pytest.fixture
async def ledger(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    async with infra.migrated_engine("accounts", database_url) as engine:
        yield db.create_session_factory(engine)


def expected_refusal(step: Step, model: Model, before: Balance, partner: Balance, now: datetime) -> str | None:
    """The reason the ledger must refuse `step` with, None when it must accept it, or ""
    when either is right (a capture that lots expired or reversed under may fall short)."""
    if isinstance(step, Transfer):
        return "INSUFFICIENT_POINTS" if step.amount > (before if step.outward else partner).available else None
    if isinstance(step, Merge):
        live = any(hold.state == "active" and now < hold.expires_at for hold in model.holds)
        return "ACCOUNT_HAS_LIVE_HOLDS" if step.outward and live else None
    if isinstance(step, PlaceHold | Redeem) or (isinstance(step, Adjust) and step.amount < 0):
        return "INSUFFICIENT_POINTS" if abs(step.amount) > before.available else None
    if isinstance(step, Capture | Release):
        if not model.holds:
            return "HOLD_NOT_FOUND"
        hold = model.holds[step.pick % len(model.holds)]
        if hold.state == "captured":
            return "HOLD_ALREADY_CAPTURED"
        if hold.state == "released":
            return "HOLD_RELEASED"
        if now >= hold.expires_at:
            return "HOLD_EXPIRED"
        if isinstance(step, Capture):
            return "CAPTURE_EXCEEDS_HOLD" if step.amount > hold.amount else ""
        return None
    if isinstance(step, Reverse):
        if not model.operations:
            return "ENTRY_NOT_FOUND"
        operation = model.operations[step.pick % len(model.operations)]
        left = operation.amount - operation.reversed
        if left == 0:
            return "ALREADY_REVERSED"
        return "REVERSAL_EXCEEDS_OPERATION" if step.amount > left else None
    return None


async def apply(
    step: Step, model: Model, sessions: async_sessionmaker[AsyncSession], clock: Clock, metrics: LedgerMetrics
) -> None:
    """Runs one step as the API would: one transaction, rolled back on a refusal."""
    holder = model.holder_id
    if isinstance(step, Advance):
        clock.now += timedelta(hours=step.hours)
        if step.run_expiry_job:
            await jobs.expire_lots(sessions, metrics)
        return
    async with sessions() as session, session.begin():
        if isinstance(step, Accrue):
            activate_at = clock.now + timedelta(days=step.activates_in_days)
            expire_at = None if step.lifetime_days is None else activate_at + timedelta(days=step.lifetime_days)
            accrual = Accrual(holder, CURRENCY, step.amount, AccrualSource.RECEIPT, "r", "", activate_at, expire_at)
            accrued = await service.accrue_points(session, accrual)
            model.operations.append(Operation(accrued.entry.entry_id, step.amount))
        elif isinstance(step, PlaceHold):
            placed = await service.place_hold(
                session, holder, CURRENCY, step.amount, timedelta(hours=step.ttl_hours), ""
            )
            model.holds.append(HoldModel(placed.hold.hold_id, step.amount, placed.hold.expires_at))
        elif isinstance(step, Capture | Release):
            hold = model.holds[step.pick % len(model.holds)] if model.holds else None
            hold_id = hold.hold_id if hold else str(uuid.uuid4())
            if isinstance(step, Capture):
                captured = await service.capture_hold(session, hold_id, step.amount)
                model.operations.append(Operation(captured.entry.entry_id, -captured.entry.amount))
            else:
                await service.release_hold(session, hold_id)
            assert hold is not None
            hold.state = "captured" if isinstance(step, Capture) else "released"
        elif isinstance(step, Redeem):
            spent = await service.redeem_points(session, holder, CURRENCY, step.amount, "", "")
            model.operations.append(Operation(spent.entry.entry_id, step.amount))
        elif isinstance(step, Reverse):
            operation = model.operations[step.pick % len(model.operations)] if model.operations else None
            undone = await service.reverse_entry(
                session, operation.entry_id if operation else str(uuid.uuid4()), step.amount, ""
            )
            assert operation is not None
            operation.reversed += abs(undone.entry.amount)
        elif isinstance(step, Transfer):
            ends = (holder, model.partner_id) if step.outward else (model.partner_id, holder)
            await service.transfer_points(session, *ends, CURRENCY, step.amount, "property test")
        elif isinstance(step, Merge):
            ends = (holder, model.partner_id) if step.outward else (model.partner_id, holder)
            await service.merge_accounts(session, *ends, "property test")
        elif isinstance(step, Adjust):
            await service.adjust_points(
                session,
                Adjustment(holder, CURRENCY, step.amount, actor="staff-1", reason="property test"),
            )


@dataclass(frozen=True)
class Books:
    balance: Balance
    entries: int
    expired_unwritten: int
    lots: list[tuple[int, int]]


async def books(sessions: async_sessionmaker[AsyncSession], holder_id: str, now: datetime) -> Books:
    """The balance and what the tables say about the holder's account at `now`."""
    async with sessions() as session:
        balance = await service.get_balance(session, holder_id, CURRENCY)
        account = await store.find_account(session, holder_id, CURRENCY)
        if account is None:
            return Books(balance, 0, 0, [])
        # The database's sums must agree with the domain's definition of a balance.
        lots_open = await store.open_lots(session, account.account_id, now)
        held = held_total(await store.live_holds(session, account.account_id, now), now)
        # ...and next_expiries to the lots' unexpired remainders summed by day.
        due = sorted(
            (lot.expire_at, lot.remaining)
            for lot in lots_open
            if lot.remaining and lot.expire_at is not None and lot.expire_at > now
        )
        expected = balance_at(holder_id, CURRENCY, lots_open, held, now, account.debt)
        assert balance == replace(expected, next_expiries=tuple(next_expiries(due)))
        entries = await session.scalar(
            select(func.coalesce(func.sum(store.EntryRow.amount), 0)).where(
                store.EntryRow.account_id == account.account_id
            )
        )
        lots = (
            await session.execute(
                select(store.LotRow.amount, store.LotRow.remaining, store.LotRow.expire_at, store.LotRow.expired_at)
                .where(store.LotRow.account_id == account.account_id)
                .execution_options(populate_existing=True)
            )
        ).all()
    expired_unwritten = sum(
        remaining
        for _amount, remaining, expire_at, written in lots
        if written is None and expire_at and expire_at <= now
    )
    return Books(balance, int(entries or 0), expired_unwritten, [(amount, remaining) for amount, remaining, *_ in lots])


def worth(books: Books) -> int:
    balance = books.balance
    return balance.active + balance.pending - balance.negative


def check_books(after: Books, before: Books, step: Step, accepted: bool) -> None:
    balance = after.balance
    # Points are never created or lost: the entries are the balance, plus the points that
    # reached their expiry but whose expiry entry the job has not written yet.
    assert after.entries == balance.active + balance.pending + after.expired_unwritten - balance.negative
    assert all(0 <= remaining <= amount for amount, remaining in after.lots), after.lots
    assert min(balance.active, balance.pending, balance.held, balance.negative, balance.available) >= 0
    spendable = balance.active - balance.held - balance.negative
    spends = isinstance(step, PlaceHold | Redeem) or (isinstance(step, Adjust) and step.amount < 0)
    if accepted and spends:
        assert spendable >= 0, "a spend never overdraws"
    if accepted and isinstance(step, Capture):
        # A capture spends at most what its hold reserved: it never takes points the hold
        # did not already keep from being spent (a return meanwhile may have made a debt).
        before_spendable = before.balance.active - before.balance.held - before.balance.negative
        assert spendable >= before_spendable
    if not isinstance(step, Reverse | Merge):
        assert balance.negative <= before.balance.negative, "only a recorded return (or a merge) creates a debt"
    if accepted and (isinstance(step, Accrue) or (isinstance(step, Adjust) and step.amount > 0)):
        repaid = min(before.balance.negative, step.amount)
        assert balance.negative == before.balance.negative - repaid, "a credit repays the debt first"


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sequence=st.lists(steps, min_size=8, max_size=30))
async def test_every_sequence_of_operations_conserves_points(
    ledger: async_sessionmaker[AsyncSession], sequence: list[Step]
) -> None:
    clock = Clock()
    metrics = LedgerMetrics.create(CollectorRegistry())
    model = Model(holder_id=f"prop-{uuid.uuid4().hex[:12]}", partner_id=f"pair-{uuid.uuid4().hex[:12]}")
    with mock.patch.object(service, "utcnow", clock), mock.patch.object(jobs, "utcnow", clock):
        state = await books(ledger, model.holder_id, clock.now)
        partner = await books(ledger, model.partner_id, clock.now)
        for step in sequence:
            expected = expected_refusal(step, model, state.balance, partner.balance, clock.now)
            try:
                await apply(step, model, ledger, clock, metrics)
            except DomainError as refused:
                assert expected is not None, f"{step} refused with {refused.reason}, the model accepts it"
                if expected:
                    assert refused.reason == expected, step
                else:
                    assert refused.reason == "INSUFFICIENT_POINTS", step
                accepted = False
                event(f"{type(step).__name__} refused: {refused.reason}")
            else:
                assert not expected, f"{step} accepted, the model expects {expected}"
                accepted = True
                event(f"{type(step).__name__} accepted")
            after = await books(ledger, model.holder_id, clock.now)
            if after.balance.negative:
                event("the account owes points")
            partner_after = await books(ledger, model.partner_id, clock.now)
            check_books(after, state, step, accepted)
            check_books(partner_after, partner, step, accepted=False)
            if isinstance(step, Transfer | Merge):
                assert worth(after) + worth(partner_after) == worth(state) + worth(partner), "moved, not made"
            state, partner = after, partner_after

        clock.now += timedelta(days=400)
        await jobs.expire_lots(ledger, metrics)
        for holder in (model.holder_id, model.partner_id):
            final = await books(ledger, holder, clock.now)
            assert final.expired_unwritten == 0
            assert final.entries == final.balance.active + final.balance.pending - final.balance.negative
            assert final.balance.held == 0, "every hold has lapsed"
