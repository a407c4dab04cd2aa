"""``--check-config`` refuses exactly what start refuses: ``python -m supervisor ...``
with and without ``--check-config``, each exiting 2 with the same one line.

Synthetic-engine runs use a stand-in ``vllm`` package that refuses to be
imported (they must not pay vLLM's import); the model runs need vLLM's parser
(~10 s each), so they all start together in the background, once.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor.config import ConfigError, parse_args

REPO = Path(__file__).resolve().parents[2]
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
NO_VISION = "needs --model, a vision-language model's directory (the demo model is text only)"


@dataclass
class Run:
    returncode: int
    stderr: str

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]

    @property
    def started_something(self) -> bool:
        return "worker.starting" in self.stderr or '"actor.' in self.stderr


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "HF_")) and k != "PYTHONPATH"}
    env.update({"PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def start(args: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "supervisor", "--log-format", "json", "--system-port", "0",
                             *args], cwd=REPO, env=base_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> Run:
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # a worker that started although it should not have
        _, stderr = proc.communicate()
        raise AssertionError(f"still running after {timeout}s: {proc.args!r}\n{stderr[-3000:]}") from None
    return Run(proc.returncode, stderr)


@pytest.fixture(scope="module")
def no_vllm_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("guard")
    (root / "vllm").mkdir()
    (root / "vllm" / "__init__.py").write_text('raise ImportError("this run must not import vLLM")\n')
    return str(root)


# (name, arguments, environment, the one error line)
SYNTHETIC: list[tuple[str, list[str], dict[str, str], str]] = [
    ("role-encode", ["--role", "encode", "--enable-multimodal"], {}, f"error: --role encode: {NO_VISION}"),
    ("role-processor", ["--role", "processor", "--enable-multimodal"], {}, f"error: --role processor: {NO_VISION}"),
    ("multimodal-worker-from-env", ["--enable-multimodal"], {"DYN_VLLM_MULTIMODAL_WORKER": "1"},
     f"error: --multimodal-worker (from DYN_VLLM_MULTIMODAL_WORKER): {NO_VISION}"),
    ("multimodal-processor-text-model", ["--multimodal-processor", "--enable-multimodal", "--model", "TEXT_MODEL"], {},
     "error: --multimodal-processor: --model TEXT_MODEL cannot serve images: it has no vision tower "
     "(LlamaForCausalLM: no vision_config and image token in its config.json)"),
    ("durable-kv-events", ["--durable-kv-events"], {},
     "error: --durable-kv-events: needs the NATS event plane (JetStream): add --event-plane nats"),
]


@pytest.mark.parametrize(("name", "args", "env", "expected"), SYNTHETIC, ids=[c[0] for c in SYNTHETIC])
def test_check_config_and_start_refuse_alike(no_vllm_path: str, name: str, args: list[str], env: dict[str, str],
                                             expected: str) -> None:
    text_model = no_vllm_path + "/text-model"  # a directory with a text-only model's config.json
    Path(text_model).mkdir(exist_ok=True)
    (Path(text_model) / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "vocab_size": 300}')
    args = [text_model if a == "TEXT_MODEL" else a for a in args]
    expected = expected.replace("TEXT_MODEL", text_model)
    argv = ["--engine", "synthetic", "--discovery-backend", "mem", *args]
    checked = start([*argv, "--check-config"], {"PYTHONPATH": no_vllm_path, **env})
    started = start(argv, {"PYTHONPATH": no_vllm_path, **env})
    check, run = finish(checked, 60), finish(started, 60)
    for what, result in (("--check-config", check), ("start", run)):
        assert result.returncode == 2, f"{what}: {result.stderr[-2000:]}"
        assert result.error_lines() == [expected], what
        assert not result.started_something, what


def test_a_valid_configuration_still_passes(no_vllm_path: str) -> None:
    for args in (["--engine", "synthetic"],
                 ["--engine", "synthetic", "--role", "decode", "--request-plane", "nats", "--event-plane", "zmq"]):
        run = finish(start([*args, "--check-config"], {"PYTHONPATH": no_vllm_path}), 60)
        assert run.returncode == 0, run.stderr
        assert '"event": "config.valid"' in run.stderr and run.error_lines() == []


def test_build_tree_refuses_with_the_same_line() -> None:
    """Start's own check, for callers that build a tree without the CLI."""
    from supervisor.roles import build_tree

    for args, expected in ((["--durable-kv-events"], "--durable-kv-events: needs the NATS event plane (JetStream): "
                                                     "add --event-plane nats"),
                           (["--role", "encode", "--enable-multimodal"], f"--role encode: {NO_VISION}")):
        config = parse_args(["--engine", "synthetic", *args], {})
        with pytest.raises(ConfigError) as info:
            build_tree(config)
        assert str(info.value) == expected


# -- models (vLLM's parser: ~10 s per run, all started at once) ---------------------------------------------


def fake_hf_cache(root: Path, repo: str) -> Path:
    """A Hugging Face hub cache holding one model snapshot (what a download leaves behind)."""
    org, name = repo.split("/")
    model = root / f"models--{org}--{name}"
    commit = "0" * 40
    (model / "refs").mkdir(parents=True)
    (model / "refs" / "main").write_text(commit)
    snapshot = model / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    return root


MISSING_PATH = "error: --model /nonexistent: no such file or directory"
NOT_CACHED = ("error: --model acme/not-cached: no such directory, and not a model in the local Hugging Face cache "
              "(the worker runs offline, HF_HUB_OFFLINE=1): give a model directory")


@pytest.fixture(scope="module")
def model_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    if importlib.util.find_spec("vllm") is None:
        yield {}
        return
    cache = fake_hf_cache(tmp_path_factory.mktemp("hf") / "hub", "acme/cached")
    model_dir = tmp_path_factory.mktemp("model")
    env = {"HF_HUB_CACHE": str(cache)}
    cases = {
        "missing-check": ["--model", "/nonexistent", "--check-config"],
        "missing-start": ["--model", "/nonexistent"],
        "not-cached-check": ["--model", "acme/not-cached", "--check-config"],
        "not-cached-start": ["--model", "acme/not-cached"],
        "cached-check": ["--model", "acme/cached", "--check-config"],
        "directory-check": ["--model", str(model_dir), "--check-config"],
    }
    procs = {name: start(["--engine", "vllm", "--discovery-backend", "mem", *args], env)
             for name, args in cases.items()}
    try:
        yield {name: finish(proc, 300) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@needs_vllm
@pytest.mark.parametrize(("name", "expected"), [("missing", MISSING_PATH), ("not-cached", NOT_CACHED)])
def test_a_model_the_worker_would_not_find_is_refused_alike(model_runs: dict[str, Run], name: str,
                                                            expected: str) -> None:
    for run in (model_runs[f"{name}-check"], model_runs[f"{name}-start"]):
        assert run.returncode == 2, run.stderr[-2000:]
        assert run.error_lines() == [expected]
        assert not run.started_something


@needs_vllm
@pytest.mark.parametrize("name", ["cached-check", "directory-check"])
def test_a_model_directory_or_a_cached_model_passes(model_runs: dict[str, Run], name: str) -> None:
    run = model_runs[name]
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.error_lines() == []
