"""Page sizes and opaque page tokens for every List RPC (AIP-158)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime

from loyalty.runtime.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def page_size(requested: int, field: str = "page_size") -> int:
    if requested < 0:
        raise InvalidArgument([FieldViolation(field, "must not be negative")])
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


@dataclass(frozen=True)
class Cursor:
    """Where the previous page ended, in a newest-first listing keyed by (time, id)."""

    time: datetime
    item_id: str

    def encode(self) -> str:
        raw = json.dumps([self.time.isoformat(), self.item_id]).encode()
        return base64.urlsafe_b64encode(raw).decode()

    @classmethod
    def decode(cls, token: str, field: str = "page_token") -> Cursor | None:
        if not token:
            return None
        try:
            moment, item_id = json.loads(base64.urlsafe_b64decode(token.encode()))
            return cls(datetime.fromisoformat(moment), str(item_id))
        except (ValueError, TypeError, binascii.Error) as error:
            raise InvalidArgument([FieldViolation(field, "not a token this listing returned")]) from error
