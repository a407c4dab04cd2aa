"""Real NATS and etcd servers for tests, on free loopback ports.

Import the fixtures into a ``conftest.py`` (or a test module)::

    from tests.servers import etcd_server, nats_server  # noqa: F401

or use :func:`running_nats` / :func:`running_etcd` as context managers. Each
server runs as a child process of the test run with its data in a temporary
directory; it is stopped by PID at the end, and the fixture asserts that the
process is gone. A test is skipped when the binary is not installed.
"""

from __future__ import annotations

import functools
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

__all__ = [
    "Server",
    "etcd_server",
    "free_port",
    "nats_server",
    "running_etcd",
    "running_nats",
    "start_etcd",
    "start_nats",
]

NATS_BIN = shutil.which("nats-server") or "/usr/sbin/nats-server"
ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
START_ATTEMPTS = 3  # a free port can be taken between picking it and binding it


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str  # what clients are given (NATS_SERVER / ETCD_ENDPOINTS)
    port: int
    data_dir: Path
    log_path: Path
    argv: list[str] | None = None  # how it was started (for restart)
    probe: Callable[[Server], bool] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it lingers; then assert the process is gone."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        assert self.proc.returncode is not None, f"{self.name} (pid {self.pid}) still running"
        assert not _alive(self.pid), f"{self.name} (pid {self.pid}) left behind"

    def start_again(self) -> None:
        """Start the stopped server again: same binary, port and data directory."""
        assert self.argv is not None and self.probe is not None and self.proc.poll() is not None
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if not _wait_until_answering(self, functools.partial(self.probe, self)):
            raise AssertionError(f"{self.name} did not come back on port {self.port}:\n{self.log()}")

    def restart(self) -> None:
        """SIGTERM it, then start it again on the same port (clients reconnect)."""
        self.stop()
        self.start_again()


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_answering(server: Server, probe: Callable[[], bool]) -> bool:
    """True once ``probe()`` succeeds; False if the process exited first (port taken...)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return False
        try:
            if probe():
                return True
        except (OSError, ValueError, httpx.HTTPError):
            pass
        time.sleep(0.05)
    server.stop()
    raise AssertionError(f"{server.name} did not answer on port {server.port} within {START_TIMEOUT}s:\n"
                         f"{server.log()}")


def _start(name: str, binary: str, tmp: Path, args_for: Callable[[int, int, Path], list[str]],
           url_for: Callable[[int], str], probe_for: Callable[[Server], bool]) -> Server:
    if not Path(binary).exists():
        pytest.skip(f"{name} is not installed ({binary})")
    last_log = ""
    for attempt in range(START_ATTEMPTS):
        port, peer_port = free_port(), free_port()
        data_dir = tmp / f"{name}-{attempt}-data"
        data_dir.mkdir(parents=True, exist_ok=True)
        log_path = tmp / f"{name}-{attempt}.log"
        argv = [binary, *args_for(port, peer_port, data_dir)]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = Server(name, proc, url_for(port), port, data_dir, log_path, argv, probe_for)
        if _wait_until_answering(server, functools.partial(probe_for, server)):
            return server
        last_log = server.log()
        server.stop()
    raise AssertionError(f"{name} failed to start {START_ATTEMPTS} times:\n{last_log}")


def _nats_answers(server: Server) -> bool:
    with socket.create_connection(("127.0.0.1", server.port), timeout=1.0) as sock:
        return sock.recv(4096).startswith(b"INFO ")


def _etcd_answers(server: Server) -> bool:
    r = httpx.get(f"{server.url}/health", timeout=1.0)
    return r.status_code == 200 and r.json().get("health") == "true"


def start_nats(tmp: Path) -> Server:
    """``nats-server -js -a 127.0.0.1 -p PORT -sd DIR`` (JetStream on, loopback only)."""
    return _start(
        "nats-server", NATS_BIN, tmp,
        lambda port, _peer, data: ["-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(data)],
        lambda port: f"nats://127.0.0.1:{port}",
        _nats_answers,
    )


def start_etcd(tmp: Path) -> Server:
    """A one-member etcd on loopback: client URL on PORT, peer URL on another free port."""
    def args(port: int, peer: int, data: Path) -> list[str]:
        client, peer_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer}"
        return ["--name", "test", "--data-dir", str(data),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", f"test={peer_url}", "--log-level", "warn"]

    return _start("etcd", ETCD_BIN, tmp, args, lambda port: f"http://127.0.0.1:{port}", _etcd_answers)


@contextmanager
def running_nats(tmp: Path) -> Iterator[Server]:
    server = start_nats(tmp)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def running_etcd(tmp: Path) -> Iterator[Server]:
    server = start_etcd(tmp)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One nats-server (JetStream) for the session; tests keep apart by namespace and bucket."""
    with running_nats(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One etcd for the session; tests keep apart by namespace."""
    with running_etcd(tmp_path_factory.mktemp("etcd")) as server:
        yield server
