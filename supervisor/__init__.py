"""The worker process: a generic supervisor tree on trio, plus the CLI, config,
signals, logs and planes that make it an LLM inference worker."""

from .errors import ActorKilled, ConfigError, Escalation, StartFailed, SupervisorError
from .tree import ActorContext, ActorRegistry, Backoff, ChildSpec, Restart, Strategy, Supervisor

__all__ = [
    "ActorContext",
    "ActorKilled",
    "ActorRegistry",
    "Backoff",
    "ChildSpec",
    "ConfigError",
    "Escalation",
    "Restart",
    "StartFailed",
    "Strategy",
    "Supervisor",
    "SupervisorError",
]
