"""What a running real-vLLM worker listens on: only the OpenAI HTTP front may be on
every interface (``--http-host``, 0.0.0.0 by default, as ``vllm serve``); the system
server, the request plane, the event plane, the KV event relay (which vLLM's
publisher connects to) and vLLM's KV event replay socket stay on loopback.

Every process of the worker is inspected: the worker, its reaper and vLLM's
engine core process(es).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import start_vllm_worker
from tests.kvfake import free_port_pair
from tests.procs import Worker, ready_worker

pytestmark = pytest.mark.vllm

WILDCARDS = ("0.0.0.0", "::")


@pytest.fixture(scope="module")
def kv_port() -> int:
    return free_port_pair()


@pytest.fixture(scope="module")
def worker(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, kv_port: int) -> Iterator[Worker]:
    yield from ready_worker(start_vllm_worker(tiny_model, tmp_path_factory.mktemp("bind-hosts"), "--http-port", "0",
                                              kv_port=kv_port), timeout=180)


def listeners(worker: Worker) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening TCP socket of the worker's processes."""
    root = psutil.Process(worker.proc.pid)
    procs = {p.pid: p for p in [root, *root.children(recursive=True), *worker.processes()]}
    found = []
    for proc in procs.values():
        try:
            name = proc.name()
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        found += [(proc.pid, name, str(c.laddr.ip), int(c.laddr.port)) for c in conns
                  if c.status == psutil.CONN_LISTEN]
    return found


def test_only_the_http_front_listens_on_every_interface(worker: Worker, kv_port: int) -> None:
    http_port = int(worker.wait_event("http.listening")["port"])
    found = listeners(worker)
    assert len({pid for pid, *_ in found}) >= 2, f"the engine core's sockets should be seen too: {found}"
    wide = [entry for entry in found if entry[2] in WILDCARDS and entry[3] != http_port]
    assert not wide, f"listening on every interface besides the HTTP front (port {http_port}): {wide}"
    by_port = {port: address for _, _, address, port in found}
    # the KV event sockets are there, on loopback: the relay's (vLLM connects) and vLLM's replay socket
    assert by_port.get(kv_port) == "127.0.0.1", found
    assert by_port.get(kv_port + 1000) == "127.0.0.1", found
    for event in ("system.listening", "request_plane.listening", "event_plane.listening"):
        port = int(worker.wait_event(event)["port"])
        assert by_port.get(port) == "127.0.0.1", (event, found)
