"""The one request pipeline: what happens to every request, whatever carried it.

The TCP and NATS request planes, the OpenAI HTTP front, the health canary and
the frontend all run a request the same way::

    outcome = await pipeline.run(endpoint, request_id, work, control=control)

and then only render ``outcome`` in their own terms (an end or error frame, an
HTTP status with an OpenAI error body). The pipeline owns, once:

- admission: refused while the worker shuts down, or while a gate says no
  (asleep), with a migratable error;
- the in-flight table: every admitted request has a unique key there (also its
  id in the engine), even when two clients send the same request id, so drain
  and abort see every request;
- the ``request.*`` log events and the per-endpoint request metrics;
- cancellation: ``control.cancel(reason)`` from anywhere (a client's cancel, a
  disconnect, the shutdown's abort) cancels the work at whatever it awaits; the
  engine handle then aborts the request in the engine;
- the map from whatever failed to one :class:`~actors.errors.RequestError`.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog
import trio

from supervisor.signals import Lifecycle

from .errors import ErrorCode, RequestError, as_request_error

__all__ = [
    "AbortReason",
    "Gate",
    "Inflight",
    "Outcome",
    "RequestControl",
    "RequestObserver",
    "RequestPipeline",
    "Status",
    "Ticket",
]

_log = structlog.get_logger("actors.pipeline")


class AbortReason(enum.StrEnum):
    """Why a running request was cancelled; each tells the client something else."""

    CLIENT_CANCELLED = "client cancelled"  # told: cancelled (not migratable)
    CLIENT_DISCONNECTED = "client disconnected"  # told nothing: nobody listens
    SHUTDOWN = "aborted by shutdown"  # told: shutting_down (migratable)
    ENGINE_ASLEEP = "engine put to sleep"  # told: unavailable (migratable)


class Status(enum.StrEnum):
    """How a request ended, in logs and metrics."""

    OK = "ok"
    ERROR = "error"
    ABORTED = "aborted"


@dataclass
class RequestControl:
    """One running request's cancel scope, and why it was cancelled."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    reason: AbortReason | None = None

    def cancel(self, reason: AbortReason) -> None:
        if self.reason is None:
            self.reason = reason
        self.scope.cancel(reason=str(reason))


@dataclass(eq=False)
class Ticket:
    """An admitted request."""

    key: str  # unique among the requests in flight; the request's id in the engine
    request_id: str  # the client's id (logs)
    endpoint: str
    control: RequestControl
    generates: bool = True


@dataclass
class Outcome:
    """How a request ended. ``error`` is what to tell the client: None when it
    ended well, or when nobody is left to tell (a disconnect)."""

    status: Status
    error: RequestError | None = None
    reason: AbortReason | None = None


class Inflight:
    """The in-flight request table. Owned above the actors that serve requests, so
    it survives their restarts; the drain waits on it, the abort walks it."""

    def __init__(self) -> None:
        self.requests: dict[str, Ticket] = {}
        self.last_activity: float | None = None  # trio clock; for the health canary
        self._changed = trio.Event()
        self._serial = itertools.count(1)

    def admit(self, request_id: str, endpoint: str, control: RequestControl, *, generates: bool = True) -> Ticket:
        key = request_id
        while key in self.requests:  # another client's request with the same id is running
            key = f"{request_id}~{next(self._serial)}"
        ticket = Ticket(key, request_id, endpoint, control, generates)
        self.requests[key] = ticket
        self.last_activity = trio.current_time()
        return ticket

    def remove(self, ticket: Ticket) -> None:
        if self.requests.get(ticket.key) is ticket:
            del self.requests[ticket.key]
        self.last_activity = trio.current_time()
        self._changed.set()
        self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self.requests)

    def idle_for(self) -> float:
        now = trio.current_time()
        if self.last_activity is None:
            self.last_activity = now
        return 0.0 if self.requests else now - self.last_activity

    def touch(self) -> None:
        self.last_activity = trio.current_time()

    async def wait_empty(self) -> None:
        while self.requests:
            await self._changed.wait()

    def cancel_all(self, reason: AbortReason, *, generating_only: bool = False) -> int:
        tickets = [t for t in self.requests.values() if t.generates or not generating_only]
        for ticket in tickets:
            ticket.control.cancel(reason)
        return len(tickets)


class RequestObserver(Protocol):
    """Told when a request starts and how it ended (metrics). Owned above the
    actors, so restarts never reset what it counted."""

    def started(self, endpoint: str) -> None: ...

    def finished(self, endpoint: str, status: Status, seconds: float, code: str | None = None) -> None: ...


