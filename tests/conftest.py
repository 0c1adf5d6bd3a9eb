"""Fixtures shared by every layer.

Storage and stream tests run against the real PostgreSQL and Redis on this
machine (``make test`` starts them when stopped). When one is unreachable the
test errors: it never skips, so a missing service can't pass as green.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests import infra


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database: once SQLite (embedded), once PostgreSQL (cluster)."""
    async with infra.database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A stream-key prefix of this test's own in the real Redis, removed afterwards."""
    prefix = f"loyalty-test-{uuid.uuid4().hex[:10]}"
    yield prefix
    await infra.flush_redis_prefix(prefix)
