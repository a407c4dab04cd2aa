"""Every exception the worker's actors raise on purpose, and the one map from a
failure to the error a client sees.

A request that fails ends with a :class:`RequestError`: an :class:`ErrorCode`
(what went wrong, as a word a program can act on), a message for a person, and
whether a router may retry it elsewhere (``migratable``). Each transport renders
it its own way (an error frame, a NATS reply, an HTTP status with an OpenAI
error body) but decides nothing: :func:`as_request_error` is the only place a
foreign failure (engine death, an engine refusal, a bug) becomes a code.
"""

from __future__ import annotations

import enum
from http import HTTPStatus
from typing import final

from supervisor.errors import SupervisorError

__all__ = [
    "BadBatch",
    "EngineDead",
    "EngineUnhealthy",
    "ErrorCode",
    "FrameError",
    "ModelSourceMissing",
    "RequestError",
    "RequestFailed",
    "as_request_error",
]


class ErrorCode(enum.StrEnum):
    """Why a request ended with an error. The value is what goes on the wire."""

    INVALID_REQUEST = "invalid_request"  # the client's input is wrong: fix it, do not retry
    INVALID_FRAME = "invalid_frame"  # the bytes on the request plane are not a frame
    NOT_FOUND = "not_found"  # unknown endpoint, model or LoRA adapter
    PAYLOAD_TOO_LARGE = "payload_too_large"  # a request body or frame over its size limit
    RESOURCE_EXHAUSTED = "resource_exhausted"  # a limit was reached (LoRA slots)
    CANCELLED = "cancelled"  # the client cancelled it
    SHUTTING_DOWN = "shutting_down"  # the worker is draining or stopping: retry elsewhere
    UNAVAILABLE = "unavailable"  # the worker cannot serve it now (asleep, busy): retry elsewhere
    ENGINE_DEAD = "engine_dead"  # the engine died under it: retry elsewhere
    DISCONNECTED = "disconnected"  # the connection to the worker broke mid-request
    TIMEOUT = "timeout"  # nothing heard within a bound
    STREAM_BROKEN = "stream_broken"  # a stream arrived with a gap or an end that does not add up
    INTERNAL = "internal"  # a bug: the log has the traceback

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]

    @property
    def migratable(self) -> bool:
        """Whether a request that ended this way may be resent to another worker."""
        return self in _MIGRATABLE


_HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: HTTPStatus.BAD_REQUEST,
    ErrorCode.INVALID_FRAME: HTTPStatus.BAD_REQUEST,
    ErrorCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    ErrorCode.PAYLOAD_TOO_LARGE: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    ErrorCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    ErrorCode.CANCELLED: 499,  # client closed request (nginx's convention)
    ErrorCode.SHUTTING_DOWN: HTTPStatus.SERVICE_UNAVAILABLE,
    ErrorCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    ErrorCode.ENGINE_DEAD: HTTPStatus.SERVICE_UNAVAILABLE,
    ErrorCode.DISCONNECTED: HTTPStatus.BAD_GATEWAY,
    ErrorCode.TIMEOUT: HTTPStatus.GATEWAY_TIMEOUT,
    ErrorCode.STREAM_BROKEN: HTTPStatus.BAD_GATEWAY,
    ErrorCode.INTERNAL: HTTPStatus.INTERNAL_SERVER_ERROR,
}
_MIGRATABLE = frozenset({ErrorCode.SHUTTING_DOWN, ErrorCode.UNAVAILABLE, ErrorCode.ENGINE_DEAD,
                         ErrorCode.DISCONNECTED, ErrorCode.TIMEOUT, ErrorCode.STREAM_BROKEN})


@final
class RequestError(Exception):
    """Ends one request with a structured error; the worker carries on.

    ``migratable`` defaults to what the code implies (:attr:`ErrorCode.migratable`).
    """

    def __init__(self, code: ErrorCode | str, message: str, *, migratable: bool | None = None,
                 param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.migratable = self.code.migratable if migratable is None else migratable
        self.param = param  # the request field at fault, when one is (OpenAI's error.param)
        self.retry_after = retry_after  # seconds after which a retry may succeed (HTTP Retry-After)

    def __repr__(self) -> str:
        return f"RequestError({self.code.value!r}, {self.message!r}, migratable={self.migratable})"


def invalid(message: str, param: str | None = None) -> RequestError:
    return RequestError(ErrorCode.INVALID_REQUEST, message, param=param)


class EngineDead(SupervisorError):
    """The engine is gone (vLLM's EngineDeadError, its process killed, or it
    stopped answering health checks). Fatal for the worker: exit status 1."""


@final
class EngineUnhealthy(EngineDead):
    """The health monitor declared the engine dead."""


@final
class RequestFailed(Exception):
    """The engine refused or failed one request; the engine itself is fine."""


@final
class FrameError(Exception):
    """A request-plane frame that cannot be decoded or encoded: bad length, not
    msgpack, wrong shape, too large."""


@final
class BadBatch(ValueError):
    """A KV event batch from vLLM that does not have the documented shape."""


@final
class ModelSourceMissing(RuntimeError):
    """A model cannot be built: the package or file it comes from is not installed."""


def as_request_error(exc: BaseException) -> RequestError:
    """The one map from a failure inside a request to what its client is told."""
    while isinstance(exc, BaseExceptionGroup):  # raised inside a nursery: its first real failure
        exc = next((e for e in exc.exceptions if not _is_cancelled(e)), exc.exceptions[0])
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, EngineDead):
        return RequestError(ErrorCode.ENGINE_DEAD, str(exc) or "the engine died")
    if isinstance(exc, RequestFailed):
        # vLLM refused the request (a ValueError in its input processing, mostly): vllm serve says 400
        return RequestError(ErrorCode.INVALID_REQUEST, str(exc))
    if isinstance(exc, FrameError):
        return RequestError(ErrorCode.INVALID_FRAME, str(exc))
    return RequestError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def _is_cancelled(exc: BaseException) -> bool:
    import trio

    return isinstance(exc, trio.Cancelled)
