"""Load: open-loop arrivals at a rate and closed-loop workers at a concurrency, driving either
POS sales through the gateway or a bare echo call, recording every call's latency and outcome.

Open loop is what a chain of registers does (customers arrive whether or not the last
receipt was fast), so a sale's latency is measured from its scheduled start: when the system
falls behind, the waiting counts (no coordinated omission). Closed loop finds the most a
number of registers working flat out can push through.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from loyalty.client.pos import PosClient
from loyalty.common.v1 import receipt_pb2
from loyalty.gateway.v1 import pos_service_pb2 as pos
from tools.bench import dataset

T = TypeVar("T")


def arrival_offsets(rate: float, seconds: float, rng: random.Random, poisson: bool = True) -> list[float]:
    """When each arrival of an open-loop run is due, in seconds from its start: a Poisson
    process at `rate` per second (exponential gaps), or evenly spaced."""
    if rate <= 0 or seconds <= 0:
        raise ValueError("rate and seconds must be positive")
    offsets: list[float] = []
    now = 0.0
    while True:
        now += rng.expovariate(rate) if poisson else 1 / rate
        if now >= seconds:
            return offsets
        offsets.append(now)


@dataclass
class Recorder:
    """Latencies of successful calls and errors by status code, per RPC, and of whole units
    (a sale or an echo call) from their scheduled start."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    units: list[float] = field(default_factory=list)
    failed_units: int = 0
    notes: Counter[str] = field(default_factory=Counter)

    async def call(self, name: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            result = await call
        except grpc.aio.AioRpcError as error:
            self.errors[name][error.code().name] += 1
            raise
        self.latencies[name].append(time.perf_counter() - started)
        return result


Action = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class RunResult:
    seconds: float
    dropped: int


async def _unit(action: Action, sequence: int, scheduled: float, recorder: Recorder) -> None:
    try:
        await action(sequence)
    except grpc.aio.AioRpcError:
        recorder.failed_units += 1
        return
    recorder.units.append(time.perf_counter() - scheduled)


async def run_open_loop(
    action: Action, offsets: Sequence[float], recorder: Recorder, max_in_flight: int = 2000
) -> RunResult:
    """Starts `action(i)` at each offset whether or not earlier ones finished; an arrival
    finding `max_in_flight` unfinished is dropped (counted) rather than queued without end."""
    in_flight: set[asyncio.Task[None]] = set()
    dropped = 0
    start = time.perf_counter()
    for sequence, offset in enumerate(offsets):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= max_in_flight:
            dropped += 1
            continue
        task = asyncio.create_task(_unit(action, sequence, start + offset, recorder))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight)
    return RunResult(seconds=max(offsets[-1] if offsets else 0.0, time.perf_counter() - start), dropped=dropped)


async def run_closed_loop(action: Action, concurrency: int, seconds: float, recorder: Recorder) -> RunResult:
    """`concurrency` workers, each starting its next unit as soon as the last one finished,
    until `seconds` have passed."""
    counter = itertools.count()
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            await _unit(action, next(counter), time.perf_counter(), recorder)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return RunResult(seconds=time.perf_counter() - start, dropped=0)


# POS sales ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mix:
    """The shape of the traffic."""

    lines_min: int = 15
    lines_max: int = 25
    by_card_share: float = 0.6  # the rest identify by phone
    coupon_share: float = 0.1  # receipts presenting a coupon
    mass_coupon_share: float = 0.3  # of those, the mass code; the rest a unique code
    points_share: float = 0.15  # receipts paying part with points (funded members)
    points_to_pay: int = 20_000
    return_share: float = 0.05


