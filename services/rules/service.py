"""Rules' use cases, and the cache of compiled live campaigns the hot path reads."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.runtime.bus import Event
from loyalty.runtime.errors import FailedPrecondition, NotFound
from loyalty.runtime.inbox import first_delivery
from loyalty.runtime.outbox import add_event
from loyalty.runtime.paging import Cursor
from loyalty.runtime.timeutil import utcnow
from services.rules import store
from services.rules.domain import (
    NO_CATALOGUE,
    STATUS_CHANGES,
    AttributeValue,
    AwardBadge,
    Brand,
    Campaign,
    CampaignStatus,
    CampaignTrigger,
    CampaignUsage,
    Catalogue,
    Category,
    CompiledCampaign,
    Conflict,
    Evaluation,
    Explanation,
    Grant,
    IncrementCounter,
    IssueCoupon,
    PresentedCoupon,
    Product,
    ProductList,
    ProductRecord,
    Purchase,
    Receipt,
    Subject,
    compile_campaign,
    creates_cycle,
    evaluate,
    explain,
    grants_for,
    limit_refusals,
    publication_conflicts,
    triggered_rules,
)


async def create_campaign(session: AsyncSession, draft: Campaign) -> Campaign:
    await store.add_campaign(session, draft, utcnow())
    return draft


async def get_campaign(session: AsyncSession, campaign_id: str) -> Campaign:
    campaign = await store.find_campaign(session, campaign_id)
    if campaign is None:
        raise NotFound("CAMPAIGN_NOT_FOUND", f"no campaign {campaign_id!r}")
    return campaign


async def campaign_usage(session: AsyncSession, campaign_id: str) -> CampaignUsage:
    """The campaign's statistics from committed receipts (returns are not taken off)."""
    usage = (await store.campaign_usage(session, [campaign_id])).get(campaign_id, CampaignUsage())
    return dataclasses.replace(usage, participants=await store.campaign_participants(session, campaign_id))


async def update_draft(
    session: AsyncSession, campaign_id: str, edit: Callable[[Campaign], Campaign], replaces_rules: bool
) -> Campaign:
    """Edits a draft in place with `edit` (which validates and may raise InvalidArgument).
    Published campaigns keep one version of their rules, immutable, so they are refused
    (CAMPAIGN_PUBLISHED; ended ones CAMPAIGN_ENDED) rather than edited under the receipts
    already evaluated against them."""
    campaign = await store.find_campaign(session, campaign_id, for_update=True)
    if campaign is None:
        raise NotFound("CAMPAIGN_NOT_FOUND", f"no campaign {campaign_id!r}")
    if campaign.status is CampaignStatus.ENDED:
        raise FailedPrecondition("CAMPAIGN_ENDED", "an ended campaign cannot be changed")
    if campaign.status is not CampaignStatus.DRAFT:
        raise FailedPrecondition(
            "CAMPAIGN_PUBLISHED", "a published campaign's rules are immutable: end it and create a new campaign"
        )
    await store.replace_draft(session, edit(campaign), replaces_rules)
    return await get_campaign(session, campaign_id)


@dataclass(frozen=True)
class CampaignPage:
    campaigns: list[Campaign]
    next_page_token: str


@dataclass(frozen=True)
class CampaignQuery:
    """A validated ListCampaigns request; `scope` is what its page tokens are bound to."""

    size: int
    after: Cursor | None
    statuses: frozenset[CampaignStatus]
    scheduled: bool
    trigger: CampaignTrigger | None
    name_contains: str
    scope: str


async def list_campaigns(session: AsyncSession, query: CampaignQuery) -> CampaignPage:
    """One page of campaigns newest first; a next_page_token when more may follow."""
    found = await store.list_campaigns(
        session,
        query.size + 1,
        query.after,
        query.statuses,
        query.scheduled,
        query.trigger,
        query.name_contains,
        utcnow(),
    )
    page = found[: query.size]
    token = ""
    if len(found) > query.size:
        last, created_at = page[-1]
        token = Cursor(query.scope, created_at, last.campaign_id).encode()
    return CampaignPage([campaign for campaign, _ in page], token)


async def publish_campaign(session: AsyncSession, campaign_id: str) -> Campaign:
    published, _ = await publish_checked(session, campaign_id, accept_conflicts=True)
    return published


MAX_CALENDAR_ENTRIES = 500


