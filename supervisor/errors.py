"""Every exception the supervisor runtime raises on purpose, in one place."""

from __future__ import annotations


class SupervisorError(Exception):
    """Base of the runtime's own errors."""


class ActorKilled(SupervisorError):
    """An actor was crashed on purpose (``kill(path)``, chaos route)."""


class StartFailed(SupervisorError):
    """A child failed, or returned, before reporting ready."""


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


class ConfigError(SupervisorError):
    """Invalid command line, environment or config file. Exit status 2."""


class EngineDead(SupervisorError):
    """The engine is gone (vLLM's EngineDeadError, its process killed, or it
    stopped answering health checks). Fatal for the worker: exit status 1."""


class EngineUnhealthy(EngineDead):
    """The health monitor declared the engine dead."""
