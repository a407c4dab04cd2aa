"""structlog setup: one event per line, JSON when not a terminal.

Every line carries ``actor`` (the path of the actor that logged it, bound into
the task's context by the supervisor) and, inside a request, ``request_id``.
Standard-library loggers (vLLM's, hypercorn's) and Python warnings go through the
same renderer.

Whatever else reaches stdout or stderr (a library's ``print``, a native library
writing straight to file descriptor 2, tqdm progress bars) is captured too
(:class:`OutputCapture`): the worker's descriptors 1 and 2 are pipes read by a
thread that emits each line as an event (``event`` the text, ``stream``, the
``actor`` it came from), a progress bar as ``model.loading`` events with
``done``/``total``, and a line over :data:`MAX_LINE` characters in parts.
vLLM's processes inherit those pipes, and each of them wraps its own Python-level
writes (and warnings) the same way, with its own ``pid`` and actor path
(:func:`setup_child_process`, run by the logging configuration vLLM applies in
every process it starts). Nothing is lost when a process dies mid-line: what it
wrote is in the pipe, and the reader flushes a partial line after a moment of
silence.

``--log-format console`` renders all of it, ours and vLLM's, the same readable
way (and progress bars stay live bars); ``--log-level`` takes per-module levels
(``info,vllm=warning,supervisor.tree=debug``), vLLM's loggers included.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

LogFormat = Literal["json", "console", "auto"]

LEVELS = ("debug", "info", "warning", "error", "critical")
MAX_LINE = 16_384  # characters; a longer line leaves in parts
PARTIAL_FLUSH_S = 0.5  # a line without its end, silent this long, leaves as it is
FORMAT_VAR = "LLM_SUPERVISOR_LOG_FORMAT"  # json | console, for vLLM's processes
MAIN_PID_VAR = "LLM_SUPERVISOR_MAIN_PID"
_PROGRESS = re.compile(  # tqdm: "Loading shards:  50% Completed | 1/2 [...]" or "desc:  50%|#####| 1/2 [...]"
    r"^(?P<desc>[^|]*?):?\s*(?P<pct>\d+)%\s*(?:Completed)?\s*\|[^|]*\|?\s*(?P<done>\d+)/(?P<total>\d+)")


def parse_level_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``info,vllm=warning,supervisor.tree=debug`` -> ("info", {"vllm": "warning", ...})."""
    root = "info"
    modules: dict[str, str] = {}
    for part in spec.split(","):
        name, eq, level = part.strip().partition("=")
        if eq:
            modules[name.strip()] = level.strip().lower()
        elif name.strip():
            root = name.strip().lower()
    for level in (root, *modules.values()):
        if level not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    return root, modules


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


def _console(stream: TextIO) -> structlog.dev.ConsoleRenderer:
    return structlog.dev.ConsoleRenderer(colors=stream.isatty())


def setup_logging(
    level: str = "info", fmt: LogFormat = "auto", stream: TextIO | None = None
) -> str:
    """Configure structlog, the stdlib root logger and Python warnings. Safe to call
    again. ``level`` may carry per-module levels. Returns the format used."""
    stream = stream if stream is not None else sys.stderr
    root_level, modules = parse_level_spec(level)
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = _console(stream) if fmt == "console" else structlog.processors.JSONRenderer()
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
    root.setLevel(root_level.upper())
    # vLLM configures its own handlers; route them through ours instead.
    for name in ("vllm", "hypercorn", "hypercorn.error", "hypercorn.access", "py.warnings"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    logging.getLogger("hypercorn.access").setLevel(logging.WARNING)
    for name, module_level in modules.items():
        logging.getLogger(name).setLevel(module_level.upper())
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> one event
    os.environ[FORMAT_VAR] = fmt
    return fmt


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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1e6) % 1_000_000:06d}Z"


def process_actor() -> str:
    """This process's place in the tree, for lines it writes itself."""
    main_pid = os.environ.get(MAIN_PID_VAR)
    if main_pid is None or main_pid == str(os.getpid()):
        return "process"
    import multiprocessing

    name = multiprocessing.current_process().name
    if "EngineCore" in name:
        return "root/engine/core"
    if "Worker" in name:
        return f"root/engine/core/{name.lower()}"
    return f"root/engine/{name.lower()}"


