"""The receipt protocol's rules: what keys a receipt, what a commit must do. No I/O."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

from loyalty.gateway.v1 import pos_service_pb2 as pos


class ChequeState(StrEnum):
    COMMITTED = "committed"
    COMPLETED = "completed"


@dataclass(frozen=True)
class ReceiptKey:
    """A receipt is identified by its terminal and its number on that terminal."""

    terminal_id: str
    receipt_number: str

    @property
    def ref(self) -> str:
        return f"receipt:{self.terminal_id}:{self.receipt_number}"

    def step_request_id(self, step: str) -> str:
        """The idempotency key of one saga step: a retry of the step can never apply twice."""
        return f"cheque:{self.terminal_id}:{self.receipt_number}:{step}"


def receipt_fingerprint(request: pos.CommitChequeRequest | pos.CalculateChequeRequest) -> str:
    """What makes two submissions the same receipt: its content and the customer, not the
    calculation id (a retry may or may not carry it)."""
    canonical = pos.CalculateChequeRequest(receipt=request.receipt, identifier=request.identifier)
    return hashlib.sha256(canonical.SerializeToString(deterministic=True)).hexdigest()


@dataclass(frozen=True)
class CommitPlan:
    """The effects a committed receipt owes; the saga applies each exactly once."""

    key: ReceiptKey
    holder_id: str
    points: int

    @property
    def steps(self) -> tuple[str, ...]:
        return ("accrue_points",) if self.holder_id and self.points > 0 else ()
