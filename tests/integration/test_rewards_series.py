"""Coupon series over real gRPC on SQLite and PostgreSQL: mass codes with per-member limits,
personal coupons issued in bulk, generated codes, partner promo codes and their usage report."""

from __future__ import annotations

import asyncio
from datetime import UTC, timedelta
from pathlib import Path

import grpc
from sqlalchemy import func, select

from loyalty.common.v1 import coupon_pb2
from loyalty.rewards.v1 import rewards_service_pb2 as pb
from loyalty.runtime import db
from loyalty.runtime.errors import RemoteError, Violations, read_remote_error
from loyalty.runtime.timeutil import utcnow
from services.rewards import jobs, service, store
from services.rewards.domain import CODE_ALPHABET, SeriesKind
from tests import infra
from tests.integration.test_rewards_lifecycle import failed, refusal, rewards_service

TEN_PERCENT = coupon_pb2.CouponBenefit(percent_off_basis_points=1000, category_ids=["dairy"])


async def test_a_mass_code_is_shared_and_limited_per_member(tmp_path: Path, database_url: str) -> None:
    async with rewards_service(tmp_path, database_url) as rewards:
        series = await rewards.create_series(
            "mass-1",
            kind=pb.COUPON_SERIES_KIND_MASS,
            mass_code="summer-10",
            uses_per_code=0,
            uses_per_member=1,
            benefit=TEN_PERCENT,
        )
        assert (series.mass_code, series.campaign_id, series.benefit) == ("SUMMER10", "campaign-1", TEN_PERCENT)
        assert (await rewards.stub.GetCouponSeries(pb.GetCouponSeriesRequest(series_id=series.series_id))).series == (
            series
        )

        shown = await rewards.validate("Summer 10", member_id="member-1")
        assert shown.valid
        presented = (shown.coupon.code, shown.coupon.series_id, shown.coupon.campaign_id, shown.coupon.benefit)
        assert presented == ("SUMMER10", series.series_id, "campaign-1", TEN_PERCENT), "what the rules service needs"

        for index, member in enumerate(["member-1", "member-2", "member-3"]):
            reserved = await rewards.reserve(f"reserve-{index}", "SUMMER10", f"pos-{index}:1", member_id=member)
            assert reserved.coupon.benefit == TEN_PERCENT
            await rewards.redeem(f"redeem-{index}", reserved.reservation.reservation_id)
        again = await rewards.validate("SUMMER10", member_id="member-1")
        assert (again.valid, again.rejection) == (False, pb.COUPON_REJECTION_MEMBER_LIMIT_REACHED)
        refusals = {
            "again": await refusal(rewards.reserve("r-again", "SUMMER10", "pos-1:2", member_id="member-1")),
            "anonymous": await refusal(rewards.reserve("r-anon", "SUMMER10", "pos-1:3", member_id="")),
            "code taken": await refusal(
                rewards.create_series("mass-2", kind=pb.COUPON_SERIES_KIND_MASS, mass_code="SUMMER10", uses_per_code=0)
            ),
            "issue from mass": await refusal(
                rewards.stub.IssueCoupon(pb.IssueCouponRequest(request_id="i-1", series_id=series.series_id))
            ),
        }
        assert {what: (error.code, error.reason) for what, error in refusals.items()} == {
            "again": failed("COUPON_MEMBER_LIMIT_REACHED"),
            "anonymous": failed("COUPON_MEMBER_REQUIRED"),
            "code taken": (grpc.StatusCode.ALREADY_EXISTS, "COUPON_CODE_TAKEN"),
            "issue from mass": failed("COUPON_SERIES_MASS"),
        }
        used = await rewards.validate("SUMMER10", member_id="member-4")
        assert (used.valid, used.coupon.uses, used.coupon.status) == (True, 3, pb.COUPON_STATUS_ACTIVE)

        await rewards.reinstate("return-1", "SUMMER10", "pos-1:1")
        member_2 = await rewards.validate("SUMMER10", member_id="member-2")
        assert (member_2.valid, member_2.coupon.uses) == (True, 2), "member-2's receipt was returned"
        member_1 = await rewards.validate("SUMMER10", member_id="member-1")
        assert member_1.rejection == pb.COUPON_REJECTION_MEMBER_LIMIT_REACHED, "the return was not member-1's"


async def test_a_receipt_below_the_threshold_is_not_applicable(tmp_path: Path, database_url: str) -> None:
    async with rewards_service(tmp_path, database_url) as rewards:
        threshold = coupon_pb2.CouponBenefit(amount_off_minor=50_000, min_receipt_total_minor=300_000)
        coupon = await rewards.issue("issue-1", benefit=threshold)
        small = await rewards.stub.ValidateCoupon(
            pb.ValidateCouponRequest(code=coupon.code, member_id="member-1", receipt_total_minor=299_999)
        )
        assert (small.valid, small.rejection) == (False, pb.COUPON_REJECTION_NOT_APPLICABLE)
        reserve = pb.ReserveCouponRequest(
            request_id="r-1", code=coupon.code, member_id="member-1", receipt_ref="pos-1:1", receipt_total_minor=100
        )
        assert (await refusal(rewards.stub.ReserveCoupon(reserve))).reason == "COUPON_NOT_APPLICABLE"
        reserve.request_id, reserve.receipt_total_minor = "r-2", 300_000
        assert (await rewards.stub.ReserveCoupon(reserve)).coupon.benefit == threshold


