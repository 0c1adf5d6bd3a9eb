"""Checks on publish (refused with CAMPAIGN_CONFLICTS, or published with the conflicts
answered) and ListCalendar, through the real RulesService over gRPC on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loyalty.common.v1 import receipt_pb2
from loyalty.rules.v1 import rules_service_pb2 as pb
from loyalty.runtime.errors import read_remote_error
from loyalty.runtime.timeutil import to_timestamp
from tests.integration.test_rules_promotions import discount_rule
from tests.integration.test_rules_store import rules_stub

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from loyalty.rules.v1.rules_service_pb2_grpc import RulesServiceAsyncStub

MARCH = datetime(2030, 3, 1, tzinfo=UTC)
APRIL = datetime(2030, 4, 1, tzinfo=UTC)
MAY = datetime(2030, 5, 1, tzinfo=UTC)
TEN_OFF = pb.Effect(discount_percent=pb.DiscountPercent(basis_points=1000))


def error_metadata(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return dict(info.metadata)
    return {}


def exclusive_campaign(name: str, start: datetime | None = MARCH, end: datetime | None = APRIL) -> pb.Campaign:
    return pb.Campaign(
        name=name,
        start_time=to_timestamp(start) if start else None,
        end_time=to_timestamp(end) if end else None,
        groups=[
            pb.RuleGroup(
                name="clearance",
                mode=pb.RULE_GROUP_MODE_EXCLUSIVE,
                rules=[discount_rule("10%", TEN_OFF, "receipt.total_minor > 0")],
            )
        ],
    )


async def create(stub: RulesServiceAsyncStub, campaign: pb.Campaign) -> pb.Campaign:
    created = await stub.CreateCampaign(pb.CreateCampaignRequest(request_id=f"c-{campaign.name}", campaign=campaign))
    return created.campaign


async def publish(stub: RulesServiceAsyncStub, campaign_id: str, accept: bool = False) -> pb.PublishCampaignResponse:
    return await stub.PublishCampaign(
        pb.PublishCampaignRequest(
            request_id=f"p-{campaign_id}-{accept}", campaign_id=campaign_id, accept_conflicts=accept
        )
    )


async def test_a_campaign_with_conflicts_is_refused_unless_accepted(tmp_path: Path, database_url: str) -> None:
    unreachable = pb.Campaign(
        name="tiers",
        groups=[
            pb.RuleGroup(
                name="first",
                mode=pb.RULE_GROUP_MODE_FIRST,
                rules=[
                    discount_rule("everyone", TEN_OFF, priority=1),
                    discount_rule("gold", TEN_OFF, 'member.tier == "gold"', priority=2),
                ],
            )
        ],
    )
    async with rules_stub(tmp_path, database_url) as stub:
        first = await create(stub, exclusive_campaign("first"))
        assert (await publish(stub, first.campaign_id)).conflicts == [], "nothing to conflict with"

        second = await create(stub, exclusive_campaign("second", start=None, end=None))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await publish(stub, second.campaign_id)
        remote = read_remote_error(refused.value)
        assert (remote.code, remote.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CAMPAIGN_CONFLICTS")
        group_id = second.groups[0].group_id
        assert error_metadata(refused.value) == {"conflict_0": f"EXCLUSIVE_OVERLAP|{group_id}|{first.campaign_id}"}
        draft = await stub.GetCampaign(pb.GetCampaignRequest(campaign_id=second.campaign_id))
        assert draft.campaign.status == pb.CAMPAIGN_STATUS_DRAFT, "a refused campaign stays a draft"

        accepted = await publish(stub, second.campaign_id, accept=True)
        assert accepted.campaign.status == pb.CAMPAIGN_STATUS_ACTIVE, "published with the conflicts accepted"
        assert [(c.kind, c.subject_id, c.other_campaign_id) for c in accepted.conflicts] == [
            (pb.CAMPAIGN_CONFLICT_KIND_EXCLUSIVE_OVERLAP, group_id, first.campaign_id)
        ]

        tiers = await create(stub, unreachable)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await publish(stub, tiers.campaign_id)
        gold = tiers.groups[0].rules[1].rule_id
        assert error_metadata(refused.value) == {"conflict_0": f"UNREACHABLE_RULE|{gold}|"}
        assert "never applies: rule" in read_remote_error(refused.value).message


async def test_the_calendar_lists_campaigns_over_a_range_by_status_channel_and_store(
    tmp_path: Path, database_url: str
) -> None:
    def campaign(
        name: str, start: datetime | None, end: datetime | None, scope: pb.CampaignScope | None = None
    ) -> pb.Campaign:
        return pb.Campaign(
            name=name,
            start_time=to_timestamp(start) if start else None,
            end_time=to_timestamp(end) if end else None,
            scope=scope,
            rules=[discount_rule("10%", TEN_OFF)],
        )

    async with rules_stub(tmp_path, database_url) as stub:
        always = await create(stub, campaign("always", None, None))
        march_web = await create(
            stub, campaign("march web", MARCH, APRIL, pb.CampaignScope(channels=[receipt_pb2.SALES_CHANNEL_WEB]))
        )
        april_store = await create(stub, campaign("april store", APRIL, MAY, pb.CampaignScope(store_ids=["s-1"])))
        await publish(stub, march_web.campaign_id)
        await publish(stub, april_store.campaign_id)
        await stub.PauseCampaign(pb.PauseCampaignRequest(request_id="pause", campaign_id=april_store.campaign_id))

        async def names(start: datetime, end: datetime, **filters: object) -> list[tuple[str, int]]:
            answer = await stub.ListCalendar(
                pb.ListCalendarRequest(start_time=to_timestamp(start), end_time=to_timestamp(end), **filters)  # type: ignore[arg-type]
            )
            assert not answer.truncated
            return [(entry.name, entry.status) for entry in answer.entries]

        everything = [
            ("always", pb.CAMPAIGN_STATUS_DRAFT),
            ("march web", pb.CAMPAIGN_STATUS_SCHEDULED),
            ("april store", pb.CAMPAIGN_STATUS_PAUSED),
        ]
        assert await names(MARCH, MAY) == everything, "open starts first, then by start"
        assert await names(MARCH, APRIL) == everything[:2], "the range's end is exclusive"
        assert await names(APRIL, MAY) == [everything[0], everything[2]], "a campaign's end is exclusive"
        assert (
            await names(MARCH, MAY, statuses=[pb.CAMPAIGN_STATUS_SCHEDULED, pb.CAMPAIGN_STATUS_PAUSED])
            == (everything[1:])
        )
        assert await names(MARCH, MAY, channel=receipt_pb2.SALES_CHANNEL_POS) == [everything[0], everything[2]]
        assert await names(MARCH, MAY, channel=receipt_pb2.SALES_CHANNEL_WEB, store_id="s-2") == everything[:2]
        assert await names(MARCH, MAY, store_id="s-1") == everything
        entry = (
            await stub.ListCalendar(
                pb.ListCalendarRequest(start_time=to_timestamp(MARCH), end_time=to_timestamp(APRIL))
            )
        ).entries[1]
        assert (entry.campaign_id, list(entry.channels)) == (march_web.campaign_id, [receipt_pb2.SALES_CHANNEL_WEB])
        assert not always.start_time.seconds

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListCalendar(pb.ListCalendarRequest(start_time=to_timestamp(MAY), end_time=to_timestamp(MARCH)))
        assert [v.field for v in read_remote_error(refused.value).violations] == ["end_time"]
