"""Every exception the supervisor package raises on purpose, in one place: the
tree runtime's, the configuration's, the planes' and the request-plane client's.
(The worker's own, engine and request errors, live in :mod:`actors.errors`.)"""

from __future__ import annotations

from typing import final


class SupervisorError(Exception):
    """Base of the runtime's own errors."""


@final
class ActorKilled(SupervisorError):
    """An actor was crashed on purpose (``kill(path)``, chaos route)."""


@final
class StartFailed(SupervisorError):
    """A child failed, or returned, before reporting ready."""


@final
class Escalation(SupervisorError):
    """A supervisor gave up (restart intensity exceeded, or a significant child
    ended) and hands the failure to its parent."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause

    def root_cause(self) -> BaseException | None:
        cause = self.cause
        while isinstance(cause, Escalation) and cause.cause is not None:
            cause = cause.cause
        return cause


@final
class ConfigError(SupervisorError):
    """Invalid command line, environment or config file. Exit status 2."""


@final
class ServerUnavailable(ConnectionError):
    """A plane's server (NATS, etcd) cannot be reached; the message names its address."""


@final
class DiscoveryBucketError(RuntimeError):
    """The NATS KV bucket exists with settings that cannot keep this registration."""


@final
class CallError(Exception):
    """A call on the request plane ended with an error: the worker's error frame, or a
    failure of the call itself (connection lost, silence, a broken stream).
    ``code`` is an :class:`actors.errors.ErrorCode` value."""

    def __init__(self, code: str, message: str, migratable: bool, request_id: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.migratable = migratable
        self.request_id = request_id
