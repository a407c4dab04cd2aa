"""The worker's own flags: one :class:`Option` per flag in the :data:`OPTIONS` table,
with its type, ``DYN_*`` variable, default and help group, and the argparse parser
built from that table.

Adding a flag means adding a row here (and its variable in :mod:`supervisor.envs`),
a field on :class:`~supervisor.config.schema.Config`, and a line in
:func:`~supervisor.config.parse.parse_args` that copies it over. vLLM's engine
flags are not listed here: vLLM's own parser knows them (:mod:`.vllm_args`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from .. import envs
from ..envs import ROLES
from ..errors import ConfigError

G_WORKER = "Dynamo worker options"
G_LEGACY = "Legacy role flags (deprecated: use --role)"
G_MULTIMODAL = "Multimodal options"
G_HEALTH = "Health and shutdown"
G_PROCESS = "Process options"
G_SYNTHETIC = "Synthetic engine (benchmarks and chaos tests)"
G_FRONTEND = "Frontend (--role frontend): routing, disaggregation, migration"
G_VLLM = "vLLM engine options (AsyncEngineArgs, passed through to vLLM)"

Kind = Literal["str", "bool", "flag", "int", "float", "port", "host", "choice", "list", "json", "payload", "path",
               "loglevel"]


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
        if self.kind == "host":
            return envs.parse_host(text)
        if self.kind == "choice":
            return envs.choice_parser(self.choices)(text)
        if self.kind == "list":
            return envs.parse_list(text)
        if self.kind == "json":
            return envs.parse_json_object(text)
        if self.kind == "payload":
            return envs.parse_json_or_file(text)
        if self.kind == "loglevel":
            root = envs.parse_log_level(text)
            filters = envs.parse_log_filters(text)
            return ",".join([root, *(f"{name}={level}" for name, level in filters.items())])
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
    Option("--request-plane-host", "host", "Address the tcp request plane's listener binds (an IP address or "
           "localhost; 0.0.0.0 or :: for every interface).", env="DYN_REQUEST_PLANE_HOST"),
    Option("--advertise-host", "host", "Address other hosts reach this worker at, written in its registration "
           "(default: the bind address, or a detected routable address when bound to every interface).",
           env="DYN_ADVERTISE_HOST"),
    Option("--nats-server", "str", "NATS server URL(s), comma-separated (default: $NATS_SERVER, else "
           "nats://localhost:4222)."),
    Option("--etcd-endpoints", "str", "etcd endpoint(s), comma-separated (default: $ETCD_ENDPOINTS, else "
           "http://localhost:2379)."),
    Option("--enable-local-indexer", "bool", "Keep a queryable index of this worker's KV blocks.",
           env="DYN_ENABLE_LOCAL_INDEXER"),
    Option("--durable-kv-events", "bool", "Publish KV events durably (JetStream) on the NATS event plane.",
           env="DYN_DURABLE_KV_EVENTS"),
    Option("--migration-limit", "int", "How many times a request may move to another worker mid-stream (0: "
           "never). A worker's own value, in its registration, wins for its model.",
           env="DYN_MIGRATION_LIMIT", minimum=0),
    # -- the frontend
    Option("--router-mode", "choice", "How the frontend picks a worker.", env="DYN_ROUTER_MODE",
           choices=envs.ROUTER_MODES, group=G_FRONTEND),
    Option("--kv-overlap-score-weight", "float", "kv mode: the weight of prompt blocks a worker must still "
           "compute, against its active decode blocks.", default=1.0, minimum=0.0, group=G_FRONTEND),
    Option("--router-temperature", "float", "kv mode: 0 picks the cheapest worker; above, a softmax over the "
           "costs spreads the load.", default=0.0, minimum=0.0, group=G_FRONTEND),
    Option("--kv-events", "bool", "kv mode: follow the workers' KV events (--no-kv-events: predict the cache "
           "from the frontend's own decisions).", default=True, group=G_FRONTEND),
    Option("--active-decode-blocks-threshold", "float", "A worker whose active decode blocks exceed this "
           "fraction of its KV blocks is busy (all busy: 503).", minimum=0.0, group=G_FRONTEND),
    Option("--active-prefill-tokens-threshold", "int", "A worker with more prompt tokens waiting for prefill "
           "is busy (all busy: 503).", minimum=0, group=G_FRONTEND),
    Option("--enforce-disagg", "bool", "Refuse requests when no prefill worker serves the model, instead of "
           "serving them aggregated.", group=G_FRONTEND),
    Option("--custom-jinja-template", "path", "Chat template file overriding the model's ($VARS and ~ expanded).",
           env="DYN_CUSTOM_JINJA_TEMPLATE"),
    Option("--endpoint-types", "list", "Comma-separated OpenAI endpoint types: chat, completions (none alone: "
           "no OpenAI route, token mode only).",
           env="DYN_ENDPOINT_TYPES"),
    Option("--dyn-tool-call-parser", "str", "Tool call parser name.", env="DYN_TOOL_CALL_PARSER",
           dest_name="tool_call_parser"),
    Option("--dyn-reasoning-parser", "str", "Reasoning parser name.", env="DYN_REASONING_PARSER",
           dest_name="reasoning_parser"),
    Option("--use-vllm-tokenizer", "bool", "Text mode: vLLM tokenizes prompts and detokenizes output.",
           env="DYN_VLLM_USE_TOKENIZER"),
    Option("--connector", "list", "KV connectors: nixl, lmcache, kvbm (several -> PdConnector), or none. "
           "Mutually exclusive with --kv-transfer-config.", env="DYN_CONNECTOR", metavar="CONNECTOR"),
    Option("--system-host", "str", "Address of the system server (/live, /ready, /metrics, and the "
           "/engine, /loras and chaos routes): keep it off public interfaces.", env="DYN_SYSTEM_HOST"),
    Option("--system-port", "port", "Port of the system server (0 picks a free one).", env="DYN_SYSTEM_PORT"),
    Option("--http-port", "port", "Serve OpenAI-compatible HTTP on this port (frontend default 8000).",
           env="DYN_HTTP_PORT"),
    Option("--http-host", "host", "Address the OpenAI-compatible HTTP front binds (an IP address or "
           "localhost; every interface by default, as vllm serve).", env="DYN_HTTP_HOST"),
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
    Option("--embedding-transfer-mode", "choice", "How an encode worker's embeddings reach the PD worker: in the "
           "request (inline) or through shared memory on one host (shm).", env="DYN_VLLM_EMBEDDING_TRANSFER_MODE",
           choices=("inline", "shm"), group=G_MULTIMODAL),
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
    Option("--log-level", "loglevel", "Log level (debug, info, warning, error, critical), optionally with "
           "per-module levels: info,vllm=warning,supervisor.tree=debug. vLLM's loggers follow it too.",
           env="DYN_LOG", group=G_PROCESS, metavar="LEVEL[,MODULE=LEVEL...]"),
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
    Option("--synthetic-prefill-us-per-token", "float", "Microseconds of prefill per prompt token not found in "
           "the prefix cache (delays the first token).", default=0.0, minimum=0.0, group=G_SYNTHETIC,
           metavar="US"),
    Option("--synthetic-kv-events", "bool", "Publish the prefix cache's KV events in vLLM's format to the KV "
           "event endpoints (DYN_VLLM_KV_EVENT_PORT), as vLLM does.", group=G_SYNTHETIC),
)
OPTIONS_BY_DEST: Mapping[str, Option] = {opt.dest: opt for opt in OPTIONS}
_OPTIONS_BY_FLAG: Mapping[str, Option] = {opt.flag: opt for opt in OPTIONS}
# Flags both groups know: ours wins (``--log-level`` sets the worker's logging,
# which vLLM's loggers are routed through), and the help lists it once.
_SHADOWED_VLLM_FLAGS = frozenset({"--log-level"})
# vLLM flags the synthetic engine understands without importing vLLM.
_SHARED_FLAGS = ("--model", "--served-model-name")


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
