"""RFM quintiles and the variables of a dynamic segment's expression."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.members.domain import MemberFacts, age_on, compile_segment, in_segment, rfm_scores, segment_variables

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def facts(member_id: str, count: int = 0, spend: int = 0, days_ago: int | None = None, birth: str = "") -> MemberFacts:
    last = NOW - timedelta(days=days_ago) if days_ago is not None else None
    return MemberFacts(member_id, "basic", NOW - timedelta(days=400), birth, count, spend, last)


def test_rfm_scores_are_quintiles_with_equal_values_scoring_alike() -> None:
    members = [facts(f"m{i}", count=i + 1, spend=(i + 1) * 100, days_ago=10 - i) for i in range(10)]
    members += [facts("tied", count=10, spend=1000, days_ago=1), facts("never")]
    scores = rfm_scores(members, NOW)
    assert "never" not in scores
    assert [scores[f"m{i}"].monetary for i in range(10)] == [1, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert scores["tied"] == scores["m9"]
    assert scores["m9"].recency == 5 and scores["m0"].recency == 1


def test_segment_variables_give_unknowns_as_minus_one() -> None:
    known = segment_variables(facts("a", 2, 300, days_ago=5, birth="2000-06-02"), NOW)["member"]
    assert (known["days_since_last_purchase"], known["age"], known["registered_days_ago"]) == (5, 25, 400)
    unknown = segment_variables(facts("b"), NOW)["member"]
    assert (unknown["days_since_last_purchase"], unknown["age"]) == (-1, -1)
    assert age_on("2000-06-01", NOW.date()) == 26


def test_an_expression_decides_membership() -> None:
    program = compile_segment('member.tier == "basic" && member.purchase_count >= 2')
    assert in_segment(program, facts("a", count=2), NOW)
    assert not in_segment(program, facts("b", count=1), NOW)