async def list_calendar(
    session: AsyncSession, start: datetime, end: datetime, channel: str, store_id: str
) -> list[Campaign]:
    """Campaigns of any status whose period meets [start, end), that may run in `channel` and
    `store_id` (empty: any), by start (open starts first) then id."""
    campaigns = await store.campaigns_with_status(session, tuple(CampaignStatus), starts_before=end, ends_after=start)
    return sorted(
        (
            campaign
            for campaign in campaigns
            if (not channel or not campaign.scope.channels or channel in campaign.scope.channels)
            and (not store_id or not campaign.scope.store_ids or store_id in campaign.scope.store_ids)
        ),
        key=lambda campaign: (campaign.start_at is not None, campaign.start_at or start, campaign.campaign_id),
    )


async def publish_checked(
    session: AsyncSession, campaign_id: str, accept_conflicts: bool
) -> tuple[Campaign, list[Conflict]]:
    """Publishes a draft after checking it against itself and the published campaigns; with
    conflicts it is refused (CAMPAIGN_CONFLICTS, each conflict in the error's metadata) unless
    `accept_conflicts`, when it is published and the conflicts are answered."""
    campaign = await store.find_campaign(session, campaign_id, for_update=True)
    if campaign is None:
        raise NotFound("CAMPAIGN_NOT_FOUND", f"no campaign {campaign_id!r}")
    if campaign.status is not CampaignStatus.DRAFT:
        raise FailedPrecondition("CAMPAIGN_ALREADY_PUBLISHED", "a published campaign cannot be published again")
    compile_campaign(campaign)
    others = await store.campaigns_with_status(session, (CampaignStatus.ACTIVE, CampaignStatus.PAUSED))
    conflicts = publication_conflicts(campaign, others)
    if conflicts and not accept_conflicts:
        raise FailedPrecondition(
            "CAMPAIGN_CONFLICTS",
            "; ".join(f"{c.kind.value} {c.subject_id}: {c.description}" for c in conflicts),
            {
                f"conflict_{index}": f"{c.kind.value}|{c.subject_id}|{c.other_campaign_id}"
                for index, c in enumerate(conflicts)
            },
        )
    await store.mark_published(session, campaign_id, campaign.version + 1, utcnow())
    await add_event(session, store.outbox, "campaign.published", key=campaign_id, payload={"campaign_id": campaign_id})
    return await get_campaign(session, campaign_id), conflicts


async def change_status(session: AsyncSession, campaign_id: str, change: str) -> Campaign:
    """Pauses, resumes or ends a published campaign (``STATUS_CHANGES``)."""
    campaign = await store.find_campaign(session, campaign_id, for_update=True)
    if campaign is None:
        raise NotFound("CAMPAIGN_NOT_FOUND", f"no campaign {campaign_id!r}")
    allowed, target = STATUS_CHANGES[change]
    if campaign.status not in allowed:
        raise FailedPrecondition(
            "CAMPAIGN_STATUS_CONFLICT", f"a {campaign.status.value} campaign cannot be changed by {change}"
        )
    await store.set_status(session, campaign_id, target, utcnow())
    await add_event(
        session, store.outbox, f"campaign.{target.value}", key=campaign_id, payload={"campaign_id": campaign_id}
    )
    return await get_campaign(session, campaign_id)


def new_id() -> str:
    return str(uuid.uuid4())


async def compiled_drafts(session: AsyncSession, campaign_ids: Sequence[str]) -> list[CompiledCampaign]:
    """Draft campaigns compiled as if they were published, for a simulation."""
    drafts = []
    for campaign_id in campaign_ids:
        campaign = await get_campaign(session, campaign_id)
        if campaign.status is not CampaignStatus.DRAFT:
            raise FailedPrecondition("CAMPAIGN_NOT_DRAFT", f"campaign {campaign_id!r} is published already")
        drafts.append(compile_campaign(dataclasses.replace(campaign, status=CampaignStatus.ACTIVE)))
    return drafts


@dataclass(frozen=True)
class Simulation:
    receipt: Receipt
    subject: Subject
    coupons: tuple[PresentedCoupon, ...]
    draft_campaign_ids: tuple[str, ...]
    drafts_only: bool


