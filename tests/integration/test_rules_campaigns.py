"""UpdateCampaign and ListCampaigns through the real RulesService over gRPC on SQLite and
PostgreSQL: drafts are edited in place and validated, published campaigns are refused, updates
are idempotent, and paging lists every campaign once."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from loyalty.common.v1 import receipt_pb2
from loyalty.rules.v1 import rules_service_pb2 as pb
from loyalty.runtime.errors import RemoteError, read_remote_error
from loyalty.runtime.timeutil import to_timestamp
from tests.integration.test_rules_promotions import discount_rule, receipt
from tests.integration.test_rules_store import rules_stub

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from loyalty.rules.v1.rules_service_pb2_grpc import RulesServiceAsyncStub

ONE_OFF = pb.Effect(discount_amount=pb.DiscountAmount(amount_minor=100))
FIVE_OFF = pb.Effect(discount_amount=pb.DiscountAmount(amount_minor=500))
A_RECEIPT = receipt(receipt_pb2.ReceiptLine(position=1, sku="A", price_minor=1000, quantity_milli=1000))


async def create(stub: RulesServiceAsyncStub, name: str, effect: pb.Effect = ONE_OFF) -> pb.Campaign:
    campaign = pb.Campaign(name=name, rules=[discount_rule(name, effect)])
    return (await stub.CreateCampaign(pb.CreateCampaignRequest(request_id=f"c-{name}", campaign=campaign))).campaign


async def update(stub: RulesServiceAsyncStub, request_id: str, campaign: pb.Campaign, *paths: str) -> pb.Campaign:
    request = pb.UpdateCampaignRequest(request_id=request_id, campaign=campaign, update_mask=FieldMask(paths=paths))
    return (await stub.UpdateCampaign(request)).campaign


async def refused_update(
    stub: RulesServiceAsyncStub, request_id: str, campaign: pb.Campaign, *paths: str
) -> RemoteError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await update(stub, request_id, campaign, *paths)
    return read_remote_error(error.value)


async def discount(stub: RulesServiceAsyncStub) -> int:
    return (await stub.EvaluateReceipt(pb.EvaluateReceiptRequest(receipt=A_RECEIPT))).discount_total_minor


async def test_an_edited_draft_is_published_and_evaluated_with_its_new_rules(tmp_path: Path, database_url: str) -> None:
    async with rules_stub(tmp_path, database_url) as stub:
        draft = await create(stub, "spring")
        edited = await update(
            stub,
            "u-1",
            pb.Campaign(
                campaign_id=draft.campaign_id,
                name="  summer ",
                start_time=to_timestamp(datetime(2020, 1, 1, tzinfo=UTC)),
                rules=[discount_rule("5.00 off", FIVE_OFF, "receipt.total_minor >= 1000")],
            ),
            "name",
            "rules",
        )
        assert edited.campaign_id == draft.campaign_id
        assert edited.status == pb.CAMPAIGN_STATUS_DRAFT
        assert edited.name == "summer"
        assert not edited.HasField("start_time"), "a field outside the mask is left alone"
        assert [rule.name for rule in edited.rules] == ["5.00 off"]
        assert edited.rules[0].rule_id != draft.rules[0].rule_id
        stored = (await stub.GetCampaign(pb.GetCampaignRequest(campaign_id=draft.campaign_id))).campaign
        assert stored == edited

        await stub.PublishCampaign(pb.PublishCampaignRequest(request_id="p", campaign_id=draft.campaign_id))
        evaluated = await stub.EvaluateReceipt(pb.EvaluateReceiptRequest(receipt=A_RECEIPT))
        assert evaluated.discount_total_minor == 500
        assert [promotion.rule_id for promotion in evaluated.applied_promotions] == [edited.rules[0].rule_id]


async def test_a_bad_update_is_refused_naming_the_field_and_changes_nothing(tmp_path: Path, database_url: str) -> None:
    async with rules_stub(tmp_path, database_url) as stub:
        draft = await create(stub, "spring")
        bad = pb.Campaign(
            campaign_id=draft.campaign_id,
            name="renamed",
            rules=[discount_rule("ok", ONE_OFF), discount_rule("broken", ONE_OFF, "receipt.total_minor >")],
        )
        remote = await refused_update(stub, "u-bad", bad, "name", "rules")
        assert (remote.code, remote.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert [violation.field for violation in remote.violations] == ["campaign.rules[1].condition"]
        no_effect = pb.Campaign(campaign_id=draft.campaign_id, rules=[pb.Rule(name="nothing")])
        remote = await refused_update(stub, "u-bad-effect", no_effect, "rules")
        assert [violation.field for violation in remote.violations] == ["campaign.rules[0].effect"]
        blank = await refused_update(stub, "u-blank", pb.Campaign(campaign_id=draft.campaign_id), "name")
        assert [violation.field for violation in blank.violations] == ["campaign.name"]
        for mask in ((), ("status",), ("version",), ("campaign_id",)):
            remote = await refused_update(stub, f"u-mask-{mask}", pb.Campaign(campaign_id=draft.campaign_id), *mask)
            assert [violation.field for violation in remote.violations] == ["update_mask"]
        assert (await stub.GetCampaign(pb.GetCampaignRequest(campaign_id=draft.campaign_id))).campaign == draft

        missing = await refused_update(stub, "u-missing", pb.Campaign(campaign_id="nope", name="x"), "name")
        assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "CAMPAIGN_NOT_FOUND")


async def test_a_published_or_ended_campaign_is_refused(tmp_path: Path, database_url: str) -> None:
    async with rules_stub(tmp_path, database_url) as stub:
        draft = await create(stub, "spring")
        campaign_id = draft.campaign_id
        await stub.PublishCampaign(pb.PublishCampaignRequest(request_id="p", campaign_id=campaign_id))
        change = pb.Campaign(campaign_id=campaign_id, name="x", rules=[discount_rule("5.00 off", FIVE_OFF)])
        published = await refused_update(stub, "u-active", change, "name", "rules")
        assert (published.code, published.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CAMPAIGN_PUBLISHED")
        await stub.PauseCampaign(pb.PauseCampaignRequest(request_id="pause", campaign_id=campaign_id))
        assert (await refused_update(stub, "u-paused", change, "rules")).reason == "CAMPAIGN_PUBLISHED"
        await stub.ResumeCampaign(pb.ResumeCampaignRequest(request_id="resume", campaign_id=campaign_id))
        assert await discount(stub) == 100, "the published rules still apply unchanged"
        await stub.EndCampaign(pb.EndCampaignRequest(request_id="end", campaign_id=campaign_id))
        ended = await refused_update(stub, "u-ended", change, "name")
        assert (ended.code, ended.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CAMPAIGN_ENDED")
        stored = (await stub.GetCampaign(pb.GetCampaignRequest(campaign_id=campaign_id))).campaign
        assert (stored.name, stored.version, stored.rules) == ("spring", 1, draft.rules)

        scheduled = await create(stub, "later")
        await update(
            stub,
            "u-later",
            pb.Campaign(campaign_id=scheduled.campaign_id, start_time=to_timestamp(datetime(2999, 1, 1, tzinfo=UTC))),
            "start_time",
        )
        publish = await stub.PublishCampaign(
            pb.PublishCampaignRequest(request_id="p2", campaign_id=scheduled.campaign_id)
        )
        assert publish.campaign.status == pb.CAMPAIGN_STATUS_SCHEDULED
        rename = pb.Campaign(campaign_id=scheduled.campaign_id, name="sooner")
        assert (await refused_update(stub, "u-sched", rename, "name")).reason == "CAMPAIGN_PUBLISHED"


async def test_a_retried_update_applies_once_and_a_reused_key_is_refused(tmp_path: Path, database_url: str) -> None:
    async with rules_stub(tmp_path, database_url) as stub:
        draft = await create(stub, "spring")
        change = pb.Campaign(campaign_id=draft.campaign_id, rules=[discount_rule("5.00 off", FIVE_OFF)])
        first = await update(stub, "u-1", change, "rules")
        second = await update(stub, "u-1", change, "rules")
        assert second == first, "a retry answers the first result (the same new rule id)"
        stored = (await stub.GetCampaign(pb.GetCampaignRequest(campaign_id=draft.campaign_id))).campaign
        assert [rule.rule_id for rule in stored.rules] == [rule.rule_id for rule in first.rules]

        other = pb.Campaign(campaign_id=draft.campaign_id, rules=[discount_rule("1.00 off", ONE_OFF)])
        reused = await refused_update(stub, "u-1", other, "rules")
        assert (reused.code, reused.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED")
        other_mask = await refused_update(stub, "u-1", change, "rules", "name")
        assert other_mask.reason == "IDEMPOTENCY_KEY_REUSED", "the mask is part of the request"
        assert (await stub.GetCampaign(pb.GetCampaignRequest(campaign_id=draft.campaign_id))).campaign == stored


async def list_all(stub: RulesServiceAsyncStub, request: pb.ListCampaignsRequest) -> tuple[list[str], int]:
    """Every campaign id the listing answers, page by page, and how many pages it took."""
    ids: list[str] = []
    pages = 0
    while True:
        page = await stub.ListCampaigns(request)
        pages += 1
        assert len(page.campaigns) <= (request.page_size or 50)
        ids += [campaign.campaign_id for campaign in page.campaigns]
        if not page.next_page_token:
            return ids, pages
        request.page_token = page.next_page_token


async def test_paging_lists_every_campaign_once_with_filters(tmp_path: Path, database_url: str) -> None:
    async with rules_stub(tmp_path, database_url) as stub:
        created = [await create(stub, f"Spring sale {index}") for index in range(7)]
        created += [await create(stub, f"winter_{index}") for index in range(3)]
        for campaign in created[:4]:
            await stub.PublishCampaign(
                pb.PublishCampaignRequest(request_id=f"p-{campaign.campaign_id}", campaign_id=campaign.campaign_id)
            )
        await stub.EndCampaign(pb.EndCampaignRequest(request_id="end", campaign_id=created[0].campaign_id))
        newest_first = [campaign.campaign_id for campaign in reversed(created)]

        everything, pages = await list_all(stub, pb.ListCampaignsRequest(page_size=3))
        assert (everything, pages) == (newest_first, 4)
        drafts, _ = await list_all(stub, pb.ListCampaignsRequest(page_size=2, statuses=[pb.CAMPAIGN_STATUS_DRAFT]))
        assert drafts == newest_first[:6]
        live, _ = await list_all(
            stub,
            pb.ListCampaignsRequest(page_size=2, statuses=[pb.CAMPAIGN_STATUS_ACTIVE, pb.CAMPAIGN_STATUS_ENDED]),
        )
        assert live == newest_first[6:]
        assert (await list_all(stub, pb.ListCampaignsRequest(statuses=[pb.CAMPAIGN_STATUS_SCHEDULED])))[0] == []
        spring, _ = await list_all(stub, pb.ListCampaignsRequest(page_size=2, name_contains="SPRING"))
        assert spring == newest_first[3:]
        assert (await list_all(stub, pb.ListCampaignsRequest(name_contains="_")))[0] == newest_first[:3], (
            "the name filter is literal text, not a LIKE pattern"
        )
        receipts = pb.ListCampaignsRequest(page_size=4, trigger=pb.CAMPAIGN_TRIGGER_RECEIPT)
        assert (await list_all(stub, receipts))[0] == newest_first
        assert (await list_all(stub, pb.ListCampaignsRequest(trigger=pb.CAMPAIGN_TRIGGER_MEMBER_BIRTHDAY)))[0] == []

        first = await stub.ListCampaigns(pb.ListCampaignsRequest(page_size=2))
        with pytest.raises(grpc.aio.AioRpcError) as other_filters:
            await stub.ListCampaigns(pb.ListCampaignsRequest(page_token=first.next_page_token, name_contains="x"))
        assert [v.field for v in read_remote_error(other_filters.value).violations] == ["page_token"]
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.ListCampaigns(pb.ListCampaignsRequest(page_size=-1, page_token="garbage!"))
        assert sorted(v.field for v in read_remote_error(bad.value).violations) == ["page_size", "page_token"]
