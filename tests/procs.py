"""Starting real worker processes for tests, and proving none is left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
TAG_VAR = "LLM_SUPERVISOR_TEST_TAG"


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Every live process whose environment carries ``tag`` (children inherit it)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid == os.getpid():
                continue
            if proc.environ().get(TAG_VAR) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


class Worker:
    """``python -m supervisor ...`` with JSON logs captured to a file."""

    def __init__(self, *args: str, env: dict[str, str | None] | None = None, cwd: Path | None = None) -> None:
        """``env`` adds to the environment; a None value removes the variable."""
        self.tag = uuid.uuid4().hex
        self.log_path = Path(tempfile.mkstemp(prefix="worker-", suffix=".log")[1])
        merged: dict[str, str | None] = {**os.environ, TAG_VAR: self.tag, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env = {k: v for k, v in merged.items() if v is not None}
        self.args = [sys.executable, "-m", "supervisor", "--log-format", "json", *args]
        self._log_file = self.log_path.open("wb")
        # its own session and process group: what it leaves behind is findable
        # even after vLLM renames its processes (setproctitle clobbers environ)
        self.proc = subprocess.Popen(
            self.args, stdout=self._log_file, stderr=subprocess.STDOUT, env=full_env, cwd=cwd or REPO,
            start_new_session=True,
        )
        self._offset = 0
        self._events: list[dict[str, Any]] = []

    # -- logs ----------------------------------------------------------------
    def events(self) -> list[dict[str, Any]]:
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        last_nl = chunk.rfind(b"\n")
        if last_nl >= 0:
            for line in chunk[: last_nl + 1].splitlines():
                try:
                    self._events.append(json.loads(line))
                except ValueError:
                    self._events.append({"event": "raw", "line": line.decode(errors="replace")})
            self._offset += last_nl + 1
        return self._events

    def wait_event(self, name: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events():
                if ev.get("event") == name and all(ev.get(k) == v for k, v in fields.items()):
                    return ev
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}) before {name}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name} event within {timeout}s:\n{self.tail()}")
            time.sleep(0.02)

    def tail(self, n: int = 120) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    # -- the system port ---------------------------------------------------
    @property
    def system_port(self) -> int:
        return int(self.wait_event("system.listening")["port"])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.system_port}{path}"

    def get(self, path: str, timeout: float = 5.0) -> httpx.Response:
        return httpx.get(self.url(path), timeout=timeout)

    def post(self, path: str, timeout: float = 5.0, **kw: Any) -> httpx.Response:
        return httpx.post(self.url(path), timeout=timeout, **kw)

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}) before ready:\n{self.tail()}")
            return _status(self, "/ready") == 200

        wait_until(ready, timeout, lambda: f"/ready 200\n{self.tail()}")

    # -- ending ------------------------------------------------------------
    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker did not exit within {timeout}s:\n{self.tail()}") from None

    def stop(self) -> None:
        """Make sure the worker and everything it started are gone."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for proc in self.processes():
            proc.kill()
        self._log_file.close()

    def processes(self) -> list[psutil.Process]:
        """Live processes of this worker: its environment tag, or its process group."""
        found = {p.pid: p for p in tagged_processes(self.tag)}
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.pid) == self.proc.pid and proc.status() != psutil.STATUS_ZOMBIE:
                    found[proc.pid] = proc
            except (psutil.Error, ProcessLookupError):
                continue
        return list(found.values())

    def leftovers(self, grace: float = 10.0) -> list[psutil.Process]:
        deadline = time.monotonic() + grace
        while True:
            left = self.processes()
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)


def _status(worker: Worker, path: str) -> int | None:
    try:
        return worker.get(path, timeout=2.0).status_code
    except httpx.HTTPError:
        return None


def wait_until(pred: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {text}")
        time.sleep(0.02)


def worker_fixture(*args: str, **kw: Any) -> Iterator[Worker]:
    worker = Worker(*args, **kw)
    try:
        yield worker
    finally:
        worker.stop()
        left = worker.leftovers(grace=5.0)
        assert not left, f"processes left behind: {[p.pid for p in left]}"


def ready_worker(workers: Iterator[Worker], timeout: float = 60.0) -> Iterator[Worker]:
    """The worker of a :func:`worker_fixture` generator once it is ready; stopped (and checked
    for leftovers) afterwards, also when it never became ready."""
    worker = next(workers)
    try:
        worker.wait_ready(timeout=timeout)
        yield worker
    finally:
        workers.close()


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A currently free loopback TCP port in the registered range (DYN_* ports must be 1024-49151),
    below Linux's ephemeral range (32768-60999), where an outgoing connection could take it
    between this check and the worker's bind."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


class VllmServe:
    """``vllm serve`` itself (``python -m vllm.entrypoints.openai.api_server``): the reference
    our answers are compared with. Started in its own session, stopped by its PID."""

    def __init__(self, *args: str, env: dict[str, str | None] | None = None) -> None:
        self.tag = uuid.uuid4().hex
        self.port = free_port()
        self.log_path = Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])
        merged: dict[str, str | None] = {**os.environ, TAG_VAR: self.tag, "PYTHONUNBUFFERED": "1",
                                         "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
                                         "VLLM_HOST_IP": "127.0.0.1", **(env or {})}
        self._log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args, "--host", "127.0.0.1",
             "--port", str(self.port)],
            env={k: v for k, v in merged.items() if v is not None}, stdout=self._log_file,
            stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 240.0) -> None:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"vllm serve exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                return httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout, lambda: f"vllm serve /health\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> list[psutil.Process]:
        """Stop it and everything it started; returns what was still alive afterwards."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()
        deadline = time.monotonic() + 10
        while (left := tagged_processes(self.tag)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for proc in left:
            proc.kill()
        return left
