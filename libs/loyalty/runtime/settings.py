"""Configuration of the suite, read from the environment once at start-up.

Every variable starts with ``LOYALTY_``; a service's own group is nested with a
double underscore, e.g. ``LOYALTY_ACCOUNTS__DATABASE_URL`` or
``LOYALTY_MEMBERS__ADDRESS``. The same settings serve the embedded run (one
process, SQLite, in-process bus) and the cluster run (a process per service,
PostgreSQL, Redis); only the values differ.
"""

from __future__ import annotations

import socket
from datetime import time
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


class HttpProviderConfig(BaseModel):
    """One HTTP message provider (SMS, push, Viber, Telegram). Without a URL the channel is off."""

    url: SecretStr | None = Field(
        default=None,
        description="where messages are POSTed; may embed the token as {token} (Telegram: .../bot{token}/sendMessage)",
    )
    payload_format: Literal["json", "telegram"] = Field(
        default="json", description="json: {to, text, subject, message_id}; telegram: Bot API sendMessage"
    )
    timeout_seconds: float = Field(default=10.0, gt=0)
    rate_per_second: float = Field(default=20.0, gt=0, description="messages per second this replica sends")


class MessagingConfig(BaseModel):
    """How notifications reach members: providers, quiet hours, caps, retries. Tokens are in provider_tokens."""

    smtp_host: str = Field(default="", description="SMTP server for e-mail; empty: e-mail is off")
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_username: str = ""
    smtp_starttls: bool = False
    smtp_timeout_seconds: float = Field(default=10.0, gt=0)
    email_from: str = "loyalty@localhost"
    email_rate_per_second: float = Field(default=20.0, gt=0)
    sms: HttpProviderConfig = HttpProviderConfig()
    push: HttpProviderConfig = HttpProviderConfig()
    viber: HttpProviderConfig = HttpProviderConfig()
    telegram: HttpProviderConfig = HttpProviderConfig(payload_format="telegram")
    default_time_zone: str = Field(default="UTC", description="for members whose time zone is unknown (IANA name)")
    default_locale: str = "en"
    program_name: str = "Loyalty"
    quiet_hours_start: time | None = Field(default=time(21, 0), description="local time messages start waiting")
    quiet_hours_end: time | None = Field(default=time(9, 0), description="local time waiting messages go out")
    frequency_cap: int = Field(default=3, ge=0, description="marketing messages per member per window; 0: no cap")
    frequency_window_hours: int = Field(default=24, gt=0)
    transactional_needs_consent: bool = Field(
        default=False, description="whether service messages (points, tiers) also need the channel's consent"
    )
    max_attempts: int = Field(default=5, ge=1, description="delivery attempts before a message is dead")
    retry_base_seconds: float = Field(default=30.0, gt=0, description="first retry delay; doubles per attempt")
    retry_max_seconds: float = Field(default=3600.0, gt=0)
    dispatch_interval_seconds: float = Field(default=1.0, gt=0, description="how often due messages are looked for")
    dispatch_batch: int = Field(default=100, ge=1)
    claim_seconds: float = Field(default=120.0, gt=0, description="a replica's hold on a message it is sending")
    birthday_interval_seconds: float = Field(default=3600.0, gt=0, description="how often birthdays are looked for")