class PosTraffic:
    """One sale as a register makes it: Identify, CalculateCheque (coupons, points to pay),
    CommitCheque with what was held, and now and then a return of the receipt."""

    def __init__(
        self,
        client: PosClient,
        scale: dataset.Scale,
        tag: str,
        step: str,
        recorder: Recorder,
        mix: Mix = Mix(),
        seed: int = 1,
        coupon_cursor: itertools.count[int] | None = None,
    ) -> None:
        self._client = client
        self._scale = scale
        self._tag = tag
        self._step = step
        self._recorder = recorder
        self._mix = mix
        self._seed = seed
        self._coupons = coupon_cursor if coupon_cursor is not None else itertools.count()

    def receipt(self, sequence: int, rng: random.Random) -> receipt_pb2.Receipt:
        store = rng.randrange(dataset.STORES)
        lines = []
        for position in range(1, rng.randint(self._mix.lines_min, self._mix.lines_max) + 1):
            product = rng.randrange(self._scale.products)
            quantity = rng.choice((1000, 1000, 1000, 1000, 2000, 3000, 1350))
            lines.append(
                receipt_pb2.ReceiptLine(
                    position=position,
                    sku=dataset.sku_of(product),
                    price_minor=dataset.price_of(product),
                    quantity_milli=quantity,
                )
            )
        return receipt_pb2.Receipt(
            store_id=dataset.store_of(store),
            terminal_id=f"b{self._tag}-{self._step}-{sequence % 64:02d}",
            receipt_number=f"{sequence:09d}",
            currency_code="RUB",
            channel=receipt_pb2.SALES_CHANNEL_POS,
            lines=lines,
        )

    async def sale(self, sequence: int) -> None:
        rng = random.Random(f"{self._seed}:{self._step}:{sequence}")
        mix, scale, record = self._mix, self._scale, self._recorder.call
        pays_with_points = scale.funded_members > 0 and rng.random() < mix.points_share
        member = rng.randrange(scale.funded_members if pays_with_points else scale.members)
        if rng.random() < mix.by_card_share:
            identifier = pos.CustomerIdentifier(card_number=dataset.card_of(member))
        else:
            identifier = pos.CustomerIdentifier(phone=dataset.phone_of(member))
        await record("Identify", self._client.identify(identifier))
        coupons: list[str] = []
        if rng.random() < mix.coupon_share:
            if rng.random() < mix.mass_coupon_share:
                coupons.append(dataset.MASS_CODE)
            else:
                coupons.append(dataset.promo_code_of(self._tag, next(self._coupons) % max(scale.coupons, 1)))
        receipt = self.receipt(sequence, rng)
        points = mix.points_to_pay if pays_with_points else 0
        calculated = await record(
            "CalculateCheque", self._client.calculate(receipt, identifier, coupon_codes=coupons, points_to_pay=points)
        )
        notes = self._recorder.notes
        notes["calculations_degraded"] += bool(calculated.degradations)
        for degradation in calculated.degradations:
            notes[pos.Degradation.Name(degradation).removeprefix("DEGRADATION_").lower()] += 1
        for coupon in calculated.coupons:
            notes[f"coupon_{pos.CouponOutcome.Name(coupon.outcome).removeprefix('COUPON_OUTCOME_').lower()}"] += 1
        notes["points_payments_asked"] += points > 0
        notes["points_payments_held"] += calculated.points_to_pay > 0
        committed = await record(
            "CommitCheque",
            self._client.commit(
                receipt, identifier, calculation_id=calculated.calculation_id, points_paid=calculated.points_to_pay
            ),
        )
        notes["commits_completed"] += committed.state == pos.CHEQUE_STATE_COMPLETED
        if rng.random() < mix.return_share:
            original = pos.ReceiptReference(terminal_id=receipt.terminal_id, receipt_number=receipt.receipt_number)
            lines = (
                []
                if rng.random() < 0.5
                else [pos.ReturnLine(position=1, quantity_milli=receipt.lines[0].quantity_milli)]
            )
            await record(
                "ReturnCheque",
                self._client.return_cheque(
                    f"{original.terminal_id}:{original.receipt_number}:r", original, lines, receipt.store_id
                ),
            )
