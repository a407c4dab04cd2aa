"""The real command line: ``python -m supervisor ... --check-config --dump-config-to FILE``.

Synthetic-engine runs take ~0.5 s: they run with a stand-in ``vllm`` package
first on the path that raises on import, which proves they never import vLLM.
Runs that need vLLM's parser cost ~10 s each, so they are few and start
together, in parallel, the first time one of them is needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    dump_path: Path | None

    @property
    def dump(self) -> dict[str, Any]:
        assert self.dump_path is not None and self.dump_path.exists(), self.stderr
        data: dict[str, Any] = json.loads(self.dump_path.read_text())
        return data

    def value(self, key: str) -> Any:
        return self.dump["config"][key]["value"]

    def source(self, key: str) -> str:
        return str(self.dump["config"][key]["source"])

    def engine_arg(self, key: str) -> Any:
        return self.dump["engine_args"][key]["value"]

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DYN_") and k not in ("VLLM_NIXL_SIDE_CHANNEL_HOST", "PYTHONPATH")}
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    env.update(extra or {})
    return env


@pytest.fixture(scope="module")
def no_vllm_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ``vllm`` package that refuses to be imported, first on PYTHONPATH."""
    root = tmp_path_factory.mktemp("guard")
    (root / "vllm").mkdir()
    (root / "vllm" / "__init__.py").write_text('raise ImportError("this run must not import vLLM")\n')
    return str(root)


def start(args: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "supervisor", *args], cwd=REPO, env=base_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], dump: Path | None, timeout: float = 120) -> Run:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"timed out: {proc.args!r}\n{stderr}") from None
    return Run(proc.returncode, stdout, stderr, dump)


@pytest.fixture
def synthetic(tmp_path: Path, no_vllm_path: str) -> Any:
    """Run ``python -m supervisor --engine synthetic ... --dump-config-to DUMP`` without vLLM."""

    def run(*args: str, env: Mapping[str, str] | None = None, check: bool = True, dump: bool = True) -> Run:
        dump_path = tmp_path / "dump.json" if dump else None
        argv = ["--engine", "synthetic", *args]
        if check:
            argv.append("--check-config")
        if dump_path is not None:
            argv += ["--dump-config-to", str(dump_path)]
        return finish(start(argv, {"PYTHONPATH": no_vllm_path, **(env or {})}), dump_path, timeout=60)

    return run


class _Background:
    """Processes started early (they overlap with the quick tests), finished on first use."""

    def __init__(self, procs: dict[str, tuple[subprocess.Popen[str], Path | None]]) -> None:
        self._procs = procs
        self._done: dict[str, Run] = {}

    def __getitem__(self, name: str) -> Run:
        if name not in self._done:
            proc, dump = self._procs[name]
            self._done[name] = finish(proc, dump, timeout=300)
        return self._done[name]

    def close(self) -> None:
        for proc, _ in self._procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


# -- synthetic engine: no vLLM import ------------------------------------------------------------------


def test_check_config_writes_the_dump_and_starts_nothing(synthetic: Any) -> None:
    run = synthetic()
    assert run.returncode == 0, run.stderr
    assert "worker.starting" not in run.stderr and "actor.started" not in run.stderr
    assert '"event": "config.valid"' in run.stderr
    assert run.dump["config"]["role"] == {"value": "agg", "source": "default"}
    assert run.dump["config"]["engine"] == {"value": "synthetic", "source": "cli"}
    assert run.dump["config"]["check_config"] == {"value": True, "source": "cli"}
    assert (run.value("namespace"), run.value("component"), run.value("endpoint")) == ("dynamo", "backend", "generate")
    assert run.value("system_port") == 0 and run.value("discovery_backend") == "file"
    assert run.value("health_check_timeout") == 3.0 and run.value("grace_period") == 5.0
    assert run.dump["warnings"] == [] and run.dump["config_file"] is None


def test_engine_defaults_in_the_dump(synthetic: Any) -> None:
    run = synthetic()
    assert run.dump["engine_args"]["enable_prefix_caching"] == {"value": True, "source": "default"}
    assert run.engine_arg("disable_log_stats") is False
    assert run.engine_arg("enable_log_requests") is False
    assert run.engine_arg("block_size") == 16
    assert run.engine_arg("kv_events_config") == {"enable_kv_cache_events": True, "publisher": "zmq",
                                                  "endpoint": "tcp://127.0.0.1:20080",
                                                  "replay_endpoint": "tcp://127.0.0.1:21080"}
    assert run.value("kv_events_port") == 20080


