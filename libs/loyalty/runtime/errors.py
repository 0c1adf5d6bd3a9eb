"""Domain errors and their one mapping to gRPC status with google.rpc details.

Use cases raise these; the server interceptor turns them into a status with an
``ErrorInfo`` (stable UPPER_SNAKE_CASE reason) and, for invalid input, a
``BadRequest`` listing every offending field. Anything else becomes INTERNAL
with no detail, so a stack trace never reaches a client.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

T = TypeVar("T")

ERROR_DOMAIN = "loyalty.platform"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """A failure a client can act on; carries a gRPC code and a stable reason."""

    code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, reason: str, message: str, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Unavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(DomainError):
    """A limit was hit (too many attempts, a rate limit); the status carries a
    ``google.rpc.RetryInfo`` saying when to try again."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, reason: str, message: str, retry_after_seconds: float) -> None:
        # Whole seconds, at least one: a client told "retry in 0 s" would hammer at once.
        self.retry_after_seconds = max(1, math.ceil(retry_after_seconds))
        super().__init__(reason, message, {"retry_after_seconds": str(self.retry_after_seconds)})


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: list[FieldViolation]) -> None:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__("INVALID_ARGUMENT", summary)
        self.violations = violations


@dataclass
class Violations:
    """Collects every problem with a request before rejecting it in one error."""

    items: list[FieldViolation] = field(default_factory=list)

    def add(self, field_path: str, description: str) -> None:
        self.items.append(FieldViolation(field_path, description))

    def check(self, condition: bool, field_path: str, description: str) -> None:
        if not condition:
            self.add(field_path, description)

    def check_length(self, value: str, field_path: str, maximum: int) -> None:
        self.check(len(value) <= maximum, field_path, f"at most {maximum} characters")

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(list(self.items))


def to_grpc_status(error: DomainError) -> grpc.Status:
    details: list[any_pb2.Any] = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata))
    details.append(info)
    if isinstance(error, InvalidArgument):
        bad_request = any_pb2.Any()
        bad_request.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in error.violations
                ]
            )
        )
        details.append(bad_request)
    if isinstance(error, ResourceExhausted):
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=error.retry_after_seconds)))
        details.append(retry)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)


def internal_status() -> grpc.Status:
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.INTERNAL, message="internal error"))


@dataclass(frozen=True)
class RemoteError:
    """What a peer service answered, read back from its status details."""

    code: grpc.StatusCode
    reason: str
    message: str
    violations: tuple[FieldViolation, ...] = ()
    retry_after_seconds: int = 0
    """From a ``google.rpc.RetryInfo``, when the peer said when to try again."""


def read_remote_error(error: grpc.aio.AioRpcError) -> RemoteError:
    reason, violations, retry_after = "", [], 0
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        bad_request = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(bad_request):
            violations = [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
        elif detail.Unpack(retry):
            retry_after = retry.retry_delay.seconds

    return RemoteError(error.code(), reason, error.details() or "", tuple(violations), retry_after)


def reraise_remote(error: grpc.aio.AioRpcError, field_prefix: str = "") -> DomainError:
    """Turns a peer's domain error into ours, so the caller's client sees the same reason."""
    remote = read_remote_error(error)
    if remote.code == grpc.StatusCode.INVALID_ARGUMENT and remote.violations:
        return InvalidArgument([FieldViolation(f"{field_prefix}{v.field}", v.description) for v in remote.violations])
    if remote.code == grpc.StatusCode.RESOURCE_EXHAUSTED and remote.reason:
        return ResourceExhausted(remote.reason, remote.message, remote.retry_after_seconds)
    mapped: dict[grpc.StatusCode, type[DomainError]] = {
        grpc.StatusCode.NOT_FOUND: NotFound,
        grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
        grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    }
    error_type = mapped.get(remote.code, Unavailable)
    reason = remote.reason or ("UPSTREAM_UNAVAILABLE" if error_type is Unavailable else remote.code.name)
    return error_type(reason, remote.message)


async def call_remote(call: Callable[[], Awaitable[T]], field_prefix: str = "") -> T:
    """Runs one call to a peer service, its failure turned into our DomainError."""
    try:
        return await call()
    except grpc.aio.AioRpcError as error:
        raise reraise_remote(error, field_prefix=field_prefix) from error
