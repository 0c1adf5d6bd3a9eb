"""Page sizes and page tokens, shared by every List RPC."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest

from loyalty.runtime.errors import Violations
from loyalty.runtime.paging import Cursor, page_size


def decode(token: str, scope: str = "m-1") -> tuple[Cursor | None, list[str]]:
    violations = Violations()
    cursor = Cursor.decode(token, scope, violations)
    return cursor, [v.field for v in violations.items]


def test_a_cursor_round_trips_within_its_scope() -> None:
    cursor = Cursor("m-1", datetime(2025, 3, 8, 9, 30, 0, 123456, tzinfo=UTC), "b2")
    assert decode(cursor.encode()) == (cursor, [])
    assert decode("") == (None, []), "no token is the first page"


def test_a_token_of_another_listing_is_refused() -> None:
    token = Cursor("m-2", datetime(2025, 3, 8, tzinfo=UTC), "x").encode()
    assert decode(token, scope="m-1") == (None, ["page_token"])


@pytest.mark.parametrize(
    "token",
    [
        "not-base64!",
        "bm9wZQ",  # "nope"
        base64.urlsafe_b64encode(b"[1,2,3]").decode(),
        base64.urlsafe_b64encode(json.dumps(["m-1", "2025-03-08T09:30:00", "x"]).encode()).decode(),  # naive
        Cursor("m-1", datetime(2025, 3, 8, tzinfo=UTC), "b2").encode()[:-3],
    ],
)
def test_malformed_tokens_are_a_field_violation_not_a_crash(token: str) -> None:
    assert decode(token) == (None, ["page_token"])


def test_page_size_defaults_caps_and_refuses_negatives() -> None:
    violations = Violations()
    assert (page_size(0, violations), page_size(10, violations), page_size(10_000, violations)) == (50, 10, 500)
    assert violations.items == []
    page_size(-1, violations)
    assert [v.field for v in violations.items] == ["page_size"]
