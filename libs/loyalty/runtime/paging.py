"""Page sizes and opaque page tokens for every List RPC (AIP-158)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from loyalty.runtime.errors import Violations

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def page_size(requested: int, violations: Violations, field: str = "page_size") -> int:
    """The effective page size: 0 means the default, anything above the maximum is capped."""
    violations.check(requested >= 0, field, "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


@dataclass(frozen=True)
class Cursor:
    """Where the previous page of a newest-first listing ended, keyed by (time, id).

    ``scope`` is what the listing was filtered by (a member, an account holder), so a
    token from one member's listing cannot page through another's.
    """

    scope: str
    time: datetime
    item_id: str

    def encode(self) -> str:
        raw = json.dumps([self.scope, self.time.isoformat(), self.item_id], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str, scope: str, violations: Violations, field: str = "page_token") -> Cursor | None:
        """The cursor in a token this listing returned; None for the first page. A token
        that is malformed or belongs to another scope is a violation on `field`."""
        if not token:
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            token_scope, moment, item_id = json.loads(raw)
            time = datetime.fromisoformat(moment)
            if not (isinstance(token_scope, str) and isinstance(item_id, str) and time.tzinfo is not None):
                raise ValueError("malformed")
        except (binascii.Error, UnicodeDecodeError, TypeError, ValueError):
            violations.add(field, "not a next_page_token returned by this listing")
            return None
        if token_scope != scope:
            violations.add(field, "was returned for a different listing")
            return None
        return cls(token_scope, time.astimezone(UTC), item_id)
