""":func:`parse_args`: argv + environment + config file -> a validated, frozen
:class:`~supervisor.config.schema.Config`, or a ConfigError.

The order of the steps is the order of the errors a user sees: the engine and the
role first, then vLLM's flags, names and identity, the single-flag rules, the
multimodal rules, and last the engine defaults (which may still refuse, e.g. a
NIXL worker with no routable address).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from .. import config as _package
from .. import envs
from ..errors import ConfigError
from .engine_defaults import (
    _apply_ec_transfer,
    _apply_kv_transfer,
    _apply_multimodal,
    _apply_reasoning,
    _apply_worker_defaults,
    _kv_events,
)
from .options import build_parser
from .rules import (
    MULTIMODAL_FLAGS,
    _check_connectors,
    _check_endpoint_types,
    _check_jinja_template,
    _check_multimodal,
    _check_served_model_name,
    _resolve_discovery_backend,
    _resolve_identity,
    _resolve_role,
)
from .schema import _CONFIG_FIELDS, Config, _frozen
from .sources import Source, _normalize_argv, _Settings, _split_config_file, expand_path
from .vllm_args import _engine_flags, format_help

FRONTEND_HTTP_PORT = 8000


def parse_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    """argv (without the program name) + environment -> Config, or ConfigError.

    ``--help`` prints both groups of flags and raises SystemExit(0).
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    # Looked up on the package at each call, so a replacement put there (tests
    # pretend vLLM is missing, or fix the detected address) is the one used.
    vllm_installed = bool(_package.vllm_available())
    tokens = _normalize_argv(argv)
    ns, rest = build_parser().parse_known_args(tokens)
    cli = dict(vars(ns))
    if cli.pop("help", False):
        sys.stdout.write(format_help(vllm_installed=vllm_installed))
        sys.stdout.flush()
        raise SystemExit(0)
    if "connector" in cli:  # nargs="+": one tuple per token
        cli["connector"] = tuple(part for chunk in cli["connector"] for part in chunk)

    file_path, file_ours, file_engine = _split_config_file(cli.pop("config", None), env)
    s = _Settings(cli, env, file_ours, file_path)
    warnings: list[str] = []

    # -- engine, role
    engine: str = s["engine"] or ("vllm" if vllm_installed else "synthetic")
    engine_source: Source = s.sources["engine"]
    if engine == "vllm" and not vllm_installed:
        raise ConfigError(f"{s.name('engine')} vllm: vLLM is not installed here (use --engine synthetic)")
    role, role_source, multimodal_role = _resolve_role(s, warnings)
    # how the user chose the multimodal role, for errors about it
    multimodal_flag = next((s.name(d) for d in MULTIMODAL_FLAGS if s[d]), s.name("role") if multimodal_role else None)

    # -- engine flags: vLLM's parser only when something needs it
    engine_args, engine_sources, vllm_loaded = _engine_flags(
        rest, file_engine, file_path, wants_vllm=engine == "vllm" and role != "frontend",
        vllm_installed=vllm_installed)

    # -- model names
    model = engine_args.get("model")
    served_model_name = _check_served_model_name(engine_args.get("served_model_name"))

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
    discovery_backend, sources["discovery_backend"] = _resolve_discovery_backend(s, warnings)

    # -- multimodal rules
    uses_ec = _check_multimodal(s, role, multimodal_role)
    ec_storage_path = expand_path(s["ec_storage_path"], env) if s["ec_storage_path"] else None

    # -- engine defaults
    engine_env = _apply_kv_transfer(s, engine_args, engine_sources, connectors, role=role, engine=engine, env=env,
                                    warnings=warnings, detect_host=_package.detect_side_channel_host)
    tp = int(engine_args.get("tensor_parallel_size") or 1)
    _apply_worker_defaults(engine_args, engine_sources, engine=engine, vllm_loaded=vllm_loaded)
    dp_rank_value = engine_args.get("data_parallel_rank")
    data_parallel_rank = int(dp_rank_value) if dp_rank_value is not None else None
    kv_events_port, replay_port = _kv_events(role, engine_args, engine_sources, env, data_parallel_rank,
                                             warnings)
    _apply_ec_transfer(s, engine_args, engine_sources, uses_ec=uses_ec, multimodal_role=multimodal_role,
                       ec_storage_path=ec_storage_path)
    _apply_multimodal(engine_args, engine_sources, multimodal_role=multimodal_role, engine=engine)
    _apply_reasoning(engine_args, engine_sources, reasoning_parser=s["reasoning_parser"],
                     source=s.sources["reasoning_parser"], engine=engine)

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
        http_host=s["http_host"],
        http_port=http_port,
        enable_chaos=s["enable_chaos"],
        synthetic_step_ms=s["synthetic_step_ms"],
        synthetic_die_after=s["synthetic_die_after"],
        synthetic_hang_after=s["synthetic_hang_after"],
        synthetic_load_s=s["synthetic_load_s"],
        synthetic_prefill_us_per_token=s["synthetic_prefill_us_per_token"],
        synthetic_kv_events=bool(s["synthetic_kv_events"]),
        health_check_interval=s["health_check_interval"],
        health_check_timeout=s["health_check_timeout"],
        canary_wait_time=s["canary_wait_time"],
        health_check_payload=_frozen(s["health_check_payload"]) if s["health_check_payload"] is not None else None,
        grace_period=s["grace_period"],
        discovery_backend=discovery_backend,
        request_plane=s["request_plane"],
        event_plane=s["event_plane"],
        request_plane_host=s["request_plane_host"],
        advertise_host=s["advertise_host"],
        request_plane_port=s["request_plane_port"],
        nats_server=s["nats_server"],
        etcd_endpoints=s["etcd_endpoints"],
        enable_local_indexer=s["enable_local_indexer"],
        durable_kv_events=s["durable_kv_events"],
        migration_limit=s["migration_limit"],
        router_mode=s["router_mode"],
        kv_overlap_score_weight=s["kv_overlap_score_weight"],
        router_temperature=s["router_temperature"],
        kv_events=bool(s["kv_events"]),
        active_decode_blocks_threshold=s["active_decode_blocks_threshold"],
        active_prefill_tokens_threshold=s["active_prefill_tokens_threshold"],
        enforce_disagg=bool(s["enforce_disagg"]),
        custom_jinja_template=template,
        endpoint_types=endpoint_types,
        tool_call_parser=s["tool_call_parser"],
        reasoning_parser=s["reasoning_parser"],
        use_vllm_tokenizer=s["use_vllm_tokenizer"],
        connectors=connectors,
        enable_multimodal=s["enable_multimodal"],
        multimodal_role=multimodal_role,
        multimodal_flag=multimodal_flag,
        mm_prompt_template=s["mm_prompt_template"],
        ec_connector_backend=s["ec_connector_backend"],
        ec_storage_path=ec_storage_path,
        ec_extra_config=_frozen(ec_extra) if ec_extra is not None else None,
        ec_consumer_mode=s["ec_consumer_mode"],
        embedding_transfer_mode=s["embedding_transfer_mode"],
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