def test_precedence_on_the_real_command_line(synthetic: Any, tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('namespace = "file"\nrequest-plane = "nats"\nmigration_limit = 3\nevent-plane = "nats"\n'
                      'model = "from-file"\n')
    run = synthetic("--event-plane", "zmq", "--config", str(config),
                    env={"DYN_NAMESPACE": "env", "DYN_REQUEST_PLANE": "tcp", "DYN_EVENT_PLANE": "nats"})
    assert run.returncode == 0, run.stderr
    assert run.dump["config"]["namespace"] == {"value": "env", "source": "env"}
    assert run.dump["config"]["request_plane"] == {"value": "tcp", "source": "env"}
    assert run.dump["config"]["event_plane"] == {"value": "zmq", "source": "cli"}
    assert run.dump["config"]["migration_limit"] == {"value": 3, "source": "file"}
    assert run.dump["config"]["durable_kv_events"] == {"value": False, "source": "default"}
    assert run.dump["config"]["model"] == {"value": "from-file", "source": "file"}
    assert run.dump["config_file"] == str(config)


def test_yaml_config_file(synthetic: Any, tmp_path: Path) -> None:
    config = tmp_path / "worker.yaml"
    config.write_text("role: prefill\nconnector: [lmcache]\nsystem_port: 9444\n")
    run = synthetic("--config", str(config))
    assert run.returncode == 0, run.stderr
    assert (run.value("role"), run.value("component"), run.value("system_port")) == ("prefill", "prefill", 9444)
    assert run.dump["engine_args"]["kv_transfer_config"] == {
        "value": {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}, "source": "file"}


def test_legacy_flag_warns_once_and_maps_to_the_role(synthetic: Any) -> None:
    run = synthetic("--is-prefill-worker", "--is-prefill-worker")
    assert run.returncode == 0, run.stderr
    assert run.dump["config"]["role"] == {"value": "prefill", "source": "cli"}
    assert run.value("component") == "prefill"
    assert run.stderr.count("deprecated") == 1
    assert "--is-prefill-worker is deprecated: use --role prefill" in run.stderr
    assert run.dump["warnings"] == ["--is-prefill-worker is deprecated: use --role prefill"]


@pytest.mark.parametrize(("args", "component"), [  # encode is not served yet: --check-config refuses it
    (("--role", "prefill"), "prefill"),
    (("--role", "decode"), "backend"),
])
def test_component_follows_the_role(synthetic: Any, args: tuple[str, ...], component: str) -> None:
    run = synthetic(*args)
    assert run.returncode == 0, run.stderr
    assert run.value("component") == component


def test_endpoint_says_otherwise(synthetic: Any) -> None:
    run = synthetic("--role", "prefill", env={"DYN_ENDPOINT": "dyn://ns9.pf.serve"})
    assert (run.value("namespace"), run.value("component"), run.value("endpoint")) == ("ns9", "pf", "serve")
    assert run.source("endpoint") == "env"


def test_decode_workers_publish_no_kv_events(synthetic: Any) -> None:
    run = synthetic("--role", "decode", env={"DYN_VLLM_KV_EVENT_PORT": "24000"})
    assert run.engine_arg("kv_events_config") is None and run.value("kv_events_port") is None


def test_kv_event_port_variable(synthetic: Any) -> None:
    run = synthetic(env={"DYN_VLLM_KV_EVENT_PORT": "24000"})
    assert run.engine_arg("kv_events_config")["endpoint"] == "tcp://127.0.0.1:24000"
    assert run.dump["engine_args"]["kv_events_config"]["source"] == "env"


def test_nixl_defaults(synthetic: Any) -> None:
    run = synthetic("--connector", "nixl", env={"VLLM_NIXL_SIDE_CHANNEL_HOST": "10.3.3.3"})
    assert run.engine_arg("kv_transfer_config") == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
    assert run.engine_arg("distributed_executor_backend") == "mp"
    assert run.value("engine_env") == {}


def test_dump_path_from_the_environment(tmp_path: Path, no_vllm_path: str) -> None:
    target = tmp_path / "deep" / "from-env.json"
    run = finish(start(["--engine", "synthetic", "--check-config"],
                       {"PYTHONPATH": no_vllm_path, "DYN_DUMP_CONFIG_TO": str(target)}), target)
    assert run.returncode == 0, run.stderr
    assert run.dump["config"]["dump_config_to"] == {"value": str(target), "source": "env"}


def test_dump_without_check_config_then_the_worker_runs(tmp_path: Path, no_vllm_path: str) -> None:
    dump = tmp_path / "dump.json"
    proc = start(["--engine", "synthetic", "--system-port", "0", "--discovery-backend", "mem", "--log-format", "json",
                  "--dump-config-to", str(dump)], {"PYTHONPATH": no_vllm_path})
    try:
        deadline = time.monotonic() + 30
        while not dump.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dump.exists(), "no dump written"
        assert json.loads(dump.read_text())["config"]["check_config"]["value"] is False
        time.sleep(0.5)
        assert proc.poll() is None, "the worker should be running"
    finally:
        proc.send_signal(signal.SIGTERM)
        run = finish(proc, dump, timeout=30)
    assert run.returncode == 0, run.stderr
    assert "worker.starting" in run.stderr


RULES: list[tuple[str, list[str], dict[str, str], str]] = [
    ("multimodal-exclusive", ["--multimodal-worker", "--multimodal-decode-worker", "--enable-multimodal"], {},
     "error: only one multimodal role at a time: got --multimodal-worker, --multimodal-decode-worker"),
    ("multimodal-enable", ["--multimodal-encode-worker"], {},
     "error: --multimodal-encode-worker needs --enable-multimodal (multimodal roles are off unless enabled)"),
    ("endpoint-form", ["--endpoint", "dyn://ns.backend"], {},
     "error: --endpoint: 'dyn://ns.backend' is not an endpoint: expected dyn://namespace.component.endpoint "
     "(or namespace.component.endpoint), exactly three parts of letters, digits, '-' or '_'"),
    ("connector-none", ["--connector", "none", "kvbm"], {},
     "error: --connector: none means no connector and cannot be combined with others (got none kvbm)"),
    ("legacy-contradiction", ["--role", "decode", "--disaggregation-mode", "prefill"], {},
     "error: --role decode contradicts --disaggregation-mode prefill: give one role"),
    ("legacy-env-contradiction", ["--is-decode-worker"], {"DYN_VLLM_IS_PREFILL_WORKER": "on"},
     "error: --is-prefill-worker (from DYN_VLLM_IS_PREFILL_WORKER) contradicts --is-decode-worker: give one role"),
    ("system-port-var", [], {"DYN_SYSTEM_PORT": "80"},
     "error: --system-port: DYN_SYSTEM_PORT='80': port 80 is outside the registered range 1024-49151 "
     "(below are privileged ports, above is the kernel's ephemeral range)"),
    ("kv-event-port-var", [], {"DYN_VLLM_KV_EVENT_PORT": "twenty"},
     "error: DYN_VLLM_KV_EVENT_PORT='twenty': expected an integer port, got 'twenty'"),
    ("http-port-var", [], {"DYN_HTTP_PORT": "50000"},
     "error: --http-port: DYN_HTTP_PORT='50000': port 50000 is outside the registered range 1024-49151 "
     "(below are privileged ports, above is the kernel's ephemeral range)"),
    ("served-names", ["--model", "m", "--served-model-name", "a", "b"], {},
     "error: --served-model-name: only one served model name is supported, got 2 (a, b)"),
    ("ec-storage", ["--vllm-native-encoder-worker", "--enable-multimodal"], {},
     "error: --vllm-native-encoder-worker: --ec-storage-path is required by the ECExampleConnector backend "
     "(the shared directory encoder outputs are written to and read from)"),
    ("ec-extra", ["--ec-extra-config", "[1]"], {},
     "error: argument --ec-extra-config: expected a JSON object, got list '[1]'"),
    ("ec-extra-env", [], {"DYN_VLLM_EC_EXTRA_CONFIG": "{oops"},
     "error: --ec-extra-config: DYN_VLLM_EC_EXTRA_CONFIG='{oops': expected a JSON object, got invalid JSON "
     "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ("store-kv", ["--store-kv", "etcd", "--discovery-backend", "mem"], {},
     "error: --store-kv etcd contradicts --discovery-backend mem"),
    ("bad-role", ["--role", "nonsense"], {},
     "error: argument --role: expected one of agg, decode, prefill, encode, processor, frontend, got 'nonsense'"),
    ("bad-bool-var", [], {"DYN_ENABLE_LOCAL_INDEXER": "sometimes"},
     "error: --enable-local-indexer: DYN_ENABLE_LOCAL_INDEXER='sometimes': expected one of true/1/yes/on or "
     "false/0/no/off, got 'sometimes'"),
]


@pytest.fixture(scope="module")
def rule_runs(tmp_path_factory: pytest.TempPathFactory, no_vllm_path: str) -> Iterator[_Background]:
    """Every rule's run, all started at once (each is ~0.5 s of CPU)."""
    tmp = tmp_path_factory.mktemp("rules")
    procs: dict[str, tuple[subprocess.Popen[str], Path | None]] = {}
    for name, args, env, _ in RULES:
        dump = tmp / f"{name}.json"
        argv = ["--engine", "synthetic", *args, "--check-config", "--dump-config-to", str(dump)]
        procs[name] = (start(argv, {"PYTHONPATH": no_vllm_path, **env}), dump)
    runs = _Background(procs)
    yield runs
    runs.close()


@pytest.mark.parametrize(("name", "args", "env", "expected"), RULES, ids=[r[0] for r in RULES])
def test_each_rule_exits_2_with_one_clear_line(rule_runs: _Background, name: str, args: list[str],
                                               env: dict[str, str], expected: str) -> None:
    run = rule_runs[name]
    assert run.returncode == 2, run.stderr
    assert run.error_lines() == [expected]
    assert run.stderr.strip().splitlines()[-1] == expected
    assert run.dump_path is not None and not run.dump_path.exists()


@pytest.mark.parametrize(("name", "args", "env", "expected"), [RULES[0], RULES[5], RULES[6]],
                         ids=[RULES[0][0], RULES[5][0], RULES[6][0]])
def test_invalid_configuration_starts_nothing(synthetic: Any, name: str, args: list[str], env: dict[str, str],
                                              expected: str) -> None:
    """Without --check-config the worker would start: an invalid configuration stops it first."""
    run = synthetic(*args, env=env, check=False)
    assert run.returncode == 2, run.stderr
    assert run.error_lines() == [expected]
    assert "worker.starting" not in run.stderr and "actor." not in run.stderr


def test_missing_jinja_template_path_is_expanded(synthetic: Any, tmp_path: Path) -> None:
    run = synthetic("--custom-jinja-template", "$TPL/none.jinja", env={"TPL": str(tmp_path)})
    assert run.returncode == 2
    assert run.error_lines() == [f"error: --custom-jinja-template: file not found: {tmp_path / 'none.jinja'}"]


def test_jinja_template_found_with_home_expanded(synthetic: Any, tmp_path: Path) -> None:
    (tmp_path / "chat.jinja").write_text("{{ messages }}")
    run = synthetic("--custom-jinja-template", "~/chat.jinja", env={"HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    assert run.dump["config"]["custom_jinja_template"] == {"value": str(tmp_path / "chat.jinja"), "source": "cli"}


def test_missing_config_file(synthetic: Any, tmp_path: Path) -> None:
    run = synthetic("--config", str(tmp_path / "nope.yaml"))
    assert run.returncode == 2
    assert run.error_lines() == [f"error: --config {tmp_path / 'nope.yaml'}: file not found ({tmp_path / 'nope.yaml'})"]


# -- runs that need vLLM's parser: started together ---------------------------------------------------

_KV = '{"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}'


@pytest.fixture(scope="module", autouse=True)
def vllm_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Background]:
    if importlib.util.find_spec("vllm") is None:
        yield _Background({})
        return
    tmp = tmp_path_factory.mktemp("vllm-runs")
    model = tmp / "tiny"
    model.mkdir()  # --check-config refuses a model that is not there
    config = tmp / "engine.yaml"
    config.write_text("max-model-len: 1024\nenforce-eager: true\nnamespace: filens\nrequest-plane: nats\n")
    cases: dict[str, tuple[list[str], dict[str, str], Path | None]] = {
        "full": (["--config", str(config), "--model", str(model), "--max-model-len", "512", "--connector", "nixl",
                  "--served-model-name", "public", "--data-parallel-rank", "1", "--is-prefill-worker",
                  "--check-config", "--dump-config-to", str(tmp / "full.json")],
                 {"DYN_VLLM_KV_EVENT_PORT": "23000", "VLLM_NIXL_SIDE_CHANNEL_HOST": "10.1.2.3",
                  "DYN_NAMESPACE": "envns"}, tmp / "full.json"),
        "unknown": (["--engine", "synthetic", "--no-such-flag", "3", "--check-config"], {}, None),
        "exclusive": (["--connector", "lmcache", "--kv-transfer-config", _KV], {}, None),
        "help": (["--help"], {}, None),
    }
    runs = _Background({name: (start(args, env), dump) for name, (args, env, dump) in cases.items()})
    yield runs
    runs.close()


@needs_vllm
def test_vllm_flags_reach_the_engine_args(vllm_runs: _Background) -> None:
    run = vllm_runs["full"]
    assert run.returncode == 0, run.stderr
    args = run.dump["engine_args"]
    assert Path(args["model"]["value"]).name == "tiny" and args["model"]["source"] == "cli"
    assert args["max_model_len"] == {"value": 512, "source": "cli"}  # command line beats the file
    assert args["enforce_eager"] == {"value": True, "source": "file"}
    assert args["block_size"] == {"value": 128, "source": "default"}  # the CPU backend's size
    assert args["served_model_name"] == {"value": ["public"], "source": "cli"}
    assert args["data_parallel_rank"] == {"value": 1, "source": "cli"}
    assert args["kv_transfer_config"] == {"value": {"kv_connector": "NixlConnector", "kv_role": "kv_both"},
                                          "source": "cli"}
    assert args["distributed_executor_backend"] == {"value": "mp", "source": "default"}
    assert args["kv_events_config"] == {"value": {"enable_kv_cache_events": True, "publisher": "zmq",
                                                  "endpoint": "tcp://127.0.0.1:22999",
                                                  "replay_endpoint": "tcp://127.0.0.1:23999"},
                                        "source": "env"}
    assert args["enable_prefix_caching"] == {"value": True, "source": "default"}
    assert args["disable_log_stats"]["value"] is False and args["enable_log_requests"]["value"] is False
    assert run.dump["config"]["engine"] == {"value": "vllm", "source": "default"}
    assert run.dump["config"]["namespace"] == {"value": "envns", "source": "env"}  # env beats the file
    assert run.dump["config"]["request_plane"] == {"value": "nats", "source": "file"}
    assert run.dump["config"]["role"] == {"value": "prefill", "source": "cli"}
    assert run.dump["config"]["served_model_name"]["value"] == "public"
    assert run.dump["config"]["kv_events_port"]["value"] == 23000
    assert run.stderr.count("is deprecated") == 1


@needs_vllm
def test_unknown_flag_is_named(vllm_runs: _Background) -> None:
    run = vllm_runs["unknown"]
    assert run.returncode == 2
    assert run.error_lines() == ["error: unrecognized arguments: --no-such-flag 3"]


@needs_vllm
def test_connector_and_kv_transfer_config_exclusive_and_nothing_started(vllm_runs: _Background) -> None:
    run = vllm_runs["exclusive"]
    assert run.returncode == 2
    assert run.error_lines() == ["error: --connector and --kv-transfer-config are mutually exclusive: give one of them"]
    assert "worker.starting" not in run.stderr


@needs_vllm
def test_help_shows_both_groups(vllm_runs: _Background) -> None:
    run = vllm_runs["help"]
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: python -m supervisor")
    assert "Dynamo worker options:" in run.stdout
    assert "Legacy role flags (deprecated: use --role):" in run.stdout
    assert "vLLM engine options (AsyncEngineArgs, passed through to vLLM):" in run.stdout
    for flag in ("--namespace", "--discovery-backend", "--connector", "--dump-config-to", "--check-config",
                 "--max-model-len", "--kv-events-config", "--tensor-parallel-size"):
        assert f"  {flag}" in run.stdout