class LiveCampaigns:
    """Compiled campaigns, rebuilt only when a publication happened since the last build.

    A replica checks the newest publication time at most every ``refresh_seconds``,
    so a campaign published on another replica goes live here within that delay,
    and a receipt never recompiles a condition.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        refresh_seconds: float = 1.0,
        default_cap_basis_points: int = 0,
    ) -> None:
        self._sessions = sessions
        self._default_cap_basis_points = default_cap_basis_points
        self._refresh_seconds = refresh_seconds
        self._compiled: list[CompiledCampaign] = []
        self._built_from: datetime | None = None
        self._checked_at = float("-inf")
        self._usage: dict[str, CampaignUsage] = {}
        self._usage_read_at = float("-inf")

    async def mentions(self, word: str) -> bool:
        """Whether a condition of the live campaigns may read `word`."""
        return any(compiled.mentions(word) for compiled in await self.current())

    def live_count(self, moment: datetime) -> int:
        """How many of the compiled campaigns apply at `moment` (no database read)."""
        return sum(compiled.campaign.is_live_at(moment) for compiled in self._compiled)

    def invalidate(self) -> None:
        self._checked_at = float("-inf")

    async def current(self) -> list[CompiledCampaign]:
        if time.monotonic() - self._checked_at >= self._refresh_seconds:
            async with self._sessions() as session:
                latest = await store.last_publication(session)
                if latest != self._built_from:
                    campaigns = await store.active_campaigns(session)
                    self._compiled = [compile_campaign(campaign) for campaign in campaigns]
                    self._built_from = latest
            self._checked_at = time.monotonic()
        return self._compiled

    async def refusals(self, campaigns: Sequence[CompiledCampaign], member_id: str) -> dict[str, str]:
        """The campaigns to skip for a spent budget or a member's uses. What the campaigns have
        given is re-read at most every ``refresh_seconds``, and only for campaigns with a
        budget; a member's uses are read per receipt, only when a campaign limits them."""
        budgeted = [
            c.campaign.campaign_id
            for c in campaigns
            if c.campaign.limits.discount_budget_minor or c.campaign.limits.points_budget
        ]
        limited = [c.campaign.campaign_id for c in campaigns if c.campaign.limits.max_uses_per_member]
        if not budgeted and not (limited and member_id):
            return {}
        async with self._sessions() as session:
            if budgeted and time.monotonic() - self._usage_read_at >= self._refresh_seconds:
                self._usage = await store.campaign_usage(session, budgeted)
                self._usage_read_at = time.monotonic()
            uses = await store.member_uses(session, member_id, limited) if limited and member_id else {}
        return limit_refusals(campaigns, self._usage, uses)

    async def simulate(
        self,
        request: Simulation,
        drafts: list[CompiledCampaign],
        catalogue: Catalogue = NO_CATALOGUE,
        time_zone: tzinfo = UTC,
    ) -> tuple[Evaluation, list[Explanation]]:
        """Evaluates with the drafts (see ``compiled_drafts``) beside the live campaigns, or
        alone, and explains every rule."""
        campaigns = drafts + ([] if request.drafts_only else await self.current())
        evaluation = evaluate(
            request.receipt,
            request.subject,
            campaigns,
            request.coupons,
            catalogue,
            self._default_cap_basis_points,
            time_zone,
            await self.refusals(campaigns, request.subject.member_id),
        )
        return evaluation, explain(campaigns, evaluation, request.receipt.time)

    async def evaluate(
        self,
        receipt: Receipt,
        subject: Subject,
        coupons: Sequence[PresentedCoupon] = (),
        catalogue: Catalogue = NO_CATALOGUE,
        time_zone: tzinfo = UTC,
    ) -> Evaluation:
        campaigns = await self.current()
        refusals = await self.refusals(campaigns, subject.member_id)
        return evaluate(
            receipt, subject, campaigns, coupons, catalogue, self._default_cap_basis_points, time_zone, refusals
        )


async def put_category(session: AsyncSession, category: Category) -> Category:
    parents = await store.category_parents(session)
    if category.parent_id and category.parent_id not in parents:
        raise NotFound("CATEGORY_NOT_FOUND", f"no parent category {category.parent_id!r}")
    if creates_cycle(category.category_id, category.parent_id, parents):
        raise FailedPrecondition("CATEGORY_CYCLE", "a category cannot be put under itself or its descendant")
    await store.put_category(session, category)
    await store.bump_catalogue_version(session)
    return category


async def put_brand(session: AsyncSession, brand: Brand) -> Brand:
    await store.put_brand(session, brand)
    await store.bump_catalogue_version(session)
    return brand