# (endpoint, generates) -> a refusal, or None to admit
Gate = Callable[[str, bool], RequestError | None]
Work = Callable[[Ticket], Awaitable[None]]


class RequestPipeline:
    def __init__(self, lifecycle: Lifecycle, inflight: Inflight, observer: RequestObserver | None = None) -> None:
        self.lifecycle = lifecycle
        self.inflight = inflight
        self.observer = observer
        self.gates: list[Gate] = []
        lifecycle.on_drain("requests", self._drain)
        lifecycle.on_abort("requests", self._abort_all)

    # -- shutdown: let what runs finish within the grace period, then abort the rest (migratable)
    async def _drain(self, deadline: float) -> None:
        if self.inflight.requests:
            _log.info("requests.draining", inflight=len(self.inflight))
        await self.inflight.wait_empty()

    async def _abort_all(self) -> None:
        aborted = self.inflight.cancel_all(AbortReason.SHUTDOWN)
        if aborted:
            _log.warning("requests.aborting", inflight=aborted)
        with trio.move_on_after(2.0):
            await self.inflight.wait_empty()

    def admission(self, endpoint: str, generates: bool) -> RequestError | None:
        if not self.lifecycle.accepting:
            return RequestError(ErrorCode.SHUTTING_DOWN, "worker is shutting down; retry on another instance")
        for gate in self.gates:
            refusal = gate(endpoint, generates)
            if refusal is not None:
                return refusal
        return None

    async def run(self, endpoint: str, request_id: str, work: Work, *, control: RequestControl | None = None,
                  generates: bool = True) -> Outcome:
        """Admit the request, run ``work(ticket)`` under its control, and say how it ended.
        Never raises for the request's own failures (only if the caller itself is cancelled)."""
        structlog.contextvars.bind_contextvars(request_id=request_id)
        control = control or RequestControl()
        refusal = self.admission(endpoint, generates)
        if refusal is not None:
            _log.info("request.refused", endpoint=endpoint, code=refusal.code.value, error=refusal.message)
            if self.observer is not None:
                self.observer.started(endpoint)
                self.observer.finished(endpoint, Status.ERROR, 0.0, refusal.code.value)
            return Outcome(Status.ERROR, refusal)
        ticket = self.inflight.admit(request_id, endpoint, control, generates=generates)
        started = time.monotonic()
        if self.observer is not None:
            self.observer.started(endpoint)
        _log.info("request.started", endpoint=endpoint, **({"engine_id": ticket.key} if ticket.key != request_id
                                                            else {}))
        outcome = Outcome(Status.ABORTED, reason=None)  # unless it gets to its end: cancelled from outside
        try:
            error: RequestError | None = None
            with control.scope:
                try:
                    await work(ticket)
                except Exception as exc:
                    error = as_request_error(exc)
                    if error.code is ErrorCode.INTERNAL:
                        _log.exception("request.failed", endpoint=endpoint)
            if control.scope.cancelled_caught:
                reason = control.reason or AbortReason.CLIENT_DISCONNECTED
                _log.info("request.aborted", reason=str(reason), message=f"Aborted Request ID: {ticket.key}")
                outcome = Outcome(Status.ABORTED, _told_on_abort(reason), reason)
            elif error is not None:
                outcome = Outcome(Status.ERROR, error)
            else:
                outcome = Outcome(Status.OK)
            return outcome
        finally:
            self.inflight.remove(ticket)
            seconds = time.monotonic() - started
            code = outcome.error.code.value if outcome.error is not None else None
            if self.observer is not None:
                self.observer.finished(endpoint, outcome.status, seconds, code)
            _log.info("request.finished", endpoint=endpoint, status=outcome.status.value, code=code,
                      reason=str(outcome.reason) if outcome.reason else None, duration_s=round(seconds, 4))


def _told_on_abort(reason: AbortReason) -> RequestError | None:
    if reason is AbortReason.CLIENT_DISCONNECTED:
        return None
    if reason is AbortReason.CLIENT_CANCELLED:
        return RequestError(ErrorCode.CANCELLED, "request cancelled by the client")
    if reason is AbortReason.ENGINE_ASLEEP:
        return RequestError(ErrorCode.UNAVAILABLE, "the engine was put to sleep; retry on another instance")
    return RequestError(ErrorCode.SHUTTING_DOWN, f"request {reason}; retry on another instance")
