"""Checks on the shared contract types, so every service rejects bad input the same way."""

from __future__ import annotations

import re

from loyalty.common.v1 import receipt_pb2
from loyalty.runtime.errors import Violations

_CURRENCY_CODE = re.compile(r"^[A-Z]{3}$")
MAX_RECEIPT_LINES = 1000
MAX_ID_LENGTH = 64


def check_receipt(receipt: receipt_pb2.Receipt, violations: Violations, prefix: str = "receipt") -> None:
    """Adds a violation for every malformed part of a receipt."""
    violations.check(
        bool(_CURRENCY_CODE.fullmatch(receipt.currency_code)),
        f"{prefix}.currency_code",
        "an ISO 4217 code such as RUB",
    )
    for field in ("store_id", "terminal_id", "receipt_number"):
        violations.check_length(getattr(receipt, field), f"{prefix}.{field}", MAX_ID_LENGTH)
    if not receipt.lines:
        violations.add(f"{prefix}.lines", "a receipt needs at least one line")
    if len(receipt.lines) > MAX_RECEIPT_LINES:
        violations.add(f"{prefix}.lines", f"at most {MAX_RECEIPT_LINES} lines")
    positions: set[int] = set()
    for index, line in enumerate(receipt.lines):
        where = f"{prefix}.lines[{index}]"
        violations.check(line.position > 0, f"{where}.position", "must be positive")
        violations.check(line.position not in positions, f"{where}.position", "duplicates another line")
        positions.add(line.position)
        violations.check(bool(line.sku), f"{where}.sku", "required")
        violations.check_length(line.sku, f"{where}.sku", MAX_ID_LENGTH)
        violations.check(line.price_minor >= 0, f"{where}.price_minor", "must not be negative")
        violations.check(line.quantity_milli > 0, f"{where}.quantity_milli", "must be positive")
        violations.check(line.amount_minor >= 0, f"{where}.amount_minor", "must not be negative")


def line_amount(line: receipt_pb2.ReceiptLine) -> int:
    """The line amount in minor units: as sent, or price times quantity rounded half up."""
    if line.amount_minor:
        return line.amount_minor
    return (line.price_minor * line.quantity_milli + 500) // 1000
