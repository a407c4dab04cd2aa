"""argv + environment -> a validated, frozen :class:`Config`.

Errors are :class:`~supervisor.errors.ConfigError` with one line naming the
flags; the CLI turns them into exit status 2 before anything starts.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

ROLES = ("agg", "decode", "prefill", "encode", "processor", "frontend")
TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Config:
    role: str = "agg"
    namespace: str = "dynamo"
    component: str = "backend"
    endpoint: str = "generate"
    engine: str = "synthetic"
    model: str | None = None
    log_level: str = "info"
    log_format: str = "auto"
    system_host: str = "127.0.0.1"
    system_port: int = 0
    enable_chaos: bool = False
    synthetic_step_ms: float = 10.0
    synthetic_die_after: float | None = None
    synthetic_hang_after: float | None = None
    synthetic_load_s: float = 0.0
    health_check_interval: float = 2.0
    health_check_timeout: float = 3.0
    grace_period: float = 5.0
    engine_args: Mapping[str, Any] = field(default_factory=dict)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would print and sys.exit(2)
        raise ConfigError(message)


def parse_bool(name: str, value: str) -> bool:
    low = value.strip().lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise ConfigError(f"{name}: expected one of true/1/yes/on or false/0/no/off, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m supervisor", description="LLM inference worker (supervisor tree on trio)")
    g = p.add_argument_group("worker")
    g.add_argument("--role", choices=ROLES, default=None)
    g.add_argument("--namespace", default=None)
    g.add_argument("--engine", choices=("vllm", "synthetic"), default=None)
    g.add_argument("--model", default=None)
    g.add_argument("--log-level", default=None, choices=("debug", "info", "warning", "error", "critical"))
    g.add_argument("--log-format", default=None, choices=("json", "console", "auto"))
    g.add_argument("--system-host", default=None)
    g.add_argument("--system-port", type=int, default=None)
    g.add_argument("--enable-chaos", action=argparse.BooleanOptionalAction, default=None)
    s = p.add_argument_group("synthetic engine")
    s.add_argument("--synthetic-step-ms", type=float, default=None)
    s.add_argument("--synthetic-die-after", type=float, default=None, metavar="SECONDS")
    s.add_argument("--synthetic-hang-after", type=float, default=None, metavar="SECONDS")
    s.add_argument("--synthetic-load-s", type=float, default=None, metavar="SECONDS")
    return p


def parse_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    env = os.environ if environ is None else environ
    ns = build_parser().parse_args(list(argv))
    values: dict[str, Any] = {}
    for key in ("role", "namespace", "engine", "model", "log_level", "log_format", "system_host",
                "system_port", "enable_chaos", "synthetic_step_ms", "synthetic_die_after",
                "synthetic_hang_after", "synthetic_load_s"):
        value = getattr(ns, key)
        if value is not None:
            values[key] = value
    if "namespace" not in values and env.get("DYN_NAMESPACE"):
        values["namespace"] = env["DYN_NAMESPACE"]
    if "system_port" not in values and env.get("DYN_SYSTEM_PORT"):
        values["system_port"] = _port("DYN_SYSTEM_PORT", env["DYN_SYSTEM_PORT"])
    port = values.get("system_port", 0)
    if port != 0 and not 1 <= port <= 65535:
        raise ConfigError(f"--system-port: {port} is not a TCP port (0 picks a free one)")
    if env.get("DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS"):
        values["grace_period"] = _float("DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS",
                                        env["DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS"])
    role = values.get("role", "agg")
    values["component"] = {"prefill": "prefill", "encode": "encode"}.get(role, "backend")
    return Config(**values)


def _port(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer port, got {raw!r}") from None
    if not 1024 <= value <= 49151:
        raise ConfigError(f"{name}: port {value} is outside 1024-49151")
    return value


def _float(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
