"""supervisor.envs: lazy, validated access to every DYN_* variable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor import envs
from supervisor.errors import ConfigError

PORT_VARS = sorted(name for name, var in envs.VARIABLES.items() if var.is_port)
BOOL_VARS = sorted(name for name, var in envs.VARIABLES.items() if var.parse is envs.parse_bool)


def test_every_variable_the_spec_names_is_registered() -> None:
    """Section 1 names these (and every Dynamo flag's fallback); section 4 the health ones."""
    named = {
        "DYN_NAMESPACE", "DYN_COMPONENT", "DYN_ENDPOINT", "DYN_DISCOVERY_BACKEND", "DYN_STORE_KV",
        "DYN_REQUEST_PLANE", "DYN_EVENT_PLANE", "DYN_ENABLE_LOCAL_INDEXER", "DYN_DURABLE_KV_EVENTS",
        "DYN_MIGRATION_LIMIT", "DYN_CUSTOM_JINJA_TEMPLATE", "DYN_ENDPOINT_TYPES", "DYN_TOOL_CALL_PARSER",
        "DYN_REASONING_PARSER", "DYN_VLLM_USE_TOKENIZER", "DYN_DUMP_CONFIG_TO", "DYN_CONNECTOR",
        "DYN_SYSTEM_PORT", "DYN_HTTP_PORT", "DYN_VLLM_KV_EVENT_PORT", "DYN_HEALTH_CHECK_PAYLOAD",
        "DYN_CANARY_WAIT_TIME", "DYN_HEALTH_CHECK_REQUEST_TIMEOUT", "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS",
    }
    assert named <= set(envs.names())
    assert all(name.startswith("DYN_") for name in envs.names())


def test_defaults_when_unset() -> None:
    assert envs.get("DYN_NAMESPACE", {}) == "dynamo"
    assert envs.get("DYN_VLLM_KV_EVENT_PORT", {}) == 20080
    assert envs.get("DYN_HEALTH_CHECK_REQUEST_TIMEOUT", {}) == 3.0
    assert envs.get("DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS", {}) == 5.0
    assert envs.get("DYN_CANARY_WAIT_TIME", {}) == 10.0
    assert envs.get("DYN_DISCOVERY_BACKEND", {}) == "file"
    assert envs.get("DYN_HTTP_PORT", {}) is None


def test_empty_value_counts_as_unset() -> None:
    assert envs.get("DYN_NAMESPACE", {"DYN_NAMESPACE": "  "}) == "dynamo"
    assert not envs.is_set("DYN_NAMESPACE", {"DYN_NAMESPACE": ""})


def test_module_attributes_read_the_environment_when_accessed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lazy: nothing is cached at import, every access reads os.environ again."""
    monkeypatch.setenv("DYN_NAMESPACE", "first")
    assert envs.DYN_NAMESPACE == "first"
    monkeypatch.setenv("DYN_NAMESPACE", "second")
    assert envs.DYN_NAMESPACE == "second"
    monkeypatch.setenv("DYN_VLLM_KV_EVENT_PORT", "not-a-port")
    with pytest.raises(ConfigError, match=r"^DYN_VLLM_KV_EVENT_PORT='not-a-port': expected an integer port"):
        _ = envs.DYN_VLLM_KV_EVENT_PORT


def test_unknown_names_are_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="DYN_NOPE"):
        _ = envs.DYN_NOPE
    with pytest.raises(AttributeError, match="DYN_NOPE"):
        envs.is_set("DYN_NOPE")


def test_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYN_SYSTEM_PORT", raising=False)
    assert not envs.is_set("DYN_SYSTEM_PORT")
    monkeypatch.setenv("DYN_SYSTEM_PORT", "9000")
    assert envs.is_set("DYN_SYSTEM_PORT")
    assert envs.is_set("DYN_SYSTEM_PORT", {"DYN_SYSTEM_PORT": "bogus"})  # set, even if invalid
    assert not envs.is_set("DYN_SYSTEM_PORT", {})


@pytest.mark.parametrize("name", PORT_VARS)
@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("http", "expected an integer port, got 'http'"),
        ("80.5", "expected an integer port"),
        ("80", "port 80 is outside the registered range 1024-49151"),
        ("1023", "port 1023 is outside the registered range 1024-49151"),
        ("49152", "port 49152 is outside the registered range 1024-49151"),
        ("-1", "port -1 is outside"),
    ],
)
def test_port_variables_must_be_registered_ports(name: str, raw: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        envs.get(name, {name: raw})
    message = str(info.value)
    assert message.startswith(f"{name}={raw!r}: ")
    assert reason in message
    assert "\n" not in message


@pytest.mark.parametrize("name", PORT_VARS)
def test_port_range_edges_are_accepted(name: str) -> None:
    assert envs.get(name, {name: "1024"}) == 1024
    assert envs.get(name, {name: " 49151 "}) == 49151


@given(st.integers(min_value=-(10**6), max_value=10**6))
def test_any_integer_port_is_accepted_exactly_in_range(port: int) -> None:
    env = {"DYN_VLLM_KV_EVENT_PORT": str(port)}
    if 1024 <= port <= 49151:
        assert envs.get("DYN_VLLM_KV_EVENT_PORT", env) == port
    else:
        with pytest.raises(ConfigError, match="outside the registered range 1024-49151"):
            envs.get("DYN_VLLM_KV_EVENT_PORT", env)


@pytest.mark.parametrize("name", BOOL_VARS)
def test_booleans_accept_the_usual_spellings(name: str) -> None:
    for raw in ("true", "1", "yes", "on", "TRUE", "On"):
        assert envs.get(name, {name: raw}) is True
    for raw in ("false", "0", "no", "off", "OFF"):
        assert envs.get(name, {name: raw}) is False
    with pytest.raises(ConfigError, match=rf"^{name}='maybe': expected one of true/1/yes/on or false/0/no/off"):
        envs.get(name, {name: "maybe"})


def test_choices_are_validated_and_case_insensitive() -> None:
    assert envs.get("DYN_REQUEST_PLANE", {"DYN_REQUEST_PLANE": "NATS"}) == "nats"
    with pytest.raises(ConfigError, match=r"DYN_REQUEST_PLANE='udp': expected one of tcp, nats, http"):
        envs.get("DYN_REQUEST_PLANE", {"DYN_REQUEST_PLANE": "udp"})


def test_numbers_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"DYN_MIGRATION_LIMIT='-1': must be >= 0"):
        envs.get("DYN_MIGRATION_LIMIT", {"DYN_MIGRATION_LIMIT": "-1"})
    with pytest.raises(ConfigError, match=r"DYN_HEALTH_CHECK_REQUEST_TIMEOUT='0': must be > 0"):
        envs.get("DYN_HEALTH_CHECK_REQUEST_TIMEOUT", {"DYN_HEALTH_CHECK_REQUEST_TIMEOUT": "0"})
    with pytest.raises(ConfigError, match=r"DYN_CANARY_WAIT_TIME='soon': expected a number"):
        envs.get("DYN_CANARY_WAIT_TIME", {"DYN_CANARY_WAIT_TIME": "soon"})
    with pytest.raises(ConfigError, match="expected a finite number"):
        envs.get("DYN_CANARY_WAIT_TIME", {"DYN_CANARY_WAIT_TIME": "nan"})
    grace = "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS"
    assert envs.get(grace, {grace: "0.5"}) == 0.5


def test_lists_split_on_commas_and_spaces() -> None:
    assert envs.get("DYN_CONNECTOR", {"DYN_CONNECTOR": "kvbm, nixl lmcache"}) == ("kvbm", "nixl", "lmcache")
    assert envs.get("DYN_ENDPOINT_TYPES", {}) == ("chat", "completions")


def test_dyn_log_takes_dynamo_filter_strings() -> None:
    assert envs.get("DYN_LOG", {"DYN_LOG": "debug"}) == "debug"
    assert envs.get("DYN_LOG", {"DYN_LOG": "WARN,dynamo_runtime=trace"}) == "warning"
    with pytest.raises(ConfigError, match="DYN_LOG='loud'"):
        envs.get("DYN_LOG", {"DYN_LOG": "loud"})


def test_health_check_payload_is_json_or_a_file(tmp_path: Path) -> None:
    payload = {"token_ids": [1], "stop_conditions": {"max_tokens": 1}}
    assert envs.get("DYN_HEALTH_CHECK_PAYLOAD", {"DYN_HEALTH_CHECK_PAYLOAD": json.dumps(payload)}) == payload
    path = tmp_path / "canary.json"
    path.write_text(json.dumps(payload))
    assert envs.get("DYN_HEALTH_CHECK_PAYLOAD", {"DYN_HEALTH_CHECK_PAYLOAD": f"@{path}"}) == payload
    with pytest.raises(ConfigError, match=r"DYN_HEALTH_CHECK_PAYLOAD='\[1\]': expected a JSON object, got list"):
        envs.get("DYN_HEALTH_CHECK_PAYLOAD", {"DYN_HEALTH_CHECK_PAYLOAD": "[1]"})
    with pytest.raises(ConfigError, match="cannot read"):
        envs.get("DYN_HEALTH_CHECK_PAYLOAD", {"DYN_HEALTH_CHECK_PAYLOAD": f"@{tmp_path / 'missing.json'}"})


def test_ec_extra_config_must_be_a_json_object() -> None:
    with pytest.raises(ConfigError, match="DYN_VLLM_EC_EXTRA_CONFIG='nope': expected a JSON object, got invalid JSON"):
        envs.get("DYN_VLLM_EC_EXTRA_CONFIG", {"DYN_VLLM_EC_EXTRA_CONFIG": "nope"})
    assert envs.get("DYN_VLLM_EC_EXTRA_CONFIG", {"DYN_VLLM_EC_EXTRA_CONFIG": '{"a": 1}'}) == {"a": 1}
