"""Settings from the environment: LOYALTY_*, a service's group nested with a double underscore."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from loyalty.runtime.settings import SERVICE_NAMES, ServiceConfig, Settings

PASSWORD = "s3cr3t-pa55"
ACCOUNTS_URL = f"postgresql+asyncpg://loyalty:{PASSWORD}@db.internal:5432/accounts"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LOYALTY_* variable of the machine running the tests leaks into them."""
    for name in list(os.environ):
        if name.upper().startswith("LOYALTY_"):
            monkeypatch.delenv(name)


def test_defaults_give_each_service_its_ports_in_order() -> None:
    settings = Settings()
    assert SERVICE_NAMES == ("gateway", "members", "accounts", "rules", "rewards", "notifications")
    assert [settings.service(name).port for name in SERVICE_NAMES] == list(range(50051, 50057))
    assert [settings.service(name).metrics_port for name in SERVICE_NAMES] == list(range(9101, 9107))
    assert [settings.address(name) for name in SERVICE_NAMES] == [f"127.0.0.1:{p}" for p in range(50051, 50057)]
    assert settings.event_bus == "memory"


def test_default_database_is_a_sqlite_file_per_service_under_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    urls = {name: settings.database_url(name) for name in SERVICE_NAMES}
    for name, url in urls.items():
        assert url.startswith("sqlite+aiosqlite:///"), url
        path = Path(url.removeprefix("sqlite+aiosqlite:///"))
        assert path == (tmp_path / "data" / f"{name}.db").resolve()
    assert len(set(urls.values())) == len(SERVICE_NAMES)


def test_a_relative_data_dir_still_gives_an_absolute_database_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    url = Settings(data_dir=Path("var")).database_url("members")
    path = Path(url.removeprefix("sqlite+aiosqlite:///"))
    assert path.is_absolute()
    assert path == tmp_path.resolve() / "var" / "members.db"


def test_environment_sets_one_field_of_a_service_group_and_keeps_its_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The documented way to configure a service (and what services.cluster does):
    # one variable of the group, the rest of the group stays at its defaults.
    monkeypatch.setenv("LOYALTY_ACCOUNTS__DATABASE_URL", ACCOUNTS_URL)
    monkeypatch.setenv("LOYALTY_MEMBERS__ADDRESS", "members.loyalty.svc:50052")
    monkeypatch.setenv("LOYALTY_EVENT_BUS", "redis")

    settings = Settings()

    assert settings.database_url("accounts") == ACCOUNTS_URL
    assert settings.address("members") == "members.loyalty.svc:50052"
    assert settings.event_bus == "redis"
    assert (settings.accounts.port, settings.accounts.metrics_port) == (50053, 9103)
    assert (settings.members.port, settings.members.metrics_port) == (50052, 9102)


def test_environment_sets_a_whole_service_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOYALTY_ACCOUNTS__PORT", "6000")
    monkeypatch.setenv("LOYALTY_ACCOUNTS__METRICS_PORT", "6001")
    monkeypatch.setenv("LOYALTY_ACCOUNTS__DATABASE_URL", ACCOUNTS_URL)
    monkeypatch.setenv("LOYALTY_MEMBERS__PORT", "6010")
    monkeypatch.setenv("LOYALTY_MEMBERS__METRICS_PORT", "6011")
    monkeypatch.setenv("LOYALTY_MEMBERS__ADDRESS", "members.loyalty.svc:50052")
    monkeypatch.setenv("LOYALTY_EVENT_BUS", "redis")

    settings = Settings()

    assert settings.database_url("accounts") == ACCOUNTS_URL
    assert (settings.accounts.port, settings.accounts.metrics_port) == (6000, 6001)
    assert settings.address("accounts") == "127.0.0.1:6000"
    assert settings.address("members") == "members.loyalty.svc:50052"
    assert settings.event_bus == "redis"
    assert settings.database_url("members").startswith("sqlite+aiosqlite:///")


def test_database_url_and_redis_url_are_secrets_kept_out_of_repr() -> None:
    settings = Settings(
        redis_url=SecretStr(f"redis://:{PASSWORD}@redis.internal:6379/0"),
        accounts=ServiceConfig(port=50053, metrics_port=9103, database_url=SecretStr(ACCOUNTS_URL)),
    )
    assert isinstance(settings.accounts.database_url, SecretStr)
    assert settings.database_url("accounts") == ACCOUNTS_URL
    for shown in (repr(settings), str(settings), repr(settings.accounts), settings.model_dump_json()):
        assert PASSWORD not in shown


def test_an_unknown_service_name_is_a_key_error() -> None:
    settings = Settings()
    for lookup in (settings.service, settings.address, settings.database_url):
        with pytest.raises(KeyError, match="billing"):
            lookup("billing")
    # Attributes of Settings that aren't services must not pass for one.
    with pytest.raises(KeyError):
        settings.service("redis_url")


@pytest.mark.parametrize("value", ["kafka", "", "REDIS-STREAMS"])
def test_an_unknown_event_bus_is_a_validation_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("LOYALTY_EVENT_BUS", value)
    with pytest.raises(ValidationError, match="event_bus"):
        Settings()


def test_a_port_out_of_range_is_a_validation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOYALTY_REWARDS__PORT", "70000")
    monkeypatch.setenv("LOYALTY_REWARDS__METRICS_PORT", "9105")
    with pytest.raises(ValidationError, match=r"rewards\.port"):
        Settings()
