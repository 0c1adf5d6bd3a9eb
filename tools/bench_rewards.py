"""Measure a code generation job: N unique coupon codes for one series, written by the job runner.

    .venv/bin/python tools/bench_rewards.py --count 1000000

By default it creates a scratch PostgreSQL database on 127.0.0.1 (dropped afterwards), applies
the rewards migrations, starts a GenerateCodes job for a fresh unique-code series and runs it
to the end exactly as the service's runner does (batches of jobs.CODE_BATCH_SIZE, each
committed with the job's progress). It prints the elapsed time, the rate and a check that the
series holds exactly N distinct codes. ``--database-url`` points it at an existing database.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from sqlalchemy import func, select

from loyalty.common.v1 import coupon_pb2
from loyalty.runtime import db
from loyalty.runtime.errors import Violations
from loyalty.runtime.timeutil import utcnow
from services.rewards import jobs, service, store
from services.rewards.domain import SeriesKind
from services.rewards.server import DEFINITION

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


@asynccontextmanager
async def scratch_database(admin_dsn: str) -> AsyncIterator[str]:
    name = f"loyalty_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1) + f"/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def measure(url: str, count: int, batch_size: int) -> None:
    engine = db.create_engine(url)
    try:
        await db.migrate(engine, DEFINITION.migrations_dir)
        sessions = db.create_session_factory(engine)
        benefit = coupon_pb2.CouponBenefit(percent_off_basis_points=1000)
        terms = service.parse_series(
            name="bench print run",
            kind=SeriesKind.UNIQUE,
            campaign_id="",
            benefit=benefit.SerializeToString(),
            benefit_fields=service.BenefitFields("percent_off_basis_points", 1000, [], [], [], 0),
            uses_per_code=1,
            uses_per_member=0,
            valid_from=None,
            valid_until=None,
            validity_days=0,
            mass_code="",
            code_alphabet="",
            code_length=0,
            violations=Violations(),
        )
        async with sessions() as session, session.begin():
            series = await service.create_series(session, terms, utcnow())
            job = await service.start_code_job(session, series.series_id, count, utcnow())
        started = time.perf_counter()
        await jobs.run_code_job(sessions, job.job_id, batch_size)
        elapsed = time.perf_counter() - started
        async with sessions() as session:
            written = await session.scalar(
                select(func.count(func.distinct(store.CouponRow.code))).where(
                    store.CouponRow.series_id == series.series_id
                )
            )
            done = await service.get_code_job(session, job.job_id)
        print(f"database:      {engine.dialect.name}")
        print(f"codes:         {count} requested, {written} distinct written, job generated={done.generated}")
        print(f"code format:   {len(series.code_alphabet)} characters x {series.code_length}")
        print(f"batch size:    {batch_size}")
        print(f"elapsed:       {elapsed:.1f} s  ({count / elapsed:,.0f} codes/s)")
        if written != count or done.finished_at is None:
            raise SystemExit("FAILED: the series does not hold exactly the requested codes")
    finally:
        await engine.dispose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=jobs.CODE_BATCH_SIZE)
    parser.add_argument("--database-url", help="an existing database (default: a scratch PostgreSQL database)")
    parser.add_argument("--admin-dsn", default=ADMIN_DSN, help="PostgreSQL server for the scratch database")
    args = parser.parse_args()
    if args.database_url:
        await measure(args.database_url, args.count, args.batch_size)
        return
    async with scratch_database(args.admin_dsn) as url:
        await measure(url, args.count, args.batch_size)


if __name__ == "__main__":
    asyncio.run(main())