async def test_a_multi_use_code_is_redeemed_exactly_as_often_as_allowed_by_racing_registers(
    tmp_path: Path, database_url: str
) -> None:
    async with rewards_service(tmp_path, database_url) as rewards:
        series = await rewards.create_series(
            "mass-1", kind=pb.COUPON_SERIES_KIND_MASS, mass_code="THREE333", uses_per_code=3
        )

        async def register(index: int) -> pb.RedeemCouponResponse | RemoteError:
            try:
                reserved = await rewards.reserve(f"reserve-{index}", "THREE333", f"pos-{index}:1", member_id="")
                return await rewards.redeem(f"redeem-{index}", reserved.reservation.reservation_id)
            except grpc.aio.AioRpcError as error:
                return read_remote_error(error)

        outcomes = await asyncio.gather(*(register(index) for index in range(10)))
        winners = [o for o in outcomes if isinstance(o, pb.RedeemCouponResponse)]
        assert len(winners) == 3, outcomes
        assert {(o.code, o.reason) for o in outcomes if isinstance(o, RemoteError)} <= {
            failed("COUPON_RESERVED"),
            failed("COUPON_ALREADY_USED"),
        }
        final = await rewards.validate("THREE333", member_id="")
        assert (final.rejection, final.coupon.uses) == (pb.COUPON_REJECTION_ALREADY_USED, 3)
        assert await rewards.redeemed_reservations("THREE333") == 3
        assert series.uses_per_code == 3


async def test_personal_coupons_are_issued_to_a_list_of_members(tmp_path: Path, database_url: str) -> None:
    async with rewards_service(tmp_path, database_url) as rewards:
        series = await rewards.create_series("welcome", validity_days=30, code_alphabet="23456789", code_length=16)
        request = pb.IssueCouponsRequest(
            request_id="bulk-1", series_id=series.series_id, member_ids=["member-1", "member-2", "member-3"]
        )
        issued = await rewards.stub.IssueCoupons(request)
        assert [coupon.member_id for coupon in issued.coupons] == ["member-1", "member-2", "member-3"]
        codes = [coupon.code for coupon in issued.coupons]
        assert len(set(codes)) == 3 and all(len(code) == 16 and set(code) <= set("23456789") for code in codes)
        for coupon in issued.coupons:
            window = coupon.valid_until.ToDatetime(tzinfo=UTC) - coupon.valid_from.ToDatetime(tzinfo=UTC)
            assert window == timedelta(days=30)
        assert await rewards.stub.IssueCoupons(request) == issued, "a retry issues nothing more"
        stranger = await rewards.validate(codes[0], member_id="member-2")
        assert (stranger.rejection, stranger.HasField("coupon")) == (pb.COUPON_REJECTION_OTHER_MEMBER, False)
        async with rewards.engine.connect() as connection:
            issued_events = await connection.scalar(
                select(func.count()).select_from(store.outbox).where(store.outbox.c.event_type == "coupon.issued")
            )
        assert issued_events == 3

        bad = await refusal(rewards.stub.IssueCoupons(pb.IssueCouponsRequest(request_id="bulk-2", member_ids=[""])))
        assert [v.field for v in bad.violations] == ["series_id", "member_ids[0]"]
        unknown = await refusal(
            rewards.stub.IssueCoupons(pb.IssueCouponsRequest(request_id="bulk-3", series_id="nope", member_ids=["m"]))
        )
        assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "COUPON_SERIES_NOT_FOUND")


async def test_a_series_refuses_ambiguous_or_guessable_codes(tmp_path: Path, database_url: str) -> None:
    async with rewards_service(tmp_path, database_url) as rewards:
        bad = await refusal(
            rewards.create_series(
                "bad",
                name="",
                kind=pb.COUPON_SERIES_KIND_UNSPECIFIED,
                benefit=coupon_pb2.CouponBenefit(percent_off_basis_points=10_001),
                uses_per_code=-1,
                code_alphabet="ABCDEF0",
            )
        )
        assert [v.field for v in bad.violations] == [
            "name",
            "kind",
            "benefit.percent_off_basis_points",
            "uses_per_code",
            "code_alphabet",
        ]
        short = await refusal(rewards.create_series("short", code_alphabet="2345", code_length=12))
        assert [v.field for v in short.violations] == ["code_length"], "4^12 = 2^24 codes could be guessed"
        none = await refusal(rewards.create_series("none", benefit=coupon_pb2.CouponBenefit()))
        assert [v.field for v in none.violations] == ["benefit"]


