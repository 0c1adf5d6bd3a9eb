"""Rewards' rules: coupon series and codes, the reason a coupon is refused, gift card rules."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from loyalty.runtime.errors import DomainError, FailedPrecondition, NotFound, ResourceExhausted, Violations
from services.rewards.domain import (
    CODE_ALPHABET,
    CODE_LENGTH,
    Coupon,
    CouponStatus,
    GiftCard,
    GiftCardState,
    GiftCardStatus,
    ReceiptSpending,
    Rejection,
    Reservation,
    ReservationStatus,
    Series,
    SeriesKind,
    Usage,
    check_code_format,
    check_refund,
    check_reinstatable,
    check_reservation,
    check_spend,
    code_suffix,
    hash_pin,
    is_valid_pin,
    is_valid_window,
    mask_code,
    new_code,
    normalize_code,
    pin_matches,
    refusal,
    reservation_ttl,
    too_many_wrong_codes,
    validate,
    validate_reservation,
)

START = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
END = datetime(2026, 4, 1, 9, 0, tzinfo=UTC)
TICK = timedelta(microseconds=1)

SERIES = Series(
    series_id="series-1",
    name="10% off",
    kind=SeriesKind.UNIQUE,
    campaign_id="campaign-1",
    benefit=b"\x08\xe8\x07",
    min_receipt_total_minor=0,
    uses_per_code=1,
    uses_per_member=0,
    valid_from=START,
    valid_until=END,
    validity_days=0,
    mass_code=None,
    code_alphabet=CODE_ALPHABET,
    code_length=CODE_LENGTH,
    created_at=START - timedelta(days=1),
)


def coupon(member_id: str | None = "member-1", series: Series = SERIES, **changes: object) -> Coupon:
    base = Coupon(
        code="ABCDEFGH23",
        series=series,
        member_id=member_id,
        partner_id=None,
        status=CouponStatus.ACTIVE,
        uses=0,
        valid_from=START,
        valid_until=END,
        created_at=START - timedelta(days=1),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_the_alphabet_has_no_look_alike_characters() -> None:
    assert not set("0O1IL") & set(CODE_ALPHABET)
    assert len(set(CODE_ALPHABET)) == len(CODE_ALPHABET) == 31


def test_codes_have_the_length_and_alphabet_and_do_not_repeat() -> None:
    codes = [new_code() for _ in range(20_000)]
    assert all(len(code) == CODE_LENGTH for code in codes)
    assert set("".join(codes)) == set(CODE_ALPHABET), "every allowed character occurs, and nothing else"
    assert len(set(codes)) == len(codes)


def test_code_characters_are_roughly_uniform() -> None:
    counts = Counter("".join(new_code() for _ in range(10_000)))
    expected = 10_000 * CODE_LENGTH / len(CODE_ALPHABET)
    assert all(0.8 * expected < count < 1.2 * expected for count in counts.values()), counts


def test_a_typed_code_is_normalized_and_only_its_suffix_is_shown() -> None:
    assert normalize_code(" abcde-fgh 23 ") == "ABCDEFGH23"
    assert normalize_code("") == ""
    assert code_suffix("ABCDEFGH23") == "GH23"
    assert coupon().code_suffix == "GH23"
    assert mask_code("ABCDEFGH23") == "******GH23"


def test_a_series_alphabet_and_length_make_codes_unguessable_and_unambiguous() -> None:
    def problems(alphabet: str, length: int) -> list[tuple[str, str]]:
        violations = Violations()
        check_code_format(alphabet, length, violations)
        return [(v.field, v.description) for v in violations.items]

    assert problems(CODE_ALPHABET, CODE_LENGTH) == []
    assert problems("23456789", 14) == [], "8^14 = 2^42 codes"
    assert [field for field, _ in problems("23456789", 13)] == ["code_length"], "8^13 = 2^39 codes is too few"
    assert problems("ABC0", 30)[0][1] == "must not contain the look-alikes 0, O, 1, I, L"
    assert problems("abc", 30)[0][1] == "capital letters and digits only"
    assert problems("AAB", 30)[0][1] == "at least two characters, each once"
    assert [field for field, _ in problems(CODE_ALPHABET, 33)] == ["code_length"]


def test_codes_of_a_custom_alphabet_use_only_it_uniformly() -> None:
    codes = [new_code("234567", 16) for _ in range(3000)]
    assert all(len(code) == 16 and set(code) <= set("234567") for code in codes)
    counts = Counter("".join(codes))
    expected = 3000 * 16 / 6
    assert all(abs(count - expected) < 6 * math.sqrt(expected) for count in counts.values()), counts


def test_a_coupon_window_is_the_series_window_narrowed_to_its_validity_days() -> None:
    assert SERIES.coupon_window(START - timedelta(days=3)) == (START, END), "issued early: from the series' start"
    ten_days = replace(SERIES, validity_days=10)
    issued = START + timedelta(days=5)
    assert ten_days.coupon_window(issued) == (issued, issued + timedelta(days=10))
    assert ten_days.coupon_window(END - timedelta(days=1)) == (END - timedelta(days=1), END), "never past the series"
    endless = replace(SERIES, valid_until=None, validity_days=10)
    assert endless.coupon_window(issued) == (issued, issued + timedelta(days=10))
    assert replace(SERIES, valid_until=None).coupon_window(issued) == (issued, None)


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
        series_id="series-1",
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
    held = Usage([reservation()])
    assert validate(coupon(), "member-1", START, held, "pos-2:0007") is Rejection.RESERVED
    assert validate(coupon(), "member-1", START, held, "") is Rejection.RESERVED, "no receipt: any hold"
    assert validate(coupon(), "member-1", START, held, "pos-1:0001") is None, "its own receipt"
    lapsed = START + timedelta(minutes=15)
    assert validate(coupon(), "member-1", lapsed, held, "pos-2:0007") is None, "a lapsed hold is free"
    released = Usage([reservation(status=ReservationStatus.RELEASED)])
    assert validate(coupon(), "member-1", START, released, "pos-2:0007") is None


def test_other_refusals_come_before_reserved() -> None:
    held = Usage([reservation()])
    assert validate(coupon(), "member-2", START, held, "x") is Rejection.OTHER_MEMBER
    used = coupon(status=CouponStatus.REDEEMED)
    assert validate(used, "member-1", START, held, "x") is Rejection.ALREADY_USED
    assert validate(None, "member-1", START, Usage(), "x") is Rejection.NOT_FOUND


def test_a_multi_use_code_is_reserved_only_when_holds_take_every_use_left() -> None:
    three_uses = coupon(member_id=None, series=replace(SERIES, uses_per_code=3), uses=1)
    one_hold = Usage([reservation(receipt_ref="pos-2:1")])
    assert validate(three_uses, "", START, one_hold, "pos-3:1") is None, "1 used + 1 held of 3"
    two_holds = Usage([reservation(receipt_ref="pos-2:1"), reservation(receipt_ref="pos-4:1")])
    assert validate(three_uses, "", START, two_holds, "pos-3:1") is Rejection.RESERVED
    assert validate(three_uses, "", START, two_holds, "pos-2:1") is None, "one of the holds is this receipt's"
    unlimited = coupon(member_id=None, series=replace(SERIES, uses_per_code=0), uses=10_000)
    assert validate(unlimited, "", START, two_holds, "pos-3:1") is None


def test_one_receipt_reserves_a_coupon_once_even_with_uses_left() -> None:
    mass = coupon(member_id=None, series=replace(SERIES, kind=SeriesKind.MASS, uses_per_code=0))
    held = Usage([reservation(receipt_ref="pos-1:1")])
    assert validate_reservation(mass, "", "pos-1:1", held, START, None) is Rejection.RESERVED
    assert validate_reservation(mass, "", "pos-2:1", held, START, None) is None


def test_uses_per_member_need_a_member_and_count_their_uses() -> None:
    twice = coupon(member_id=None, series=replace(SERIES, uses_per_code=0, uses_per_member=2))
    assert validate(twice, "", START, Usage()) is Rejection.MEMBER_REQUIRED
    assert validate(twice, "member-1", START, Usage(member_uses=1)) is None
    assert validate(twice, "member-1", START, Usage(member_uses=2)) is Rejection.MEMBER_LIMIT_REACHED


def test_a_receipt_below_the_benefit_threshold_is_not_applicable() -> None:
    threshold = coupon(series=replace(SERIES, min_receipt_total_minor=100_000))
    assert validate(threshold, "member-1", START, receipt_total_minor=99_999) is Rejection.NOT_APPLICABLE
    assert validate(threshold, "member-1", START, receipt_total_minor=100_000) is None
    assert validate(threshold, "member-1", START) is None, "an unknown total is not judged"


def test_a_multi_use_coupon_is_used_up_at_its_last_use_and_returns_give_uses_back() -> None:
    three_uses = coupon(series=replace(SERIES, uses_per_code=3), uses=1)
    assert three_uses.uses_after(1) == (2, CouponStatus.ACTIVE)
    assert three_uses.uses_after(2) == (3, CouponStatus.REDEEMED)
    assert replace(three_uses, uses=3, status=CouponStatus.REDEEMED).uses_after(-1) == (2, CouponStatus.ACTIVE)
    assert coupon(series=replace(SERIES, uses_per_code=0), uses=99).uses_after(1) == (100, CouponStatus.ACTIVE)


@pytest.mark.parametrize(
    ("rejection", "error", "reason"),
    [
        (Rejection.NOT_FOUND, NotFound, "COUPON_NOT_FOUND"),
        (Rejection.OTHER_MEMBER, FailedPrecondition, "COUPON_OTHER_MEMBER"),
        (Rejection.ALREADY_USED, FailedPrecondition, "COUPON_ALREADY_USED"),
        (Rejection.NOT_YET_VALID, FailedPrecondition, "COUPON_NOT_YET_VALID"),
        (Rejection.EXPIRED, FailedPrecondition, "COUPON_EXPIRED"),
        (Rejection.RESERVED, FailedPrecondition, "COUPON_RESERVED"),
        (Rejection.NOT_APPLICABLE, FailedPrecondition, "COUPON_NOT_APPLICABLE"),
        (Rejection.MEMBER_REQUIRED, FailedPrecondition, "COUPON_MEMBER_REQUIRED"),
        (Rejection.MEMBER_LIMIT_REACHED, FailedPrecondition, "COUPON_MEMBER_LIMIT_REACHED"),
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
    used = coupon(status=CouponStatus.REDEEMED, uses=1)
    redeemed_on = reservation(status=ReservationStatus.REDEEMED)
    assert check_reinstatable(used, redeemed_on, "pos-1:0001", END - TICK) == redeemed_on
    refusals = {
        "missing": (None, None, "pos-1:0001", START),
        "not redeemed": (coupon(), None, "pos-1:0001", START),
        "other receipt": (used, None, "pos-9:0001", START),
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


def test_too_many_wrong_codes_is_resource_exhausted_with_whole_seconds_to_wait() -> None:
    refused = too_many_wrong_codes(29.2)
    assert isinstance(refused, ResourceExhausted)
    assert (refused.code, refused.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WRONG_CODES")
    assert (refused.retry_after_seconds, refused.metadata) == (30, {"retry_after_seconds": "30"})


def card(**changes: object) -> GiftCard:
    base = GiftCard(
        card_number="ABCDEFGHJKMNPQRS",
        batch_id="batch-1",
        currency_code="RUB",
        status=GiftCardStatus.ACTIVE,
        balance_minor=300_000,
        pin_hash=None,
        validity_days=365,
        expires_at=END,
        created_at=START - timedelta(days=10),
        activated_at=START,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_a_gift_card_is_inactive_until_sold_and_expires_at_its_end() -> None:
    assert card(status=GiftCardStatus.INACTIVE, expires_at=None).state(START) is GiftCardState.INACTIVE
    assert card().state(END - TICK) is GiftCardState.ACTIVE
    assert card().state(END) is GiftCardState.EXPIRED
    assert card(expires_at=None).state(END + timedelta(days=9999)) is GiftCardState.ACTIVE


def test_a_gift_card_pays_up_to_its_balance_while_active() -> None:
    assert check_spend(card(), 100_000, START) == 200_000
    assert check_spend(card(), 300_000, START) == 0, "the whole balance"
    refusals = {
        "too much": (card(), 300_001),
        "not sold": (card(status=GiftCardStatus.INACTIVE, balance_minor=0), 1),
        "expired": (card(expires_at=START), 1),
    }
    reasons = {}
    for what, (gift_card, amount) in refusals.items():
        with pytest.raises(FailedPrecondition) as refused:
            check_spend(gift_card, amount, START)
        reasons[what] = refused.value.reason
    assert reasons == {
        "too much": "GIFT_CARD_INSUFFICIENT_BALANCE",
        "not sold": "GIFT_CARD_NOT_ACTIVE",
        "expired": "GIFT_CARD_EXPIRED",
    }


def test_a_receipt_gets_back_at_most_what_it_spent_from_the_card() -> None:
    spent = ReceiptSpending(spent_minor=50_000, refunded_minor=20_000)
    assert check_refund(card(balance_minor=0), 30_000, spent, START) == 30_000
    with pytest.raises(FailedPrecondition) as refused:
        check_refund(card(), 30_001, spent, START)
    assert (refused.value.reason, refused.value.metadata) == (
        "GIFT_CARD_REFUND_EXCEEDS_SPEND",
        {"refundable_minor": "30000"},
    )
    with pytest.raises(FailedPrecondition) as expired:
        check_refund(card(expires_at=START), 1, spent, START)
    assert expired.value.reason == "GIFT_CARD_EXPIRED"


def test_a_pin_is_stored_salted_and_hashed_and_checked_exactly() -> None:
    first, second = hash_pin("4321"), hash_pin("4321")
    assert first != second and "4321" not in first, "salted: equal PINs hash differently"
    assert pin_matches("4321", first) and pin_matches("4321", second)
    assert not pin_matches("4322", first)
    assert [is_valid_pin(pin) for pin in ("123", "1234", "123456789012", "1234567890123", "12a4", "")] == [
        False,
        True,
        True,
        False,
        False,
        False,
    ]
