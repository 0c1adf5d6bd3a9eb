"""NotificationsService over gRPC: proto in, use case, proto out."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.notifications.v1 import notifications_service_pb2 as pb
from loyalty.notifications.v1 import notifications_service_pb2_grpc as pb_grpc
from loyalty.runtime.errors import Violations
from loyalty.runtime.idempotency import IdempotentCalls
from loyalty.runtime.timeutil import timestamp_field, to_timestamp, utcnow
from services.notifications import service, store
from services.notifications.domain import Category, Channel, MassSendState, Message, MessageState, Template, Trigger

_CHANNEL = {
    Channel.EMAIL: pb.CHANNEL_EMAIL,
    Channel.SMS: pb.CHANNEL_SMS,
    Channel.PUSH: pb.CHANNEL_PUSH,
    Channel.VIBER: pb.CHANNEL_VIBER,
    Channel.TELEGRAM: pb.CHANNEL_TELEGRAM,
}
_CHANNEL_FROM_PROTO = {number: channel for channel, number in _CHANNEL.items()}
_CATEGORY = {Category.TRANSACTIONAL: pb.CATEGORY_TRANSACTIONAL, Category.MARKETING: pb.CATEGORY_MARKETING}
_CATEGORY_FROM_PROTO = {number: category for category, number in _CATEGORY.items()}
_MESSAGE_STATE = {
    MessageState.QUEUED: pb.MESSAGE_STATE_QUEUED,
    MessageState.SENT: pb.MESSAGE_STATE_SENT,
    MessageState.DELIVERED: pb.MESSAGE_STATE_DELIVERED,
    MessageState.FAILED: pb.MESSAGE_STATE_FAILED,
    MessageState.SUPPRESSED: pb.MESSAGE_STATE_SUPPRESSED,
    MessageState.DEAD: pb.MESSAGE_STATE_DEAD,
}
_MASS_SEND_STATE = {
    MassSendState.RUNNING: pb.MASS_SEND_STATE_RUNNING,
    MassSendState.PAUSED: pb.MASS_SEND_STATE_PAUSED,
    MassSendState.COMPLETED: pb.MASS_SEND_STATE_COMPLETED,
}

Context = grpc.aio.ServicerContext[Any, Any]
MAX_DETAIL_LENGTH = 200


def template_to_proto(template: Template) -> pb.Template:
    return pb.Template(
        event_type=template.event_type,
        channel=_CHANNEL[template.channel],
        locale=template.locale,
        subject=template.subject,
        body=template.body,
    )


def trigger_to_proto(trigger: Trigger) -> pb.Trigger:
    message = pb.Trigger(
        event_type=trigger.event_type,
        enabled=trigger.enabled,
        template_key=trigger.template_key,
        channels=[_CHANNEL[channel] for channel in trigger.channels],
        category=_CATEGORY[trigger.category],
    )
    message.delay.FromTimedelta(trigger.delay)
    return message


def message_to_proto(message: Message) -> pb.Message:
    queued = message.state is MessageState.QUEUED
    return pb.Message(
        message_id=message.message_id,
        member_id=message.member_id,
        event_type=message.event_type,
        event_id=message.event_id,
        channel=_CHANNEL[message.channel],
        subject=message.subject,
        body=message.body,
        state=_MESSAGE_STATE[message.state],
        create_time=to_timestamp(message.created_at),
        category=_CATEGORY[message.category],
        template_key=message.template_key,
        reason=message.reason,
        attempts=message.attempts,
        next_attempt_time=to_timestamp(message.next_attempt_at) if queued else None,
        sent_time=to_timestamp(message.sent_at),
        delivered_time=to_timestamp(message.delivered_at),
        mass_send_id=message.mass_send_id,
    )


def mass_send_to_proto(progress: service.MassSendProgress) -> pb.MassSend:
    mass_send, counts = progress.mass_send, progress.by_state
    return pb.MassSend(
        mass_send_id=mass_send.mass_send_id,
        template_key=mass_send.template_key,
        channels=[_CHANNEL[channel] for channel in mass_send.channels],
        state=_MASS_SEND_STATE[progress.state],
        recipients=mass_send.recipients,
        queued=counts.get(MessageState.QUEUED, 0),
        sent=counts.get(MessageState.SENT, 0),
        delivered=counts.get(MessageState.DELIVERED, 0),
        failed=counts.get(MessageState.FAILED, 0),
        suppressed=counts.get(MessageState.SUPPRESSED, 0),
        dead=counts.get(MessageState.DEAD, 0),
        create_time=to_timestamp(mass_send.created_at),
    )


def statistics_to_proto(rows: Iterable[store.StatisticsRow]) -> list[pb.DeliveryStatistic]:
    by_key: dict[tuple[str, Channel], pb.DeliveryStatistic] = {}
    for row in rows:
        entry = by_key.setdefault(
            (row.template_key, row.channel),
            pb.DeliveryStatistic(template_key=row.template_key, channel=_CHANNEL[row.channel]),
        )
        setattr(entry, row.state.value, getattr(entry, row.state.value) + row.count)
    return list(by_key.values())


def _channels(numbers: Iterable[pb.Channel.ValueType]) -> list[Channel | None]:
    return [_CHANNEL_FROM_PROTO.get(number) for number in numbers]


def _parse_template(given: pb.Template) -> Template:
    return service.parse_template(
        given.event_type, _CHANNEL_FROM_PROTO.get(given.channel), given.locale, given.subject, given.body
    )


def _parse_trigger(given: pb.Trigger) -> Trigger:
    return service.parse_trigger(
        given.event_type,
        given.enabled,
        given.template_key,
        _channels(given.channels),
        given.delay.ToTimedelta(),
        _CATEGORY_FROM_PROTO.get(given.category),
    )


class NotificationsApi(pb_grpc.NotificationsServiceServicer):
    def __init__(self, sessions: async_sessionmaker[AsyncSession], delivery: service.Delivery) -> None:
        self._sessions = sessions
        self._delivery = delivery
        self._idempotent = IdempotentCalls(sessions, store.idempotency_keys)

    async def UpsertTemplate(self, request: pb.UpsertTemplateRequest, context: Context) -> pb.UpsertTemplateResponse:
        template = _parse_template(request.template)

        async def work(session: AsyncSession) -> pb.UpsertTemplateResponse:
            stored = await service.upsert_template(session, template)
            return pb.UpsertTemplateResponse(template=template_to_proto(stored))

        return await self._idempotent.run("upsert_template", request, pb.UpsertTemplateResponse, work)

    async def PreviewTemplate(self, request: pb.PreviewTemplateRequest, context: Context) -> pb.PreviewTemplateResponse:
        template = _parse_template(request.template)
        async with self._sessions() as session:
            rendered = await service.preview(session, template, request.member_id, self._delivery)
        return pb.PreviewTemplateResponse(subject=rendered.subject, body=rendered.body)

    async def ListTriggers(self, request: pb.ListTriggersRequest, context: Context) -> pb.ListTriggersResponse:
        async with self._sessions() as session:
            triggers = await service.list_triggers(session)
        return pb.ListTriggersResponse(triggers=[trigger_to_proto(trigger) for trigger in triggers])

    async def UpdateTrigger(self, request: pb.UpdateTriggerRequest, context: Context) -> pb.UpdateTriggerResponse:
        trigger = _parse_trigger(request.trigger)

        async def work(session: AsyncSession) -> pb.UpdateTriggerResponse:
            stored = await service.update_trigger(session, trigger)
            return pb.UpdateTriggerResponse(trigger=trigger_to_proto(stored))

        return await self._idempotent.run("update_trigger", request, pb.UpdateTriggerResponse, work)

    async def ListMessages(self, request: pb.ListMessagesRequest, context: Context) -> pb.ListMessagesResponse:
        query = service.parse_messages_query(request.member_id, request.page_size, request.page_token)
        async with self._sessions() as session:
            page = await service.list_messages(session, query)
        return pb.ListMessagesResponse(
            messages=[message_to_proto(message) for message in page.messages],
            next_page_token=page.next_page_token,
        )

    async def CreateMassSend(self, request: pb.CreateMassSendRequest, context: Context) -> pb.CreateMassSendResponse:
        parsed = service.parse_mass_send(request.template_key, _channels(request.channels), request.member_ids)

        async def work(session: AsyncSession) -> pb.CreateMassSendResponse:
            created = await service.create_mass_send(session, parsed, utcnow())
            progress = await service.get_mass_send(session, created.mass_send_id)
            return pb.CreateMassSendResponse(mass_send=mass_send_to_proto(progress))

        return await self._idempotent.run("create_mass_send", request, pb.CreateMassSendResponse, work)

    async def GetMassSend(self, request: pb.GetMassSendRequest, context: Context) -> pb.GetMassSendResponse:
        async with self._sessions() as session:
            progress = await service.get_mass_send(session, request.mass_send_id)
        return pb.GetMassSendResponse(mass_send=mass_send_to_proto(progress))

    async def PauseMassSend(self, request: pb.PauseMassSendRequest, context: Context) -> pb.PauseMassSendResponse:
        async def work(session: AsyncSession) -> pb.PauseMassSendResponse:
            progress = await service.set_mass_send_paused(session, request.mass_send_id, paused=True)
            return pb.PauseMassSendResponse(mass_send=mass_send_to_proto(progress))

        return await self._idempotent.run("pause_mass_send", request, pb.PauseMassSendResponse, work)

    async def ResumeMassSend(self, request: pb.ResumeMassSendRequest, context: Context) -> pb.ResumeMassSendResponse:
        async def work(session: AsyncSession) -> pb.ResumeMassSendResponse:
            progress = await service.set_mass_send_paused(session, request.mass_send_id, paused=False)
            return pb.ResumeMassSendResponse(mass_send=mass_send_to_proto(progress))

        return await self._idempotent.run("resume_mass_send", request, pb.ResumeMassSendResponse, work)

    async def ReportDelivery(self, request: pb.ReportDeliveryRequest, context: Context) -> pb.ReportDeliveryResponse:
        violations = Violations()
        violations.check(bool(request.message_id), "message_id", "required")
        violations.check_length(request.detail, "detail", MAX_DETAIL_LENGTH)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.ReportDeliveryResponse:
            reported = await service.report_delivery(session, request.message_id, request.delivered, request.detail)
            return pb.ReportDeliveryResponse(message=message_to_proto(reported))

        return await self._idempotent.run("report_delivery", request, pb.ReportDeliveryResponse, work)

    async def GetDeliveryStatistics(
        self, request: pb.GetDeliveryStatisticsRequest, context: Context
    ) -> pb.GetDeliveryStatisticsResponse:
        violations = Violations()
        since = timestamp_field(request, "start_time", violations)
        until = timestamp_field(request, "end_time", violations)
        violations.raise_if_any()
        async with self._sessions() as session:
            rows = await service.statistics(session, since, until)
        return pb.GetDeliveryStatisticsResponse(statistics=statistics_to_proto(rows))