async def put_product_list(session: AsyncSession, product_list: ProductList) -> ProductList:
    await store.put_product_list(session, product_list)
    await store.bump_catalogue_version(session)
    return product_list


async def import_products(session: AsyncSession, batches: AsyncIterator[list[ProductRecord]]) -> int:
    """Writes every batch in one transaction; a product naming an unknown category or brand
    refuses the whole import (``UNKNOWN_REFERENCE`` with the SKU)."""
    categories = set(await store.category_parents(session))
    brands = await store.brand_ids(session)
    imported = 0
    async for batch in batches:
        for product in batch:
            if product.category_id and product.category_id not in categories:
                raise FailedPrecondition(
                    "UNKNOWN_REFERENCE", f"product {product.sku!r}: no category {product.category_id!r}"
                )
            if product.brand_id and product.brand_id not in brands:
                raise FailedPrecondition("UNKNOWN_REFERENCE", f"product {product.sku!r}: no brand {product.brand_id!r}")
        await store.upsert_products(session, batch)
        imported += len(batch)
    await store.bump_catalogue_version(session)
    return imported


async def get_product(session: AsyncSession, sku: str) -> tuple[ProductRecord, Product]:
    record = await store.find_product(session, sku)
    if record is None:
        raise NotFound("PRODUCT_NOT_FOUND", f"no product {sku!r}")
    facts = await store.product_facts(session, [sku], await store.category_parents(session))
    return record, facts[sku]


async def put_store(session: AsyncSession, store_id: str, time_zone: str) -> None:
    await store.put_store(session, store_id, time_zone)
    await store.bump_catalogue_version(session)


class CatalogueCache:
    """What the rules know of each SKU, kept in process. A replica checks the catalogue's
    version at most every ``refresh_seconds`` and forgets everything when it moved, so a
    change made on any replica is seen within that delay. SKUs absent from the catalogue
    are remembered too, so an unknown SKU costs one query, not one per receipt."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], refresh_seconds: float = 1.0, max_skus: int = 200_000
    ) -> None:
        self._sessions = sessions
        self._refresh_seconds = refresh_seconds
        self._max_skus = max_skus
        self._known: dict[str, Product | None] = {}
        self._parents: dict[str, str] = {}
        self._time_zones: dict[str, ZoneInfo] = {}
        self._version = -1
        self._checked_at = float("-inf")

    def invalidate(self) -> None:
        self._checked_at = float("-inf")

    def time_zone(self, store_id: str) -> tzinfo:
        """The store's time zone as of the last lookup; UTC for a store without one."""
        return self._time_zones.get(store_id, UTC)

    async def lookup(self, skus: Sequence[str]) -> Catalogue:
        stale = time.monotonic() - self._checked_at >= self._refresh_seconds
        missing = [sku for sku in skus if sku not in self._known]
        if stale or missing:
            async with self._sessions() as session:
                if stale:
                    version = await store.catalogue_version(session)
                    if version != self._version:
                        self._known.clear()
                        self._parents = await store.category_parents(session)
                        zones = await store.store_time_zones(session)
                        self._time_zones = {store_id: ZoneInfo(zone) for store_id, zone in zones.items()}
                        self._version = version
                        missing = list(skus)
                    self._checked_at = time.monotonic()
                if missing:
                    if len(self._known) + len(missing) > self._max_skus:
                        self._known.clear()
                    found = await store.product_facts(session, missing, self._parents)
                    self._known.update({sku: found.get(sku) for sku in missing})
        return {sku: product for sku in skus if (product := self._known.get(sku)) is not None}


GATEWAY_CONSUMER = "rules.gateway"


async def handle_gateway_event(session: AsyncSession, event: Event) -> list[Grant]:
    """Counts a committed receipt or a return once (the inbox remembers the event), and answers
    the coupons and badges a committed receipt earned, on every delivery: they are handed out
    after this transaction, with keys derived from the event, so a delivery that failed to
    hand them out is simply repeated."""
    if await first_delivery(session, store.inbox, GATEWAY_CONSUMER, event.event_id):
        await record_gateway_event(session, event)
        if event.event_type == "cheque.committed":
            await count_promotions(session, event.payload)
            await count_counters(session, event.payload)
        elif event.event_type == "cheque.returned":
            await revert_counters(session, event.payload)
            await give_back_promotions(session, event.payload)
    member_id = str(event.payload.get("member_id") or "")
    if event.event_type != "cheque.committed" or not member_id:
        return []
    applied = _rule_promotions(event.payload)
    if not applied:
        return []
    rules = await store.rule_effects(session, [entry["rule_id"] for entry in applied])
    fired = [(str(entry["campaign_id"]), rules[entry["rule_id"]]) for entry in applied if entry["rule_id"] in rules]
    return grants_for(event.event_id, member_id, fired, (IssueCoupon, AwardBadge))


