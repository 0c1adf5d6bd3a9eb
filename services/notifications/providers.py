"""Channel providers: the one interface every channel is sent through, and its adapters.

E-mail goes to an SMTP server (aiosmtplib); SMS, push, Viber and Telegram are POSTed to
an HTTP provider (httpx). Each adapter turns the provider's answer into an ``Outcome``:
a refusal of this recipient moves the message to the next channel of its cascade, a
failure of the provider itself is worth a retry. Tokens and URLs are secrets: they are
never logged, and an error is described without them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any, Protocol

import aiosmtplib
import httpx

from loyalty.runtime.settings import HttpProviderConfig, Settings
from services.notifications.domain import Channel, Outcome


@dataclass(frozen=True)
class Envelope:
    """One attempt to send one message: who to, what, and a key the provider may dedupe by."""

    message_id: str
    attempt: int
    address: str
    subject: str
    body: str


@dataclass(frozen=True)
class SendResult:
    outcome: Outcome
    detail: str = ""


class Provider(Protocol):
    async def send(self, envelope: Envelope) -> SendResult: ...


class SmtpProvider:
    """E-mail through an SMTP server; an accepted message counts as sent, not delivered."""

    def __init__(self, settings: Settings) -> None:
        config = settings.messaging
        password = settings.provider_tokens.get("email")
        self._host, self._port = config.smtp_host, config.smtp_port
        self._username = config.smtp_username or None
        self._password = password.get_secret_value() if password else None
        self._starttls = config.smtp_starttls
        self._timeout = config.smtp_timeout_seconds
        self._sender = config.email_from

    async def send(self, envelope: Envelope) -> SendResult:
        email = EmailMessage()
        email["From"] = self._sender
        email["To"] = envelope.address
        email["Subject"] = envelope.subject
        # One Message-ID per message, so a mail server can spot a retried attempt.
        email["Message-ID"] = make_msgid(idstring=envelope.message_id)
        email.set_content(envelope.body, subtype="html")
        try:
            await aiosmtplib.send(
                email,
                hostname=self._host,
                port=self._port,
                username=self._username,
                password=self._password,
                start_tls=self._starttls,
                timeout=self._timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused as error:
            return SendResult(Outcome.UNDELIVERED, f"recipient refused: {_smtp_codes(error)}")
        except aiosmtplib.SMTPResponseException as error:
            outcome = Outcome.UNDELIVERED if 500 <= error.code < 600 else Outcome.TRANSIENT
            return SendResult(outcome, f"SMTP {error.code}")
        except (aiosmtplib.SMTPException, OSError) as error:
            return SendResult(Outcome.TRANSIENT, type(error).__name__)
        return SendResult(Outcome.ACCEPTED)


def _smtp_codes(error: aiosmtplib.SMTPRecipientsRefused) -> str:
    return ",".join(str(refusal.code) for refusal in error.recipients)


class HttpProvider:
    """A provider reached by an HTTP POST.

    ``json`` payloads are ``{"to", "subject", "text", "message_id"}`` with the token as a
    bearer token; the provider answers 2xx with an optional ``{"status": "delivered" |
    "undelivered" | "accepted"}``. ``telegram`` payloads are the Bot API's sendMessage
    (``{"chat_id", "text"}``, the token in the URL) and its ``{"ok": ...}`` answer.
    """

    def __init__(self, config: HttpProviderConfig, token: str, client: httpx.AsyncClient) -> None:
        assert config.url is not None
        self._format = config.payload_format
        self._url = config.url.get_secret_value().replace("{token}", token)
        self._headers = {"Authorization": f"Bearer {token}"} if token and self._format == "json" else {}
        self._timeout = config.timeout_seconds
        self._client = client

    async def send(self, envelope: Envelope) -> SendResult:
        payload: dict[str, Any]
        if self._format == "telegram":
            payload = {"chat_id": envelope.address, "text": envelope.body}
        else:
            payload = {
                "to": envelope.address,
                "subject": envelope.subject,
                "text": envelope.body,
                "message_id": envelope.message_id,
            }
        headers = {**self._headers, "Idempotency-Key": f"{envelope.message_id}:{envelope.attempt}"}
        try:
            response = await self._client.post(self._url, json=payload, headers=headers, timeout=self._timeout)
        except httpx.HTTPError as error:
            # The error's text may quote the URL, and with it a token: name the kind only.
            return SendResult(Outcome.TRANSIENT, type(error).__name__)
        return self._read(response)

    def _read(self, response: httpx.Response) -> SendResult:
        status = response.status_code
        if status == 429 or status >= 500:
            return SendResult(Outcome.TRANSIENT, f"HTTP {status}")
        try:
            answer = response.json() if response.content else {}
        except ValueError:
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        if self._format == "telegram":
            if status < 300 and answer.get("ok") is True:
                return SendResult(Outcome.DELIVERED)
            return SendResult(Outcome.UNDELIVERED, f"HTTP {status}: {str(answer.get('description', ''))[:200]}")
        if status >= 300:
            return SendResult(Outcome.UNDELIVERED, f"HTTP {status}")
        reported = answer.get("status")
        if reported == "delivered":
            return SendResult(Outcome.DELIVERED)
        if reported in ("undelivered", "failed", "rejected"):
            return SendResult(Outcome.UNDELIVERED, f"provider: {reported}")
        return SendResult(Outcome.ACCEPTED)


def configured_channels(settings: Settings) -> frozenset[Channel]:
    """The channels with a provider in settings; the others are off."""
    config = settings.messaging
    channels = {
        channel for channel, http in _http_configs(settings).items() if http.url and http.url.get_secret_value()
    }
    return frozenset(channels | ({Channel.EMAIL} if config.smtp_host else set()))


def _http_configs(settings: Settings) -> dict[Channel, HttpProviderConfig]:
    config = settings.messaging
    return {
        Channel.SMS: config.sms,
        Channel.PUSH: config.push,
        Channel.VIBER: config.viber,
        Channel.TELEGRAM: config.telegram,
    }


@asynccontextmanager
async def open_providers(settings: Settings) -> AsyncIterator[dict[Channel, Provider]]:
    """The configured providers, by channel, sharing one HTTP connection pool while open."""
    configured = configured_channels(settings)
    # httpx logs every request's URL at INFO, and a Telegram URL holds the bot's token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    async with httpx.AsyncClient() as client:
        providers: dict[Channel, Provider] = {}
        for channel, http in _http_configs(settings).items():
            if channel in configured:
                token = settings.provider_tokens.get(channel.value)
                providers[channel] = HttpProvider(http, token.get_secret_value() if token else "", client)
        if Channel.EMAIL in configured:
            providers[Channel.EMAIL] = SmtpProvider(settings)
        yield providers
