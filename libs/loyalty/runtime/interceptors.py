"""The server interceptor every service runs: request metrics and the error contract."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from loyalty.runtime.errors import DomainError, internal_status, to_grpc_status
from loyalty.runtime.telemetry import ServerMetrics

log = logging.getLogger(__name__)

# grpc's type stubs describe the aio context poorly (no abort_with_status), so the
# wrapped behaviour sees it as Any.
UnaryBehavior = Callable[[Any, Any], Awaitable[Any]]
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    InterceptorBase = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    InterceptorBase = grpc.aio.ServerInterceptor


def _split_method(full_method: str) -> tuple[str, str]:
    _, service, method = full_method.split("/", 2)
    return service, method


class ServerInterceptor(InterceptorBase):
    """Counts and times every unary and client-streaming call and maps domain errors to
    rich statuses.

    A ``DomainError`` becomes its status with ``ErrorInfo``/``BadRequest``; any
    other exception is logged here and answered as a bare INTERNAL.
    """

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = _split_method(handler_call_details.method)
        # A client-streaming call answers once, like a unary one: the same wrapper applies.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(service, method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap(service, method, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap(self, service: str, method: str, inner: UnaryBehavior) -> UnaryBehavior:
        metrics = self._metrics

        async def behavior(request: Any, context: Any) -> Any:
            code = grpc.StatusCode.OK
            in_flight = metrics.in_flight.labels(service, method)
            in_flight.inc()
            started = time.perf_counter()
            try:
                return await inner(request, context)
            except DomainError as error:
                code = error.code
                # The reason, never the message: messages may quote what the client sent.
                log.info("%s/%s answered %s %s", service, method, code.name, error.reason)
                await context.abort_with_status(to_grpc_status(error))
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error in %s/%s", service, method)
                await context.abort_with_status(internal_status())
            finally:
                in_flight.dec()
                metrics.latency.labels(service, method).observe(time.perf_counter() - started)
                metrics.requests.labels(service, method, code.name).inc()

        return behavior
