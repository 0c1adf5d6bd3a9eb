"""Configuration of the suite, read from the environment once at start-up.

Every variable starts with ``LOYALTY_``; a service's own group is nested with a
double underscore, e.g. ``LOYALTY_ACCOUNTS__DATABASE_URL`` or
``LOYALTY_MEMBERS__ADDRESS``. The same settings serve the embedded run (one
process, SQLite, in-process bus) and the cluster run (a process per service,
PostgreSQL, Redis); only the values differ.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICE_NAMES: tuple[str, ...] = ("gateway", "members", "accounts", "rules", "rewards", "notifications")
DEFAULT_PORTS: dict[str, dict[str, int]] = {
    name: {"port": 50051 + index, "metrics_port": 9101 + index} for index, name in enumerate(SERVICE_NAMES)
}


class ServiceConfig(BaseModel):
    """Where one service listens, where its peers reach it, and its database."""

    port: int = Field(ge=0, le=65535)
    metrics_port: int = Field(ge=0, le=65535)
    database_url: SecretStr | None = Field(
        default=None,
        description="sqlite+aiosqlite:///... or postgresql+asyncpg://...; default: a SQLite file in data_dir",
    )
    address: str | None = Field(default=None, description="host:port peers dial; default 127.0.0.1:port")


def _default_config(name: str) -> ServiceConfig:
    ports = DEFAULT_PORTS[name]
    return ServiceConfig(port=ports["port"], metrics_port=ports["metrics_port"])


class Settings(BaseSettings):
    """The whole suite's settings; each service reads its own group and its peers' addresses."""

    model_config = SettingsConfigDict(env_prefix="LOYALTY_", env_nested_delimiter="__", extra="ignore")

    bind_host: str = "127.0.0.1"
    data_dir: Path = Path("var")
    event_bus: Literal["memory", "redis"] = "memory"
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    stream_prefix: str = "loyalty"
    stream_max_length: int = Field(default=1_000_000, ge=1000, description="entries kept per stream (approximate)")
    instance_name: str = Field(
        default_factory=socket.gethostname,
        description="this replica's consumer name in its groups; stable across restarts (the pod name)",
    )
    auto_migrate: bool = Field(default=True, description="apply Alembic migrations at start-up")
    otlp_endpoint: str | None = None
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    shutdown_grace_seconds: float = 10.0
    outbox_poll_seconds: float = 0.5
    default_point_currency: str = "BONUS"
    expiry_interval_seconds: float = Field(default=60.0, gt=0, description="how often the expiry job runs")
    expiry_warning_days: int = Field(default=7, ge=0, description="points.expiring is emitted this many days ahead")
    gauge_refresh_seconds: float = Field(
        default=15.0, gt=0, description="how often gauges read from the database (outstanding points) are refreshed"
    )
    saga_resume_seconds: float = Field(
        default=5.0, gt=0, description="how often, and after how long, unfinished receipts are completed"
    )

    gateway: ServiceConfig = _default_config("gateway")
    members: ServiceConfig = _default_config("members")
    accounts: ServiceConfig = _default_config("accounts")
    rules: ServiceConfig = _default_config("rules")
    rewards: ServiceConfig = _default_config("rewards")
    notifications: ServiceConfig = _default_config("notifications")

    @model_validator(mode="before")
    @classmethod
    def _keep_default_ports(cls, data: Any) -> Any:
        # A group given in part (LOYALTY_ACCOUNTS__DATABASE_URL alone) keeps its default ports.
        if isinstance(data, dict):
            for name, ports in DEFAULT_PORTS.items():
                group = data.get(name)
                if isinstance(group, dict):
                    data[name] = {**ports, **group}
        return data

    def service(self, name: str) -> ServiceConfig:
        if name not in SERVICE_NAMES:
            raise KeyError(f"unknown service {name!r}")
        config: ServiceConfig = getattr(self, name)
        return config

    def address(self, name: str) -> str:
        config = self.service(name)
        return config.address or f"127.0.0.1:{config.port}"

    def database_url(self, name: str) -> str:
        config = self.service(name)
        if config.database_url is not None:
            return config.database_url.get_secret_value()
        return f"sqlite+aiosqlite:///{(self.data_dir / f'{name}.db').resolve()}"