def _rule_promotions(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The applied_promotions of a cheque.committed payload given by rules (not coupons)."""
    entries = payload.get("applied_promotions")
    if not isinstance(entries, list):
        return []
    return [entry for entry in entries if entry.get("rule_id") and not entry.get("by_coupon")]


async def count_promotions(session: AsyncSession, payload: dict[str, Any]) -> None:
    """Adds a committed receipt to its campaigns' budgets and to the member's uses: one use
    per campaign per receipt, however many of its rules applied."""
    given: dict[str, tuple[int, int, int]] = {}
    entries = _rule_promotions(payload)
    member_id = str(payload.get("member_id") or "")
    # coupons are issued to members only (reward rules are skipped on anonymous receipts)
    rules = await store.rule_effects(session, [entry["rule_id"] for entry in entries]) if member_id else {}
    for entry in entries:
        discount, points, coupons = given.get(str(entry["campaign_id"]), (0, 0, 0))
        rule = rules.get(entry["rule_id"])
        given[str(entry["campaign_id"])] = (
            discount + int(entry.get("discount_minor") or 0),
            points + int(entry.get("points") or 0),
            coupons + (rule is not None and isinstance(rule.effect, IssueCoupon)),
        )
    paid = int(payload.get("paid_minor") or 0)
    for campaign_id, (discount, points, coupons) in sorted(given.items()):
        await store.count_usage(session, campaign_id, discount, points, coupons)
        if member_id:
            await store.count_member_use(session, campaign_id, member_id)
        await store.record_campaign_receipt(
            session, _receipt_key(payload), campaign_id, member_id, discount, points, paid
        )


async def give_back_promotions(session: AsyncSession, payload: dict[str, Any]) -> None:
    """Gives a return's share back to the budgets of the campaigns its receipt used: the
    returned part of what was paid, pro rata (rounded down, the rest once the whole receipt
    is returned), and the member's use and the receipt once it is wholly returned."""
    returned = await store.campaign_receipt_returned(
        session, _receipt_key(payload), int(payload.get("returned_minor") or 0), bool(payload.get("cancelled"))
    )
    for give_back in returned:
        await store.give_back_usage(session, give_back)


def _receipt_key(payload: dict[str, Any]) -> str:
    """A receipt as both cheque.committed and cheque.returned name it."""
    return f"{payload.get('partner_id') or ''}:{payload.get('terminal_id') or ''}:{payload.get('receipt_number') or ''}"


async def count_counters(session: AsyncSession, payload: dict[str, Any]) -> None:
    """Adds a committed receipt's IncrementCounter rules to its member's counters, and
    remembers what it added so that returning the whole receipt takes it back."""
    member_id = str(payload.get("member_id") or "")
    applied = _rule_promotions(payload)
    if not member_id or not applied:
        return
    rules = await store.rule_effects(session, [entry["rule_id"] for entry in applied])
    changes: dict[str, int] = {}
    for entry in applied:
        rule = rules.get(entry["rule_id"])
        if rule is not None and isinstance(rule.effect, IncrementCounter):
            changes[rule.effect.counter] = changes.get(rule.effect.counter, 0) + rule.effect.by
    paid = int(payload.get("paid_minor") or 0)
    if changes and await store.record_counter_receipt(session, _receipt_key(payload), member_id, changes, paid):
        await store.add_to_counters(session, member_id, changes)


async def revert_counters(session: AsyncSession, payload: dict[str, Any]) -> None:
    """Takes back what a receipt added to the counters once the whole receipt is returned:
    cancelled, or its returns together reach what was paid for it. A partial return keeps
    the increment (the purchase still happened)."""
    returned = await store.counter_receipt_returned(
        session, _receipt_key(payload), int(payload.get("returned_minor") or 0), bool(payload.get("cancelled"))
    )
    if returned is not None:
        member_id, changes = returned
        await store.add_to_counters(session, member_id, {counter: -by for counter, by in changes.items()})


async def member_counters(session: AsyncSession, member_id: str) -> dict[str, int]:
    return await store.member_counters(session, member_id)


def _typed_attributes(raw: Any) -> dict[str, AttributeValue]:
    """The member attributes of a members event that conditions can read (text, integers, flags)."""
    if not isinstance(raw, dict):
        return {}
    return {str(name): value for name, value in raw.items() if isinstance(value, str | int | bool)}


def _birth_date(raw: Any) -> date | None:
    try:
        return date.fromisoformat(str(raw)) if raw else None
    except ValueError:
        return None  # a members event is not ours to refuse; conditions read "unknown"


async def member_event_grants(live: LiveCampaigns, event: Event) -> list[Grant]:
    """What the live campaigns triggered by a members event give: registration and referral
    (registration_grants), a birthday, a first completed profile; other events give nothing."""
    if event.event_type == "member.registered":
        return await registration_grants(live, event)
    member_id = str(event.payload.get("member_id") or "")
    if not member_id:
        return []
    if event.event_type == "member.birthday":
        birthday = _birth_date(event.payload.get("date"))
        if birthday is None:
            return []
        subject = Subject(
            member_id=member_id, tier="", segments=(), birth_date=_birth_date(event.payload.get("birth_date"))
        )
        # keyed by the member and the year, not the event: a birthday rewards once a year
        # even if it were announced twice
        return _trigger_grants(
            await live.current(),
            CampaignTrigger.MEMBER_BIRTHDAY,
            subject,
            event,
            f"birthday:{member_id}:{birthday.year}",
        )
    if event.event_type == "member.profile_completed":
        subject = Subject(member_id=member_id, tier="", segments=())
        return _trigger_grants(
            await live.current(), CampaignTrigger.PROFILE_COMPLETED, subject, event, f"profile:{member_id}"
        )
    return []


def _trigger_grants(
    campaigns: Sequence[CompiledCampaign], trigger: CampaignTrigger, subject: Subject, event: Event, key: str
) -> list[Grant]:
    fired = triggered_rules(campaigns, trigger, subject, event.occurred_at)
    return grants_for(key, subject.member_id, [(campaign.campaign_id, rule) for campaign, rule in fired])


async def registration_grants(live: LiveCampaigns, event: Event) -> list[Grant]:
    """What the live registration-triggered campaigns give the member of a member.registered
    event, and, when a friend's referral code was used (`referrer_id`), what the live
    referral campaigns give that friend; the same keys on a redelivery, so nothing is handed
    out twice (a rule belongs to one campaign, so the keys of the two never meet)."""
    if event.event_type != "member.registered" or not event.payload.get("member_id"):
        return []
    member_id = str(event.payload["member_id"])
    campaigns = await live.current()
    subject = Subject(
        member_id=member_id,
        tier=str(event.payload.get("tier") or ""),
        segments=(),
        attributes=_typed_attributes(event.payload.get("attributes")),
        birth_date=_birth_date(event.payload.get("birth_date")),
    )
    grants = _trigger_grants(campaigns, CampaignTrigger.MEMBER_REGISTERED, subject, event, event.event_id)
    referrer_id = str(event.payload.get("referrer_id") or "")
    if referrer_id:
        referrer = Subject(member_id=referrer_id, tier="", segments=())
        grants += _trigger_grants(campaigns, CampaignTrigger.MEMBER_REFERRED, referrer, event, event.event_id)
    return grants


async def record_gateway_event(session: AsyncSession, event: Event) -> None:
    """Keeps a member's purchases for member.purchases from cheque.committed and
    cheque.returned; receipts without a member and other events are ignored."""
    payload = event.payload
    member_id = str(payload.get("member_id") or "")
    if event.event_type not in ("cheque.committed", "cheque.returned") or not member_id:
        return
    raw_time = payload.get("receipt_time")
    moment = datetime.fromisoformat(str(raw_time)) if raw_time else event.occurred_at
    if event.event_type == "cheque.committed":
        purchase = Purchase(moment, int(payload.get("paid_minor") or 0))
    else:
        purchase = Purchase(event.occurred_at, -int(payload.get("returned_minor") or 0), is_return=True)
    await store.record_purchase(session, event.event_id, member_id, purchase)


async def member_purchases(session: AsyncSession, member_id: str) -> tuple[Purchase, ...]:
    return await store.member_purchases(session, member_id)
