"""The NATS event plane with a real nats-server (JetStream): synthetic workers publish their
KV events and load metrics on NATS, and a kv-routing frontend follows them; with
--durable-kv-events a frontend that starts after the events were published still knows
where each prefix is cached (it replays the namespace's stream)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import trio

from supervisor.client import Call
from tests.procs import Worker, free_port, wait_until, worker_fixture
from tests.servers import Server


class Deployment:
    def __init__(self, tmp: Path, nats: Server, *extra: str) -> None:
        self.namespace = f"ev{uuid.uuid4().hex[:8]}"
        self.env = {"DYN_FILE_DISCOVERY_DIR": str(tmp / "discovery"), "NATS_SERVER": nats.url}
        self.extra = ("--namespace", self.namespace, "--event-plane", "nats", *extra)
        self._gens: list[Iterator[Worker]] = []

    def start(self, *args: str, **env: str) -> Worker:
        gen = worker_fixture(*args, *self.extra, env={**self.env, **env})
        self._gens.append(gen)
        return next(gen)

    def worker(self) -> Worker:
        w = self.start("--engine", "synthetic", "--synthetic-kv-events", "--synthetic-step-ms", "2",
                       DYN_VLLM_KV_EVENT_PORT=str(free_port()), DYN_VLLM_KV_EVENT_REPLAY_PORT=str(free_port()))
        w.wait_event("endpoint.registered", timeout=60)
        return w

    def frontend(self) -> tuple[Worker, openai.OpenAI]:
        f = self.start("--role", "frontend", "--engine", "synthetic", "--http-port", "0", "--router-mode", "kv")
        f.wait_ready(60)
        port = f.wait_event("http.listening")["port"]
        return f, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)

    def close(self) -> None:
        for gen in reversed(self._gens):
            gen.close()  # SIGTERM, and assert nothing is left behind


@pytest.fixture
def deployment(tmp_path: Path, nats_server: Server, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    dep = Deployment(tmp_path, nats_server, *getattr(request, "param", ()))
    try:
        yield dep
    finally:
        dep.close()


PREFIXES = [f"system prompt {k}: " + "you are a careful assistant. " * 12 for k in range(3)]


def _instance(worker: Worker) -> str:
    return str(worker.wait_event("endpoint.registered")["key"]).rsplit(".", 1)[-1]


def test_kv_routing_follows_events_on_nats(deployment: Deployment) -> None:
    workers = [deployment.worker() for _ in range(3)]
    frontend, client = deployment.frontend()
    assert all(w.wait_event("event_plane.listening")["transport"] == "nats" for w in workers)
    cached = prompt = 0
    for turn in range(4):
        for prefix in PREFIXES:
            reply = client.completions.create(model="synthetic", prompt=f"{prefix} question {turn}", max_tokens=2)
            assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
            cached += reply.usage.prompt_tokens_details.cached_tokens or 0
            prompt += reply.usage.prompt_tokens
    # after the first turn each prefix is found where its blocks are: most prompt tokens come cached
    assert cached / prompt > 0.6, cached / prompt
    routed = [e for e in frontend.events() if e["event"] == "request.routed"]
    assert sum(e["overlap_blocks"] for e in routed) > 0


@pytest.mark.parametrize("deployment", [("--durable-kv-events",)], indirect=True)
def test_a_frontend_started_later_replays_the_durable_kv_events(deployment: Deployment) -> None:
    workers = [deployment.worker() for _ in range(2)]
    # each worker caches one prefix, asked directly (no frontend runs yet)
    for worker, prefix in zip(workers, PREFIXES, strict=False):
        address = f"127.0.0.1:{worker.wait_event('request_plane.listening')['port']}"
        payload: dict[str, Any] = {"token_ids": list(f"{prefix} warm".encode()),
                                   "stop_conditions": {"max_tokens": 1}}

        async def ask(address: str = address, payload: dict[str, Any] = payload) -> None:
            async with Call(address, "generate", payload) as call:
                await call.collect()

        trio.run(ask)
    frontend, client = deployment.frontend()
    wait_until(lambda: any(e["event"] == "frontend.events_caught_up" for e in frontend.events()), 20,
               "the frontend to replay the stored KV events")
    caught_up = next(e for e in frontend.events() if e["event"] == "frontend.events_caught_up")
    assert caught_up["replayed"] >= 2
    for worker, prefix in zip(workers, PREFIXES, strict=False):
        client.completions.create(model="synthetic", prompt=f"{prefix} later", max_tokens=1)
        last = [e for e in frontend.events() if e["event"] == "request.routed"][-1]
        assert last["worker"] == _instance(worker) and last["overlap_blocks"] > 0, last