class PointCurrencyConfig(BaseModel):
    """One point currency of the program (the ledger's registry, keyed by its code)."""

    name: str = Field(default="", description="shown to members, e.g. 'Bonus points'; empty: the code")
    scale: int = Field(default=0, ge=0, le=6, description="decimal places of a point: 2 means 100 units make 1.00")
    money_per_unit_numerator: int = Field(default=1, ge=0, description="minor money units one point unit is worth, ...")
    money_per_unit_denominator: int = Field(default=1, ge=1, description="... as numerator / denominator")
    lifetime_days: int | None = Field(default=None, ge=1, description="an accrual's default life; unset: no expiry")
    activation_delay_days: int = Field(
        default=0, ge=0, le=366, description="return window: accrued points become spendable this many days later"
    )
    max_accrual_per_receipt: int | None = Field(default=None, ge=1, description="fraud limit of one receipt's accrual")
    max_accrual_per_day: int | None = Field(
        default=None, ge=1, description="fraud limit of receipt and campaign accruals per account per UTC day"
    )
    accrual_limit_policy: Literal["refuse", "clip"] = Field(
        default="refuse", description="an accrual over a limit is refused (ACCRUAL_LIMIT_REACHED) or credited up to it"
    )
    expiry_rounding: Literal["none", "month_end", "year_end"] = Field(
        default="none", description="an expiry is moved to the end of its month or year (UTC)"
    )
    rounding: Literal["floor", "half_up", "ceiling"] = Field(
        default="floor", description="how a conversion to money rounds a fraction of a minor unit"
    )


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
    point_currencies: dict[str, PointCurrencyConfig] = Field(
        default_factory=dict,
        description="point currencies by code (JSON); one not listed has scale 0, 1 point = 1 minor unit, no expiry",
    )
    expiry_interval_seconds: float = Field(default=60.0, gt=0, description="how often the expiry job runs")
    expiry_warning_days: int = Field(default=7, ge=0, description="points.expiring is emitted this many days ahead")
    gauge_refresh_seconds: float = Field(
        default=15.0, gt=0, description="how often gauges read from the database (outstanding points) are refreshed"
    )
    calculate_budget_seconds: float = Field(
        default=0.3, gt=0, description="CalculateCheque answers within this; slower services are done without"
    )
    hold_ttl_seconds: int = Field(
        default=900, ge=1, le=86400, description="how long a calculation's points hold and coupon reservations live"
    )
    program_currency: str = Field(default="RUB", pattern=r"^[A-Z]{3}$", description="the currency receipts are in")
    admin_token: SecretStr | None = Field(
        default=None, description="bearer token of the API key administration RPCs; unset: they refuse every call"
    )
    api_key_pepper: SecretStr | None = Field(
        default=None, description="HMAC key the terminal API keys are hashed with; the same on every gateway replica"
    )
    api_key_rate_limit: int = Field(default=6000, ge=1, description="calls one terminal key may make per window")
    api_key_rate_window_seconds: float = Field(default=60.0, gt=0)
    api_key_cache_seconds: float = Field(
        default=5.0, ge=0, description="how long a gateway replica trusts a key lookup (a revocation's delay)"
    )
    member_cache_seconds: float = Field(
        default=2.0,
        ge=0,
        description="how long a gateway replica reuses a customer's identification (0: never): a register "
        "identifies, then calculates with the same card within seconds; a blocked card shows within this time",
    )
    saga_resume_seconds: float = Field(
        default=5.0, gt=0, description="how often, and after how long, unfinished receipts are completed"
    )
    points_payment_cap_basis_points: int = Field(
        default=5000, ge=0, le=10000, description="share of a line payable with points unless a rule caps it"
    )
    qr_token_secret: SecretStr | None = Field(
        default=None,
        description="HMAC key of the app's QR tokens; every members replica needs the same one "
        "(unset: a random key per process, fine for the embedded run only)",
    )
    qr_token_ttl_seconds: int = Field(default=120, gt=0, description="how long a QR token is accepted")
    tier_job_interval_seconds: float = Field(
        default=3600.0, gt=0, description="how often tiers are re-evaluated (lapsed tiers, inactivity)"
    )
    segment_job_interval_seconds: float = Field(
        default=3600.0, gt=0, description="how often dynamic segments and RFM scores are recomputed"
    )
    card_emission_interval_seconds: float = Field(
        default=5.0, gt=0, description="how often the card emission job looks for ordered batches"
    )
    birthday_job_interval_seconds: float = Field(
        default=3600.0, gt=0, description="how often the members service looks for today's birthdays (member.birthday)"
    )
    identify_cache_seconds: float = Field(
        default=2.0,
        ge=0,
        description="how long a members replica reuses an identification (0: never); its own changes clear it, "
        "another replica's show within this time",
    )

    gateway: ServiceConfig = _default_config("gateway")
    members: ServiceConfig = _default_config("members")
    accounts: ServiceConfig = _default_config("accounts")
    rules: ServiceConfig = _default_config("rules")
    rewards: ServiceConfig = _default_config("rewards")
    notifications: ServiceConfig = _default_config("notifications")
    messaging: MessagingConfig = MessagingConfig()
    provider_tokens: dict[str, SecretStr] = Field(
        default_factory=dict, description="notification providers' tokens by channel (sms, email = SMTP password, ...)"
    )

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
