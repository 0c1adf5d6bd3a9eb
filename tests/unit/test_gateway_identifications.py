"""The gateway's short reuse of identifications: kept per identifier for the TTL, never
when the TTL is 0, the oldest dropped beyond the size limit."""

from __future__ import annotations

from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.members.v1 import members_service_pb2 as members
from loyalty.runtime.cache import TtlCache
from services.gateway.service import identifier_key


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def card(number: str) -> bytes:
    return identifier_key(pos.CustomerIdentifier(card_number=number))


def context(member_id: str) -> members.MemberContext:
    return members.MemberContext(member_id=member_id, account_holder_id=f"holder-{member_id}", tier="gold")


def test_an_identification_is_reused_until_its_ttl_runs_out() -> None:
    clock = Clock()
    recent = TtlCache[members.MemberContext](2.0, clock=clock)
    recent.put(card("1001"), "m-1", context("m-1"))
    clock.now += 1.9
    assert recent.get(card("1001")) == context("m-1")
    # Another identifier of the same kind, or the same number as a phone, is another key.
    assert recent.get(card("1002")) is None
    assert recent.get(identifier_key(pos.CustomerIdentifier(phone="1001"))) is None
    clock.now += 0.2
    assert recent.get(card("1001")) is None


def test_a_zero_ttl_keeps_nothing() -> None:
    recent = TtlCache[members.MemberContext](0)
    recent.put(card("1001"), "m-1", context("m-1"))
    assert recent.get(card("1001")) is None


def test_the_oldest_entries_are_dropped_beyond_the_limit() -> None:
    recent = TtlCache[members.MemberContext](60.0, max_entries=2, clock=Clock())
    for number in ("1", "2", "3"):
        recent.put(card(number), number, context(number))
    assert [recent.get(card(number)) for number in ("1", "2", "3")] == [None, context("2"), context("3")]
