""":class:`Config`: the validated, frozen configuration of one worker process, the
one object every actor reads; and the conversion of its values to plain JSON-ready
data (used by its own properties and by the dump).

Nothing here parses or validates: :func:`~supervisor.config.parse.parse_args`
builds a Config only from values that passed every rule.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

DEFAULT_ENDPOINT = "generate"


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
    # Three listeners, three addresses: the system server's routes (/engine/*,
    # /loras, chaos) stay on loopback when the OpenAI port is exposed.
    system_host: str = "127.0.0.1"
    system_port: int = 0
    http_host: str = "0.0.0.0"
    http_port: int | None = None
    enable_chaos: bool = False
    synthetic_step_ms: float = 10.0
    synthetic_die_after: float | None = None
    synthetic_hang_after: float | None = None
    synthetic_load_s: float = 0.0
    synthetic_prefill_us_per_token: float = 0.0
    synthetic_kv_events: bool = False
    health_check_interval: float = 2.0
    health_check_timeout: float = 3.0
    canary_wait_time: float = 10.0
    health_check_payload: Mapping[str, Any] | None = None
    grace_period: float = 5.0
    discovery_backend: str = "file"
    request_plane: str = "tcp"
    event_plane: str = "zmq"
    request_plane_host: str = "127.0.0.1"
    advertise_host: str | None = None
    request_plane_port: int = 0
    nats_server: str | None = None  # None: NATS_SERVER, else the default (supervisor.planes.servers)
    etcd_endpoints: str | None = None  # None: ETCD_ENDPOINTS, else the default
    enable_local_indexer: bool = True
    durable_kv_events: bool = False
    migration_limit: int = 3
    router_mode: str = "round-robin"
    kv_overlap_score_weight: float = 1.0
    router_temperature: float = 0.0
    kv_events: bool = True
    active_decode_blocks_threshold: float | None = None
    active_prefill_tokens_threshold: int | None = None
    enforce_disagg: bool = False
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
    multimodal_flag: str | None = None  # the flag that chose it (--multimodal-worker, --role encode...)
    mm_prompt_template: str = "USER: <image>\n<prompt> ASSISTANT:"
    ec_connector_backend: str = "ECExampleConnector"
    ec_storage_path: str | None = None
    ec_extra_config: Mapping[str, Any] | None = None
    ec_consumer_mode: bool = False
    embedding_transfer_mode: str = "inline"
    data_parallel_rank: int | None = None
    data_parallel_size: int = 1
    tensor_parallel_size: int = 1
    # The port of this worker's KV event stream (the relay binds it and vLLM's
    # PUB socket connects, unless a wildcard endpoint has vLLM bind it) and of
    # vLLM's replay ROUTER socket; None when this worker publishes no events.
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


_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))


# -- plain values -----------------------------------------------------------------------------------


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


def _as_plain_dict(obj: Any) -> dict[str, Any] | None:
    if obj is None:
        return None
    value = _jsonable(obj)
    return value if isinstance(value, dict) else None
