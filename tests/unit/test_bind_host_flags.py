"""One address per listener: ``--http-host`` (the OpenAI front), ``--request-plane-host``
(the tcp request plane) and ``--system-host`` (the system server, whose /engine,
/loras and chaos routes must not follow the OpenAI port onto a public interface).
The new two take an IP address or localhost, nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from supervisor.config import Config, config_dump, format_help, parse_args
from supervisor.errors import ConfigError

HOSTS = [("--http-host", "DYN_HTTP_HOST", "http_host"), ("--request-plane-host", "DYN_REQUEST_PLANE_HOST",
                                                          "request_plane_host")]


def parse(*argv: str, env: Mapping[str, str] | None = None) -> Config:
    return parse_args(["--engine", "synthetic", *argv], dict(env or {}))


def test_defaults_expose_only_the_openai_port() -> None:
    c = parse()
    assert (c.http_host, c.request_plane_host, c.system_host) == ("0.0.0.0", "127.0.0.1", "127.0.0.1")
    assert all(c.sources[k] == "default" for k in ("http_host", "request_plane_host", "system_host"))
    dump = config_dump(c)["config"]
    assert dump["http_host"] == {"value": "0.0.0.0", "source": "default"}
    assert dump["request_plane_host"] == {"value": "127.0.0.1", "source": "default"}


@pytest.mark.parametrize(("flag", "var", "dest"), HOSTS)
@pytest.mark.parametrize(("given", "kept"), [("10.1.2.3", "10.1.2.3"), ("::1", "::1"), ("0.0.0.0", "0.0.0.0"),
                                             ("::", "::"), ("localhost", "localhost"), (" LocalHost ", "localhost"),
                                             ("fe80::1%eth0", "fe80::1%eth0")])
def test_addresses_from_the_flag_the_variable_and_a_file(flag: str, var: str, dest: str, given: str, kept: str,
                                                         tmp_path: Path) -> None:
    assert getattr(parse(flag, given), dest) == kept
    c = parse(env={var: given})
    assert (getattr(c, dest), c.sources[dest]) == (kept, "env")
    path = tmp_path / "w.yaml"
    path.write_text(f"{flag[2:]}: '{given}'\n")
    c = parse("--config", str(path))
    assert (getattr(c, dest), c.sources[dest]) == (kept, "file")


@pytest.mark.parametrize(("flag", "var", "dest"), HOSTS)
@pytest.mark.parametrize("bad", ["example.com", "10.0.0", "[::1]", "127.0.0.1:80", "*", "local host"])
def test_anything_else_is_refused_with_one_line(flag: str, var: str, dest: str, bad: str, tmp_path: Path) -> None:
    reason = f"expected an IP address (v4 or v6) or localhost, got {bad!r}"
    with pytest.raises(ConfigError) as info:
        parse(flag, bad)
    assert str(info.value) == f"argument {flag}: {reason}"
    with pytest.raises(ConfigError) as info:
        parse(env={var: bad})
    assert str(info.value) == f"{flag}: {var}={bad!r}: {reason}"
    path = tmp_path / "w.toml"
    path.write_text(f'{flag[2:]} = "{bad}"\n')
    with pytest.raises(ConfigError) as info:
        parse("--config", str(path))
    assert str(info.value) == f"{flag} in {path}: {reason}"


def test_the_help_says_what_each_address_is_for() -> None:
    text = " ".join(format_help(vllm_installed=False).split())
    assert "--http-host HTTP_HOST Address the OpenAI-compatible HTTP front binds" in text
    assert "[env DYN_HTTP_HOST] (default: 0.0.0.0)" in text
    assert "--request-plane-host REQUEST_PLANE_HOST Address the tcp request plane's listener binds" in text
    assert "[env DYN_REQUEST_PLANE_HOST] (default: 127.0.0.1)" in text


def test_the_kv_event_host_is_ipv4() -> None:
    assert parse(env={"DYN_VLLM_KV_EVENT_HOST": "localhost"}).kv_events_config == {
        "enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://127.0.0.1:20080",
        "replay_endpoint": "tcp://127.0.0.1:21080"}
    with pytest.raises(ConfigError, match=r"^DYN_VLLM_KV_EVENT_HOST='::1': vLLM's KV event sockets are IPv4 only"):
        parse(env={"DYN_VLLM_KV_EVENT_HOST": "::1"})
    with pytest.raises(ConfigError, match=r"^DYN_VLLM_KV_EVENT_HOST='kv.local': expected an IP address"):
        parse(env={"DYN_VLLM_KV_EVENT_HOST": "kv.local"})
