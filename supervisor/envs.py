"""Lazy, validated access to every ``DYN_*`` variable the worker reads.

Nothing is read at import time: ``envs.DYN_SYSTEM_PORT`` (module attribute) or
``envs.get("DYN_SYSTEM_PORT", environ)`` reads and validates the variable when
asked, so a bad value fails where it is used, with a message that names the
variable and says why. An unset or empty variable yields its default.

Port variables must be integers in the registered range 1024-49151: below it
are the privileged well-known ports, above it the kernel's ephemeral range,
where a fixed port may already be taken by any outgoing connection. A variable
whose flag takes 0 to pick a free port (``--system-port``, ``--http-port``,
``--request-plane-port``) takes 0 too, with the same meaning; the KV event ports
do not, because vLLM and the relay must agree on a port before either binds.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

REGISTERED_PORT_MIN = 1024
REGISTERED_PORT_MAX = 49151

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})


# -- value parsers: str -> value, ValueError with the reason -------------------------------------


def parse_bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise ValueError(f"expected one of true/1/yes/on or false/0/no/off, got {raw!r}")


def parse_port(raw: str) -> int:
    """A fixed port from the environment: an integer in 1024-49151."""
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"expected an integer port, got {raw!r}") from None
    if not REGISTERED_PORT_MIN <= value <= REGISTERED_PORT_MAX:
        raise ValueError(
            f"port {value} is outside the registered range {REGISTERED_PORT_MIN}-{REGISTERED_PORT_MAX}"
            " (below are privileged ports, above is the kernel's ephemeral range)"
        )
    return value


def parse_port_or_free(raw: str) -> int:
    """A port variable whose flag takes 0: 0 picks a free port, else as :func:`parse_port`."""
    try:
        if int(raw.strip()) == 0:
            return 0
    except ValueError:
        pass  # parse_port says why
    return parse_port(raw)


def parse_host(raw: str) -> str:
    """An address to bind: a literal IPv4 or IPv6 address, or ``localhost``. Names
    are refused: what a name resolves to (and so which interfaces listen) can change."""
    text = raw.strip()
    if text.lower() == "localhost":
        return "localhost"
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"expected an IP address (v4 or v6) or localhost, got {raw!r}") from None


def parse_ipv4_host(raw: str) -> str:
    """:func:`parse_host` for vLLM's KV event sockets, which are IPv4 only: ``localhost``
    is 127.0.0.1, ``0.0.0.0`` all interfaces."""
    host = parse_host(raw)
    if host == "localhost":
        return "127.0.0.1"
    if ipaddress.ip_address(host).version != 4:
        raise ValueError(f"vLLM's KV event sockets are IPv4 only: expected an IPv4 address, got {raw!r}")
    return host


def int_parser(minimum: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise ValueError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def float_parser(minimum: float | None = None, *, positive: bool = False) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {raw!r}")
        if positive and value <= 0:
            raise ValueError(f"must be > 0, got {value:g}")
        if minimum is not None and value < minimum:
            raise ValueError(f"must be >= {minimum:g}, got {value:g}")
        return value

    return parse


def choice_parser(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return value

    return parse


def parse_list(raw: str) -> tuple[str, ...]:
    """``"a,b"``, ``"a b"`` or ``"a, b"`` -> ``("a", "b")``."""
    return tuple(part for part in raw.replace(",", " ").split() if part)


def parse_str(raw: str) -> str:
    return raw


def parse_log_level(raw: str) -> str:
    """``debug``, or Dynamo's filter form ``debug,some_crate=trace`` (its first bare level)."""
    aliases = {"warn": "warning", "trace": "debug", "fatal": "critical"}
    for part in raw.split(","):
        part = part.strip().lower()
        if part and "=" not in part:
            level = aliases.get(part, part)
            if level in LOG_LEVELS:
                return level
            break
    raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {raw!r}")


def parse_log_filters(raw: str) -> dict[str, str]:
    """The ``module=level`` parts of a ``--log-level``/``DYN_LOG`` value: ``info,vllm=warning,
    supervisor.tree=debug`` -> ``{"vllm": "warning", "supervisor.tree": "debug"}``."""
    aliases = {"warn": "warning", "trace": "debug", "fatal": "critical"}
    filters: dict[str, str] = {}
    for part in raw.split(","):
        name, eq, level = part.strip().partition("=")
        if not eq:
            continue
        level = aliases.get(level.strip().lower(), level.strip().lower())
        if not name.strip() or level not in LOG_LEVELS:
            raise ValueError(f"{part.strip()!r}: expected module=level with a level among {', '.join(LOG_LEVELS)}")
        filters[name.strip()] = level
    return filters


def parse_json_object(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"expected a JSON object, got invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__} {raw!r}")
    return value


