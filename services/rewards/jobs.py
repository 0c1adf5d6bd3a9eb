"""Background work of the rewards service: code generation jobs, safe with many replicas."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.runtime.timeutil import utcnow
from services.rewards import service, store

log = logging.getLogger(__name__)

# Codes written per transaction (inserted in pages by SQLAlchemy): a crash loses at most
# one batch, and a job advances its progress this often.
CODE_BATCH_SIZE = 10_000
# How often unfinished jobs are looked for when nothing wakes the runner (after a restart,
# or jobs started on another replica).
JOB_POLL_SECONDS = 5.0


async def run_code_job(sessions: async_sessionmaker[AsyncSession], job_id: str, batch_size: int) -> None:
    """Writes the job's codes batch by batch until it has them all. Each batch commits with
    the job's progress, so an interrupted job resumes where it stopped, and the job row is
    locked per batch, so replicas working the same job never write more than asked."""
    while True:
        async with sessions() as session, session.begin():
            finished = await service.generate_code_batch(session, job_id, batch_size, utcnow())
        if finished:
            return
        await asyncio.sleep(0)


class CodeGenerationRunner:
    """Runs unfinished code generation jobs, woken when one starts and polled otherwise."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        batch_size: int = CODE_BATCH_SIZE,
        poll_seconds: float = JOB_POLL_SECONDS,
    ) -> None:
        self._sessions = sessions
        self._batch_size = batch_size
        self._poll_seconds = poll_seconds
        self._wake = asyncio.Event()

    def notify(self) -> None:
        """Wakes the runner at once after a job was started."""
        self._wake.set()

    async def run_pending(self) -> None:
        async with self._sessions() as session:
            job_ids = await store.unfinished_code_jobs(session)
        for job_id in job_ids:
            await run_code_job(self._sessions, job_id, self._batch_size)

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.run_pending()
            except Exception:
                log.exception("code generation failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll_seconds)
