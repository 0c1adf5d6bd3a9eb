"""NotificationsService over gRPC: proto in, use case, proto out."""

from __future__ import annotations

from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.notifications.v1 import notifications_service_pb2 as pb
from loyalty.notifications.v1 import notifications_service_pb2_grpc as pb_grpc
from loyalty.runtime.timeutil import to_timestamp
from services.notifications import service
from services.notifications.domain import Channel, Message, MessageState, Template

_CHANNEL = {Channel.EMAIL: pb.CHANNEL_EMAIL, Channel.SMS: pb.CHANNEL_SMS, Channel.PUSH: pb.CHANNEL_PUSH}
_CHANNEL_FROM_PROTO = {number: channel for channel, number in _CHANNEL.items()}
_MESSAGE_STATE = {
    MessageState.QUEUED: pb.MESSAGE_STATE_QUEUED,
    MessageState.SENT: pb.MESSAGE_STATE_SENT,
    MessageState.SUPPRESSED: pb.MESSAGE_STATE_SUPPRESSED,
}

Context = grpc.aio.ServicerContext[Any, Any]


def template_to_proto(template: Template) -> pb.Template:
    return pb.Template(
        event_type=template.event_type,
        channel=_CHANNEL[template.channel],
        locale=template.locale,
        subject=template.subject,
        body=template.body,
    )


def message_to_proto(message: Message) -> pb.Message:
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
    )


class NotificationsApi(pb_grpc.NotificationsServiceServicer):
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def UpsertTemplate(self, request: pb.UpsertTemplateRequest, context: Context) -> pb.UpsertTemplateResponse:
        given = request.template
        template = service.parse_template(
            given.event_type, _CHANNEL_FROM_PROTO.get(given.channel), given.locale, given.subject, given.body
        )
        async with self._sessions() as session, session.begin():
            stored = await service.upsert_template(session, template)
        return pb.UpsertTemplateResponse(template=template_to_proto(stored))

    async def ListMessages(self, request: pb.ListMessagesRequest, context: Context) -> pb.ListMessagesResponse:
        query = service.parse_messages_query(request.member_id, request.page_size, request.page_token)
        async with self._sessions() as session:
            page = await service.list_messages(session, query)
        return pb.ListMessagesResponse(
            messages=[message_to_proto(message) for message in page.messages],
            next_page_token=page.next_page_token,
        )