class JsonLines:
    """Raw text -> one event per line (``\n`` or ``\r`` ends one): ``write`` gets whole
    lines, already rendered. A line that already is a JSON event is kept as it is; a
    progress bar's line becomes a ``model.loading`` event."""

    def __init__(self, write: Callable[[str], None], *, stream: str, actor: str | Callable[[], str],
                 pid: int | None, fmt: str = "json") -> None:
        self.write = write
        self.stream = stream
        self.actor = actor
        self.pid = pid
        self.fmt = fmt
        self._partial = ""
        self._last_progress: tuple[str, str] | None = None

    def feed(self, text: str) -> None:
        text = self._partial + text
        lines = re.split(r"(\r\n|\n|\r)", text)
        self._partial = lines.pop()
        for i in range(0, len(lines), 2):
            self._line(lines[i], lines[i + 1])
        while len(self._partial) > MAX_LINE:
            head, self._partial = self._partial[:MAX_LINE], self._partial[MAX_LINE:]
            self._line(head, "", part=True)

    def flush(self) -> None:
        if self._partial:
            partial, self._partial = self._partial, ""
            self._line(partial, "", part=True)

    def _line(self, line: str, end: str, part: bool = False) -> None:
        if self.fmt == "console":  # a person reads it: raw text as it came (live bars), events rendered
            event = _as_event(line)
            self.write(_console_line(event) + "\n" if event is not None else line + end)
            return
        if not line.strip():
            return
        if _as_event(line) is not None:
            self.write(line + "\n")
            return
        for start in range(0, len(line), MAX_LINE):
            self.write(json.dumps(self._event(line[start:start + MAX_LINE], part or len(line) > MAX_LINE)) + "\n")

    def _event(self, text: str, part: bool) -> dict[str, Any]:
        actor = self.actor() if callable(self.actor) else self.actor
        event: dict[str, Any] = {"event": text, "actor": actor, "level": "warning" if self.stream == "stderr"
                                 else "info", "logger": self.stream, "stream": self.stream, "pid": self.pid,
                                 "timestamp": _now()}
        if part:
            event["part"] = True
        match = _PROGRESS.match(text.strip())
        if match:
            key = (match["done"], match["total"])
            event.update(event="model.loading", desc=match["desc"].strip(), done=int(match["done"]),
                         total=int(match["total"]), percent=int(match["pct"]), level="info", line=text.strip())
            self._last_progress = key
        return event


def _as_event(line: str) -> dict[str, Any] | None:
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) and "event" in data else None


def _console_line(event: dict[str, Any]) -> str:
    renderer = structlog.dev.ConsoleRenderer(colors=False)
    data = dict(event)
    data.setdefault("timestamp", "")
    return str(renderer(None, "info", data))


class _LineWriter:
    """A text stream whose writes leave as events (a vLLM process's sys.stdout/stderr)."""

    def __init__(self, lines: JsonLines, original: TextIO) -> None:
        self.lines = lines
        self.original = original
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self.lines.feed(text)
        return len(text)

    def flush(self) -> None:
        self.original.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.original.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.original, name)


_child_ready = False


def setup_child_process() -> None:
    """In a process vLLM started: Python warnings to logging, and sys.stdout / sys.stderr
    writes as events carrying this process's pid and actor path. Once per process."""
    global _child_ready
    if _child_ready or os.environ.get(MAIN_PID_VAR) in (None, str(os.getpid())):
        return
    _child_ready = True
    logging.captureWarnings(True)
    fmt = os.environ.get(FORMAT_VAR, "json")
    for name in ("stdout", "stderr"):
        original: TextIO = getattr(sys, f"__{name}__") or getattr(sys, name)

        def write(text: str, original: TextIO = original) -> None:
            original.write(text)
            original.flush()

        lines = JsonLines(write, stream=name, actor=process_actor, pid=os.getpid(), fmt=fmt)
        setattr(sys, name, _LineWriter(lines, original))


def child_handler(stream: Any = None) -> logging.Handler:
    """The handler vLLM's logging configuration builds in every process (a dictConfig
    factory): it also sets the process up (:func:`setup_child_process`)."""
    setup_child_process()
    return logging.StreamHandler(sys.stderr if stream is None else stream)