def parse_json_or_file(raw: str) -> dict[str, Any]:
    """A JSON object, or ``@path`` naming a file that holds one."""
    if raw.startswith("@"):
        path = Path(os.path.expandvars(raw[1:])).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
        return parse_json_object(text)
    return parse_json_object(raw)


# -- the variables ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvVar:
    name: str
    parse: Callable[[str], Any]
    default: Any
    doc: str
    is_port: bool = False


ROLES = ("agg", "decode", "prefill", "encode", "processor", "frontend")
DISCOVERY_BACKENDS = ("mem", "file", "etcd", "nats")
REQUEST_PLANES = ("tcp", "nats", "http")
EVENT_PLANES = ("nats", "zmq")
DISAGGREGATION_MODES = ("agg", "prefill", "decode", "encode")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("json", "console", "auto")
ENGINES = ("vllm", "synthetic")
ROUTER_MODES = ("round-robin", "random", "power-of-two", "kv")

_VARS: tuple[EnvVar, ...] = (
    # identity and planes
    EnvVar("DYN_ROLE", choice_parser(ROLES), None, "--role"),
    EnvVar("DYN_NAMESPACE", parse_str, "dynamo", "--namespace"),
    EnvVar("DYN_COMPONENT", parse_str, None, "--component"),
    EnvVar("DYN_ENDPOINT", parse_str, None, "--endpoint (dyn://namespace.component.endpoint)"),
    EnvVar("DYN_DISCOVERY_BACKEND", choice_parser(DISCOVERY_BACKENDS), "file", "--discovery-backend"),
    EnvVar("DYN_STORE_KV", choice_parser(DISCOVERY_BACKENDS), None, "--store-kv (legacy --discovery-backend)"),
    EnvVar("DYN_REQUEST_PLANE", choice_parser(REQUEST_PLANES), "tcp", "--request-plane"),
    EnvVar("DYN_EVENT_PLANE", choice_parser(EVENT_PLANES), "zmq", "--event-plane"),
    EnvVar("DYN_ENABLE_LOCAL_INDEXER", parse_bool, True, "--enable-local-indexer"),
    EnvVar("DYN_DURABLE_KV_EVENTS", parse_bool, False, "--durable-kv-events"),
    EnvVar("DYN_MIGRATION_LIMIT", int_parser(0), 3, "--migration-limit"),
    EnvVar("DYN_ROUTER_MODE", choice_parser(ROUTER_MODES), "round-robin", "--router-mode"),
    EnvVar("DYN_CUSTOM_JINJA_TEMPLATE", parse_str, None, "--custom-jinja-template"),
    EnvVar("DYN_ENDPOINT_TYPES", parse_list, ("chat", "completions"), "--endpoint-types"),
    EnvVar("DYN_TOOL_CALL_PARSER", parse_str, None, "--dyn-tool-call-parser"),
    EnvVar("DYN_REASONING_PARSER", parse_str, None, "--dyn-reasoning-parser"),
    EnvVar("DYN_VLLM_USE_TOKENIZER", parse_bool, False, "--use-vllm-tokenizer"),
    EnvVar("DYN_DUMP_CONFIG_TO", parse_str, None, "--dump-config-to"),
    EnvVar("DYN_CONNECTOR", parse_list, (), "--connector"),
    # legacy role spellings
    EnvVar("DYN_VLLM_IS_PREFILL_WORKER", parse_bool, None, "--is-prefill-worker"),
    EnvVar("DYN_VLLM_IS_DECODE_WORKER", parse_bool, None, "--is-decode-worker"),
    EnvVar("DYN_VLLM_DISAGGREGATION_MODE", choice_parser(DISAGGREGATION_MODES), None, "--disaggregation-mode"),
    # multimodal
    EnvVar("DYN_VLLM_ENABLE_MULTIMODAL", parse_bool, False, "--enable-multimodal"),
    EnvVar("DYN_VLLM_MULTIMODAL_PROCESSOR", parse_bool, False, "--multimodal-processor"),
    EnvVar("DYN_VLLM_EC_PROCESSOR", parse_bool, False, "--ec-processor"),
    EnvVar("DYN_VLLM_MULTIMODAL_ENCODE_WORKER", parse_bool, False, "--multimodal-encode-worker"),
    EnvVar("DYN_VLLM_MULTIMODAL_WORKER", parse_bool, False, "--multimodal-worker"),
    EnvVar("DYN_VLLM_MULTIMODAL_DECODE_WORKER", parse_bool, False, "--multimodal-decode-worker"),
    EnvVar("DYN_VLLM_MULTIMODAL_ENCODE_PREFILL_WORKER", parse_bool, False, "--multimodal-encode-prefill-worker"),
    EnvVar("DYN_VLLM_NATIVE_ENCODER_WORKER", parse_bool, False, "--vllm-native-encoder-worker"),
    EnvVar("DYN_VLLM_MM_PROMPT_TEMPLATE", parse_str, "USER: <image>\n<prompt> ASSISTANT:", "--mm-prompt-template"),
    EnvVar("DYN_VLLM_EC_CONNECTOR_BACKEND", parse_str, "ECExampleConnector", "--ec-connector-backend"),
    EnvVar("DYN_VLLM_EC_STORAGE_PATH", parse_str, None, "--ec-storage-path"),
    EnvVar("DYN_VLLM_EC_EXTRA_CONFIG", parse_json_object, None, "--ec-extra-config"),
    EnvVar("DYN_VLLM_EC_CONSUMER_MODE", parse_bool, False, "--ec-consumer-mode"),
    EnvVar("DYN_VLLM_EMBEDDING_TRANSFER_MODE", choice_parser(("inline", "shm")), "inline",
           "--embedding-transfer-mode"),
    # ports
    EnvVar("DYN_SYSTEM_PORT", parse_port_or_free, 0, "--system-port (0 picks a free port)", is_port=True),
    EnvVar("DYN_SYSTEM_HOST", parse_str, "127.0.0.1", "--system-host"),
    EnvVar("DYN_HTTP_PORT", parse_port_or_free, None, "--http-port (0 picks a free port)", is_port=True),
    EnvVar("DYN_HTTP_HOST", parse_host, "0.0.0.0", "--http-host"),
    EnvVar("DYN_REQUEST_PLANE_PORT", parse_port_or_free, 0, "--request-plane-port (0 picks a free port)", is_port=True),
    EnvVar("DYN_REQUEST_PLANE_HOST", parse_host, "127.0.0.1", "--request-plane-host"),
    EnvVar("DYN_ADVERTISE_HOST", parse_host, None, "--advertise-host"),
    EnvVar("DYN_VLLM_KV_EVENT_PORT", parse_port, 20080,
           "ZMQ port of vLLM's KV event stream (the relay listens, vLLM connects; minus the data-parallel rank)",
           is_port=True),
    EnvVar("DYN_VLLM_KV_EVENT_REPLAY_PORT", parse_port, None,
           "ZMQ port of vLLM's KV event replay socket (default: the event port + 1000)", is_port=True),
    EnvVar("DYN_VLLM_KV_EVENT_HOST", parse_ipv4_host, "127.0.0.1",
           "Address the KV event sockets listen on: the relay's (vLLM connects to it) and vLLM's replay socket"),
    EnvVar("DYN_EVENT_PLANE_HOST", parse_str, "127.0.0.1", "Address the ZMQ event plane publisher binds"),
    EnvVar("DYN_EVENT_PLANE_PORT", parse_port_or_free, None,
           "Port of the ZMQ event plane publisher (KV events, load metrics; unset or 0 picks a free one)",
           is_port=True),
    # health and shutdown
    EnvVar("DYN_HEALTH_CHECK_INTERVAL", float_parser(positive=True), 2.0, "--health-check-interval (seconds)"),
    EnvVar("DYN_HEALTH_CHECK_REQUEST_TIMEOUT", float_parser(positive=True), 3.0, "--health-check-timeout (seconds)"),
    EnvVar("DYN_CANARY_WAIT_TIME", float_parser(0.0), 10.0, "--canary-wait-time (idle seconds before a canary)"),
    EnvVar("DYN_HEALTH_CHECK_PAYLOAD", parse_json_or_file, None, "--health-check-payload (JSON or @file)"),
    EnvVar("DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS", float_parser(0.0), 5.0, "--grace-period (seconds)"),
    # process
    EnvVar("DYN_ENGINE", choice_parser(ENGINES), None, "--engine (default: vllm when installed)"),
    EnvVar("DYN_LOG", parse_log_level, "info", "--log-level"),
    EnvVar("DYN_LOG_FORMAT", choice_parser(LOG_FORMATS), "auto", "--log-format"),
    EnvVar("DYN_ENABLE_CHAOS", parse_bool, False, "--enable-chaos"),
)

VARIABLES: Mapping[str, EnvVar] = {var.name: var for var in _VARS}


def _lookup(name: str) -> EnvVar:
    try:
        return VARIABLES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no variable {name!r}") from None


def raw(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The variable's text, or None when unset or empty."""
    _lookup(name)
    value = (os.environ if environ is None else environ).get(name)
    return value if value is not None and value.strip() != "" else None


def is_set(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the variable is set to something (an empty value counts as unset)."""
    return raw(name, environ) is not None


def get(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """The parsed value, or the default when unset; ConfigError naming the variable."""
    var = _lookup(name)
    text = raw(name, environ)
    if text is None:
        return var.default
    try:
        return var.parse(text)
    except ValueError as exc:
        raise ConfigError(f"{name}={text!r}: {exc}") from None


def names() -> Iterator[str]:
    return iter(VARIABLES)


def __getattr__(name: str) -> Any:
    if name in VARIABLES:
        return get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *VARIABLES])
