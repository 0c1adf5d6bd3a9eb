"""Rewards' rules: coupon codes, terms and the reason a coupon is refused."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from loyalty.runtime.errors import DomainError, FailedPrecondition, NotFound
from services.rewards.domain import (
    CODE_ALPHABET,
    CODE_LENGTH,
    Coupon,
    CouponStatus,
    Rejection,
    Reservation,
    ReservationStatus,
    TooManyWrongCodes,
    WrongCodeLimiter,
    check_reinstatable,
    check_reservation,
    code_suffix,
    is_valid_discount,
    is_valid_window,
    new_coupon_code,
    normalize_code,
    refusal,
    reservation_ttl,
    validate,
    validate_for_receipt,
)

START = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
END = datetime(2026, 4, 1, 9, 0, tzinfo=UTC)
TICK = timedelta(microseconds=1)


def coupon(member_id: str | None = "member-1", **changes: object) -> Coupon:
    base = Coupon(
        code="ABCDEFGH23",
        member_id=member_id,
        discount_basis_points=1000,
        status=CouponStatus.ACTIVE,
        valid_from=START,
        valid_until=END,
        created_at=START - timedelta(days=1),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_the_alphabet_has_no_look_alike_characters() -> None:
    assert not set("0O1IL") & set(CODE_ALPHABET)
    assert len(set(CODE_ALPHABET)) == len(CODE_ALPHABET) == 31


def test_codes_have_the_length_and_alphabet_and_do_not_repeat() -> None:
    codes = [new_coupon_code() for _ in range(20_000)]
    assert all(len(code) == CODE_LENGTH for code in codes)
    assert set("".join(codes)) == set(CODE_ALPHABET), "every allowed character occurs, and nothing else"
    assert len(set(codes)) == len(codes)


def test_code_characters_are_roughly_uniform() -> None:
    counts = Counter("".join(new_coupon_code() for _ in range(10_000)))
    expected = 10_000 * CODE_LENGTH / len(CODE_ALPHABET)
    assert all(0.8 * expected < count < 1.2 * expected for count in counts.values()), counts


def test_a_typed_code_is_normalized_and_only_its_suffix_is_shown() -> None:
    assert normalize_code(" abcde-fgh 23 ") == "ABCDEFGH23"
    assert normalize_code("") == ""
    assert code_suffix("ABCDEFGH23") == "GH23"
    assert coupon().code_suffix == "GH23"


@pytest.mark.parametrize(
    ("basis_points", "valid"), [(-5, False), (0, False), (1, True), (10_000, True), (10_001, False)]
)
def test_discount_is_between_one_basis_point_and_the_whole_receipt(basis_points: int, valid: bool) -> None:
    assert is_valid_discount(basis_points) is valid


def test_a_validity_window_must_not_be_empty() -> None:
    assert is_valid_window(START, None)
    assert is_valid_window(START, START + TICK)
    assert not is_valid_window(START, START)
    assert not is_valid_window(START, START - TICK)


def test_a_good_coupon_is_accepted_from_its_first_moment_to_just_before_its_end() -> None:
    assert validate(coupon(), "member-1", START) is None
    assert validate(coupon(), "member-1", END - TICK) is None


def test_a_missing_coupon_is_not_found() -> None:
    assert validate(None, "member-1", START) is Rejection.NOT_FOUND
    assert validate(None, "", START) is Rejection.NOT_FOUND


def test_a_coupon_is_not_yet_valid_until_its_start() -> None:
    assert validate(coupon(), "member-1", START - TICK) is Rejection.NOT_YET_VALID


def test_a_coupon_expires_at_its_end_which_is_exclusive() -> None:
    assert validate(coupon(), "member-1", END) is Rejection.EXPIRED
    assert validate(coupon(), "member-1", END + timedelta(days=300)) is Rejection.EXPIRED


def test_a_coupon_without_an_end_never_expires() -> None:
    assert validate(coupon(valid_until=None), "member-1", START + timedelta(days=36_500)) is None


def test_a_redeemed_coupon_is_already_used() -> None:
    assert validate(coupon(status=CouponStatus.REDEEMED), "member-1", START) is Rejection.ALREADY_USED


def test_a_personal_coupon_belongs_to_its_member_only() -> None:
    assert validate(coupon(), "member-2", START) is Rejection.OTHER_MEMBER
    anonymous = validate(coupon(), "", START)
    assert anonymous is Rejection.OTHER_MEMBER, "an anonymous receipt cannot use it either"


def test_someone_elses_coupon_reveals_nothing_about_its_state() -> None:
    used_and_expired = coupon(status=CouponStatus.REDEEMED)
    assert validate(used_and_expired, "member-2", END) is Rejection.OTHER_MEMBER
    assert validate(coupon(), "member-2", START - TICK) is Rejection.OTHER_MEMBER


def test_a_bearer_coupon_is_valid_for_anyone_and_anonymous_receipts() -> None:
    bearer = coupon(member_id=None)
    assert validate(bearer, "member-2", START) is None
    assert validate(bearer, "", START) is None
    assert validate(replace(bearer, status=CouponStatus.REDEEMED), "", START) is Rejection.ALREADY_USED


def reservation(**changes: object) -> Reservation:
    base = Reservation(
        reservation_id="r-1",
        code="ABCDEFGH23",
        member_id="member-1",
        receipt_ref="pos-1:0001",
        status=ReservationStatus.ACTIVE,
        expires_at=START + timedelta(minutes=15),
        created_at=START,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_a_reservation_holds_until_just_before_its_end_and_only_while_active() -> None:
    assert reservation().is_live(START + timedelta(minutes=15) - TICK)
    assert not reservation().is_live(START + timedelta(minutes=15))
    for settled in (ReservationStatus.REDEEMED, ReservationStatus.RELEASED, ReservationStatus.RETURNED):
        assert not reservation(status=settled).is_live(START)


def test_a_live_reservation_for_another_receipt_makes_the_coupon_reserved() -> None:
    held = [reservation()]
    assert validate_for_receipt(coupon(), "member-1", "pos-2:0007", held, START) is Rejection.RESERVED
    assert validate_for_receipt(coupon(), "member-1", "", held, START) is Rejection.RESERVED, "no receipt: any hold"
    assert validate_for_receipt(coupon(), "member-1", "pos-1:0001", held, START) is None, "its own receipt"
    lapsed = START + timedelta(minutes=15)
    assert validate_for_receipt(coupon(), "member-1", "pos-2:0007", held, lapsed) is None, "a lapsed hold is free"
    released = [reservation(status=ReservationStatus.RELEASED)]
    assert validate_for_receipt(coupon(), "member-1", "pos-2:0007", released, START) is None


def test_other_refusals_come_before_reserved() -> None:
    held = [reservation()]
    assert validate_for_receipt(coupon(), "member-2", "x", held, START) is Rejection.OTHER_MEMBER
    used = coupon(status=CouponStatus.REDEEMED)
    assert validate_for_receipt(used, "member-1", "x", held, START) is Rejection.ALREADY_USED
    assert validate_for_receipt(None, "member-1", "x", [], START) is Rejection.NOT_FOUND


@pytest.mark.parametrize(
    ("rejection", "error", "reason"),
    [
        (Rejection.NOT_FOUND, NotFound, "COUPON_NOT_FOUND"),
        (Rejection.OTHER_MEMBER, FailedPrecondition, "COUPON_OTHER_MEMBER"),
        (Rejection.ALREADY_USED, FailedPrecondition, "COUPON_ALREADY_USED"),
        (Rejection.NOT_YET_VALID, FailedPrecondition, "COUPON_NOT_YET_VALID"),
        (Rejection.EXPIRED, FailedPrecondition, "COUPON_EXPIRED"),
        (Rejection.RESERVED, FailedPrecondition, "COUPON_RESERVED"),
    ],
)
def test_each_rejection_is_refused_with_a_stable_reason(
    rejection: Rejection, error: type[DomainError], reason: str
) -> None:
    refused = refusal(rejection)
    assert type(refused) is error
    assert refused.reason == reason


@pytest.mark.parametrize(
    ("held", "now", "reason"),
    [
        (None, START, "RESERVATION_NOT_FOUND"),
        (reservation(status=ReservationStatus.REDEEMED), START, "COUPON_ALREADY_USED"),
        (reservation(status=ReservationStatus.RETURNED), START, "COUPON_ALREADY_USED"),
        (reservation(status=ReservationStatus.RELEASED), START, "RESERVATION_RELEASED"),
        (reservation(), START + timedelta(minutes=15), "RESERVATION_EXPIRED"),
    ],
)
def test_a_reservation_that_no_longer_holds_is_refused(held: Reservation | None, now: datetime, reason: str) -> None:
    with pytest.raises(DomainError) as refused:
        check_reservation(held, now)
    assert refused.value.reason == reason


def test_a_live_reservation_passes() -> None:
    assert check_reservation(reservation(), START) == reservation()


def test_a_coupon_is_reinstated_only_for_the_receipt_it_was_redeemed_on_and_within_validity() -> None:
    used = coupon(status=CouponStatus.REDEEMED)
    redeemed_on = reservation(status=ReservationStatus.REDEEMED)
    assert check_reinstatable(used, redeemed_on, "pos-1:0001", END - TICK) == redeemed_on
    refusals = {
        "missing": (None, None, "pos-1:0001", START),
        "not redeemed": (coupon(), None, "pos-1:0001", START),
        "other receipt": (used, redeemed_on, "pos-9:0001", START),
        "expired": (used, redeemed_on, "pos-1:0001", END),
    }
    reasons = {}
    for what, arguments in refusals.items():
        with pytest.raises(DomainError) as refused:
            check_reinstatable(*arguments)
        reasons[what] = refused.value.reason
    assert reasons == {
        "missing": "COUPON_NOT_FOUND",
        "not redeemed": "COUPON_NOT_REDEEMED",
        "other receipt": "COUPON_REDEEMED_ON_OTHER_RECEIPT",
        "expired": "COUPON_EXPIRED",
    }


def test_a_reservation_lasts_fifteen_minutes_unless_told() -> None:
    assert reservation_ttl(0) == timedelta(minutes=15)
    assert reservation_ttl(1) == timedelta(seconds=1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_terminal_is_refused_after_too_many_wrong_codes_within_the_window() -> None:
    clock = FakeClock()
    limiter = WrongCodeLimiter(limit=3, window_seconds=60, clock=clock)
    for _ in range(3):
        limiter.check("pos-1")
        limiter.record_miss("pos-1")
        clock.now += 10
    with pytest.raises(TooManyWrongCodes) as refused:
        limiter.check("pos-1")
    assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WRONG_CODES")
    assert refused.value.metadata == {"retry_after_seconds": "30"}, "the first miss leaves the window in 30 s"
    limiter.check("pos-2")  # another terminal is not affected

    clock.now = 1000.0 + 60 - 0.001
    with pytest.raises(TooManyWrongCodes):
        limiter.check("pos-1")
    clock.now = 1000.0 + 60
    limiter.check("pos-1")  # the window slid past the first miss
    limiter.record_miss("pos-1")
    with pytest.raises(TooManyWrongCodes):
        limiter.check("pos-1")


def test_misses_spread_wider_than_the_window_never_trip_the_limit() -> None:
    clock = FakeClock()
    limiter = WrongCodeLimiter(limit=3, window_seconds=60, clock=clock)
    for _ in range(20):
        limiter.check("pos-1")
        limiter.record_miss("pos-1")
        clock.now += 30.001


def test_terminals_with_only_stale_misses_are_forgotten() -> None:
    clock = FakeClock()
    limiter = WrongCodeLimiter(limit=3, window_seconds=60, clock=clock, max_terminals=4)
    for index in range(4):
        limiter.record_miss(f"pos-{index}")
    assert limiter.terminals == 4
    clock.now += 61
    limiter.record_miss("pos-new")
    assert limiter.terminals == 1
