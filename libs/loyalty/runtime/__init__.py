"""Shared mechanics every service uses the same way: bootstrap, settings,
database, telemetry, errors, outbox and bus, idempotency."""

from loyalty.runtime.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
    Violations,
)
from loyalty.runtime.server import ServiceContext, ServiceDefinition, ServiceHost
from loyalty.runtime.settings import SERVICE_NAMES, ServiceConfig, Settings

__all__ = [
    "SERVICE_NAMES",
    "AlreadyExists",
    "DomainError",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "NotFound",
    "ServiceConfig",
    "ServiceContext",
    "ServiceDefinition",
    "ServiceHost",
    "Settings",
    "Unavailable",
    "Violations",
]
