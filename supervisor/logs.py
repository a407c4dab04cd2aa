"""structlog setup: one event per line, JSON when not a terminal.

Every line carries ``actor`` (the path of the actor that logged it, bound into
the task's context by the supervisor) and, inside a request, ``request_id``.
Standard-library loggers (vLLM's, hypercorn's) go through the same renderer.
"""

from __future__ import annotations

import atexit
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


class ForeignJsonFormatter(logging.Formatter):
    """JSON lines for stdlib loggers configured outside our process setup:
    vLLM's, in the worker and in its engine-core processes (vLLM applies the
    dictConfig at ``VLLM_LOGGING_CONFIG_PATH`` in every process it starts)."""

    def format(self, record: logging.LogRecord) -> str:
        import json
        import os

        main_pid = os.environ.get("LLM_SUPERVISOR_MAIN_PID")
        actor = "root/engine" if main_pid == str(os.getpid()) else "root/engine/core"
        data: dict[str, Any] = {
            "event": record.getMessage(),
            "actor": actor,
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": os.getpid(),
            "timestamp": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def route_vllm_logs(level: str = "info") -> None:
    """Make vLLM (here and in its child processes) log JSON lines through
    :class:`ForeignJsonFormatter`, unless the user configured vLLM's logging."""
    import json
    import os
    import tempfile
    import time

    logging.Formatter.converter = time.gmtime
    os.environ.setdefault("LLM_SUPERVISOR_MAIN_PID", str(os.getpid()))
    if os.environ.get("VLLM_LOGGING_CONFIG_PATH") or os.environ.get("VLLM_CONFIGURE_LOGGING") == "0":
        return
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "supervisor.logs.ForeignJsonFormatter"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
        },
        "loggers": {"vllm": {"handlers": ["stderr"], "level": level.upper(), "propagate": False}},
    }
    fd, path = tempfile.mkstemp(prefix="llm-supervisor-vllm-logging-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = path
    atexit.register(_unlink_quietly, path)


def _unlink_quietly(path: str) -> None:
    import contextlib
    import os

    with contextlib.suppress(OSError):
        os.unlink(path)
