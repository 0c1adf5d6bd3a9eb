"""The six services, in the order they start (the gateway last: it calls the others)."""

from __future__ import annotations

import importlib

from loyalty.runtime.server import ServiceDefinition

START_ORDER: tuple[str, ...] = ("members", "accounts", "rules", "rewards", "notifications", "gateway")


def definition(name: str) -> ServiceDefinition:
    if name not in START_ORDER:
        raise KeyError(f"unknown service {name!r}; one of {', '.join(START_ORDER)}")
    module = importlib.import_module(f"services.{name}.server")
    found: ServiceDefinition = module.DEFINITION
    return found