class ForeignJsonFormatter(logging.Formatter):
    """vLLM's loggers, in the worker and in every process vLLM starts (vLLM applies the
    dictConfig at ``VLLM_LOGGING_CONFIG_PATH`` in each): JSON lines, or console lines
    with ``--log-format console``."""

    def format(self, record: logging.LogRecord) -> str:
        main_pid = os.environ.get(MAIN_PID_VAR)
        actor = "root/engine" if main_pid == str(os.getpid()) else process_actor()
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
        if os.environ.get(FORMAT_VAR) == "console":
            return _console_line(data)
        return json.dumps(data, default=str)


def route_vllm_logs(level: str = "info") -> None:
    """Make vLLM (here and in its child processes) log through :class:`ForeignJsonFormatter`
    at the level ``--log-level`` gives the ``vllm`` module (else its root level), and set
    each of its processes up (:func:`child_handler`), unless the user configured vLLM's
    logging."""
    import tempfile

    logging.Formatter.converter = time.gmtime
    os.environ.setdefault(MAIN_PID_VAR, str(os.getpid()))
    if os.environ.get("VLLM_LOGGING_CONFIG_PATH") or os.environ.get("VLLM_CONFIGURE_LOGGING") == "0":
        return
    root_level, modules = parse_level_spec(level)
    loggers = {name: {"level": lv.upper()} for name, lv in modules.items() if name.startswith("vllm.")}
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "supervisor.logs.ForeignJsonFormatter"}},
        # building the filter sets each vLLM process up for this CPU build (actors.engine.vllm_compat)
        "filters": {"compat": {"()": "actors.engine.vllm_compat.install_filter"}},
        "handlers": {"stderr": {"()": "supervisor.logs.child_handler", "formatter": "json",
                                "filters": ["compat"]}},
        "loggers": {"vllm": {"handlers": ["stderr"], "level": modules.get("vllm", root_level).upper(),
                             "propagate": False},
                    "py.warnings": {"handlers": ["stderr"], "propagate": False}, **loggers},
    }
    fd, path = tempfile.mkstemp(prefix="llm-supervisor-vllm-logging-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = path
    atexit.register(_unlink_quietly, path)


def _unlink_quietly(path: str) -> None:
    import contextlib

    with contextlib.suppress(OSError):
        os.unlink(path)


class OutputCapture:
    """The worker's file descriptors 1 and 2 become pipes; a thread turns what arrives
    into events (:class:`JsonLines`) on the original descriptors. Everything the worker
    and its descendants write goes through it, whatever wrote it."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self._threads: list[threading.Thread] = []
        self._restore: list[tuple[int, int]] = []
        self.streams: dict[str, TextIO] = {}

    def start(self) -> None:
        for name, fd in (("stdout", 1), ("stderr", 2)):
            saved = os.dup(fd)
            original = os.fdopen(saved, "w", buffering=1, encoding="utf-8", errors="replace")
            read_end, write_end = os.pipe()
            getattr(sys, name).flush()
            os.dup2(write_end, fd)
            os.close(write_end)
            self._restore.append((saved, fd))
            self.streams[name] = original
            thread = threading.Thread(target=self._pump, args=(read_end, name, original), daemon=True,
                                      name=f"output-capture-{name}")
            thread.start()
            self._threads.append(thread)

    def _pump(self, read_end: int, name: str, original: TextIO) -> None:
        lock = threading.Lock()

        def write(text: str) -> None:
            with lock:
                original.write(text)
                original.flush()

        lines = JsonLines(write, stream=name, actor="process", pid=None, fmt=self.fmt)
        import select

        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while True:
                ready, _, _ = select.select([pipe], [], [], PARTIAL_FLUSH_S)
                if not ready:
                    lines.flush()  # a line left without its end (its writer died, or waits)
                    continue
                data = pipe.read(65536)
                if not data:
                    lines.flush()
                    return
                lines.feed(data.decode("utf-8", errors="replace"))

    def stop(self, timeout: float = 2.0) -> None:
        """Give the descriptors back; what is still in the pipes is written out."""
        for saved, fd in self._restore:
            try:
                getattr(sys, "stdout" if fd == 1 else "stderr").flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, fd)  # the pipe's last write end here closes: the pump sees the end
        for thread in self._threads:
            thread.join(timeout)
