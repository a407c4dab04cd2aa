"""The worker process: a generic supervisor tree on trio, plus the CLI, config,
signals, logs and planes that make it an LLM inference worker."""

from .errors import ActorKilled, ConfigError, EngineDead, Escalation, StartFailed, SupervisorError
from .tree import ActorContext, ActorRegistry, Backoff, ChildSpec, Restart, Strategy, Supervisor

__all__ = [
    "ActorContext",
    "ActorKilled",
    "ActorRegistry",
    "Backoff",
    "ChildSpec",
    "ConfigError",
    "EngineDead",
    "Escalation",
    "Restart",
    "StartFailed",
    "Strategy",
    "Supervisor",
    "SupervisorError",
]
