"""structlog setup: one event per line, JSON when not a terminal.

Every line carries ``actor`` (the path of the actor that logged it, bound into
the task's context by the supervisor) and, inside a request, ``request_id``.
Standard-library loggers (vLLM's, hypercorn's) go through the same renderer.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

LogFormat = Literal["json", "console", "auto"]

LEVELS = ("debug", "info", "warning", "error", "critical")


def add_actor_default(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Lines logged outside any actor (start-up, exit) belong to the process."""
    event_dict.setdefault("actor", "process")
    return event_dict


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        add_actor_default,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def setup_logging(
    level: str = "info", fmt: LogFormat = "auto", stream: TextIO | None = None
) -> None:
    """Configure structlog and the stdlib root logger. Safe to call again."""
    stream = stream if stream is not None else sys.stderr
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    shared = _shared_processors()
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _one_line,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # vLLM configures its own handlers; route them through ours instead.
    for name in ("vllm", "hypercorn", "hypercorn.error", "hypercorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    logging.getLogger("hypercorn.access").setLevel(logging.WARNING)


def _one_line(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Keep multi-line messages (foreign tracebacks) on one line in console mode
    too; JSON escapes them anyway."""
    event = event_dict.get("event")
    if isinstance(event, str) and "\n" in event:
        event_dict["event"] = event.replace("\n", " | ")
    return event_dict


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