async def test_a_code_generation_job_writes_every_code_once(tmp_path: Path, database_url: str) -> None:
    async with rewards_service(tmp_path, database_url) as rewards:
        series = await rewards.create_series("print-run", code_alphabet="ABCDEFGHJK", code_length=13)
        request = pb.GenerateCodesRequest(request_id="job-1", series_id=series.series_id, count=3500)
        started = (await rewards.stub.GenerateCodes(request)).job
        assert (started.requested, started.series_id) == (3500, series.series_id)

        async def finished() -> bool:
            job = (await rewards.stub.GetCodeGenerationJob(pb.GetCodeGenerationJobRequest(job_id=started.job_id))).job
            return job.status == pb.CODE_GENERATION_JOB_STATUS_DONE and job.generated == 3500

        await infra.wait_until(finished, what="the job to write 3500 codes", seconds=60)
        assert (await rewards.stub.GenerateCodes(request)).job == started, "a retry starts no second job"

        codes: list[str] = []
        token = ""
        while True:
            page = await rewards.stub.ListCoupons(
                pb.ListCouponsRequest(series_id=series.series_id, page_size=500, page_token=token)
            )
            codes += [coupon.code for coupon in page.coupons]
            assert all(coupon.member_id == "" for coupon in page.coupons), "generated codes are bearer codes"
            token = page.next_page_token
            if not token:
                break
        assert len(codes) == len(set(codes)) == 3500
        assert all(len(code) == 13 and set(code) <= set("ABCDEFGHJK") for code in codes)
        assert (await rewards.validate(codes[1234], member_id="")).valid


async def test_replicas_resuming_one_job_write_exactly_the_codes_asked_for(database_url: str) -> None:
    """A job interrupted after a batch resumes from its recorded progress, and two runners
    working it at once never overshoot: the job row is locked per batch."""
    async with infra.migrated_engine("rewards", database_url) as engine:
        sessions = db.create_session_factory(engine)
        now = utcnow()
        async with sessions() as session, session.begin():
            terms = service.parse_series(
                name="print",
                kind=SeriesKind.UNIQUE,
                campaign_id="",
                benefit=TEN_PERCENT.SerializeToString(),
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
            series = await service.create_series(session, terms, now)
            job = await service.start_code_job(session, series.series_id, 1000, now)
        async with sessions() as session, session.begin():
            assert not await service.generate_code_batch(session, job.job_id, 300, now), "one batch, then a crash"
        await asyncio.gather(*(jobs.run_code_job(sessions, job.job_id, 150) for _ in range(3)))
        async with sessions() as session:
            written = await session.scalar(
                select(func.count()).select_from(store.CouponRow).where(store.CouponRow.series_id == series.series_id)
            )
            done = await service.get_code_job(session, job.job_id)
        assert (written, done.generated, done.finished_at is not None) == (1000, 1000, True)
        assert set(series.code_alphabet) == set(CODE_ALPHABET)


async def test_partner_codes_are_imported_with_attribution_and_reported(tmp_path: Path, database_url: str) -> None:
    async with rewards_service(tmp_path, database_url) as rewards:
        series = await rewards.create_series("partners")
        imported = await rewards.stub.ImportPromoCodes(
            pb.ImportPromoCodesRequest(
                request_id="import-a",
                series_id=series.series_id,
                partner_id="bank-a",
                codes=["bank-0001", "BANK0002", "bank 0003", "BANK0001"],
            )
        )
        assert (imported.imported, list(imported.duplicate_codes)) == (3, ["BANK0001"])
        other = await rewards.stub.ImportPromoCodes(
            pb.ImportPromoCodesRequest(
                request_id="import-b", series_id=series.series_id, partner_id="shop-b", codes=["BANK0002", "SHOPB001"]
            )
        )
        assert (other.imported, list(other.duplicate_codes)) == (1, ["BANK0002"]), "a code belongs to one partner"
        for index, code in enumerate(["BANK0001", "BANK0003", "SHOPB001"]):
            reserved = await rewards.reserve(f"reserve-{index}", code, f"pos-1:{index}", member_id="")
            assert reserved.coupon.partner_id == ("shop-b" if code == "SHOPB001" else "bank-a")
            await rewards.redeem(f"redeem-{index}", reserved.reservation.reservation_id)
        report = await rewards.stub.GetPartnerUsageReport(pb.GetPartnerUsageReportRequest(series_id=series.series_id))
        assert list(report.partners) == [
            pb.PartnerUsage(partner_id="bank-a", codes=3, used_codes=2, redemptions=2),
            pb.PartnerUsage(partner_id="shop-b", codes=1, used_codes=1, redemptions=1),
        ]
        bad = await refusal(
            rewards.stub.ImportPromoCodes(
                pb.ImportPromoCodesRequest(request_id="bad", series_id=series.series_id, codes=["ok12", "no!", "x"])
            )
        )
        assert [v.field for v in bad.violations] == ["partner_id", "codes[1]", "codes[2]"]
