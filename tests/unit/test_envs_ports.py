"""Port-valued DYN_* variables mean what their flags mean: where ``--X-port 0``
picks a free port, ``DYN_X_PORT=0`` does too; the KV event ports, which vLLM and
the relay must agree on before either binds, keep refusing 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import envs
from supervisor.config import OPTIONS, parse_args
from supervisor.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
# every port flag with a variable: (flag, variable, Config field)
PORT_FLAGS = [(opt.flag, opt.env, opt.dest) for opt in OPTIONS if opt.kind == "port" and opt.env]
KV_EVENT_PORT_VARS = ["DYN_VLLM_KV_EVENT_PORT", "DYN_VLLM_KV_EVENT_REPLAY_PORT"]


def test_the_port_flags_with_variables_are_the_ones_expected() -> None:
    assert {var for _, var, _ in PORT_FLAGS} == {"DYN_SYSTEM_PORT", "DYN_HTTP_PORT", "DYN_REQUEST_PLANE_PORT"}


@pytest.mark.parametrize(("flag", "var", "dest"), PORT_FLAGS, ids=[var or "" for _, var, _ in PORT_FLAGS])
def test_zero_from_the_variable_is_zero_from_the_flag(flag: str, var: str, dest: str) -> None:
    by_flag = parse_args(["--engine", "synthetic", flag, "0"], {})
    by_var = parse_args(["--engine", "synthetic"], {var: "0"})
    assert getattr(by_flag, dest) == getattr(by_var, dest) == 0
    assert by_var.sources[dest] == "env"
    assert envs.get(var, {var: " 0 "}) == 0


@pytest.mark.parametrize(("flag", "var", "dest"), PORT_FLAGS, ids=[var or "" for _, var, _ in PORT_FLAGS])
def test_a_fixed_port_from_the_variable_stays_in_the_registered_range(flag: str, var: str, dest: str) -> None:
    assert getattr(parse_args(["--engine", "synthetic"], {var: "20123"}), dest) == 20123
    for raw, reason in (("80", "port 80 is outside the registered range 1024-49151"),
                        ("-1", "port -1 is outside"), ("00x", "expected an integer port, got '00x'")):
        with pytest.raises(ConfigError) as info:
            parse_args(["--engine", "synthetic"], {var: raw})
        assert str(info.value).startswith(f"{flag}: {var}={raw!r}: ") and reason in str(info.value)


def test_the_event_plane_port_takes_zero_like_unset() -> None:
    assert envs.get("DYN_EVENT_PLANE_PORT", {"DYN_EVENT_PLANE_PORT": "0"}) == 0
    assert envs.get("DYN_EVENT_PLANE_PORT", {}) is None


@pytest.mark.parametrize("var", KV_EVENT_PORT_VARS)
def test_kv_event_ports_refuse_zero(var: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{var}='0': port 0 is outside the registered range 1024-49151"):
        envs.get(var, {var: "0"})
    with pytest.raises(ConfigError, match=rf"{var}='0'"):
        parse_args(["--engine", "synthetic"], {var: "0"})


def test_the_command_line_accepts_dyn_system_port_zero() -> None:
    """``DYN_SYSTEM_PORT=0 python -m supervisor --engine synthetic --check-config`` exits 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_")}
    done = subprocess.run([sys.executable, "-m", "supervisor", "--engine", "synthetic", "--check-config"],
                          cwd=REPO, env={**env, "DYN_SYSTEM_PORT": "0"}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert '"event": "config.valid"' in done.stderr
