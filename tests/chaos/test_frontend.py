"""The frontend role over real synthetic worker processes: routing, migration when workers
die or shut down mid-stream, workers joining, the frontend itself restarted."""

from __future__ import annotations

import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.procs import Worker, wait_until, worker_fixture
from tests.synthetic import text
from tests.unit.test_metrics import value


class Deployment:
    """A frontend and synthetic workers sharing a discovery directory."""

    def __init__(self, tmp: Path, *frontend_args: str) -> None:
        self.tmp = tmp
        self.env = {"DYN_FILE_DISCOVERY_DIR": str(tmp / "discovery")}
        self.frontend_args = frontend_args
        self._gens: list[Iterator[Worker]] = []
        self.workers: list[Worker] = []
        self.frontend: Worker | None = None

    def add_worker(self, *args: str, step_ms: str = "10") -> Worker:
        gen = worker_fixture("--engine", "synthetic", "--synthetic-step-ms", step_ms,
                             "--grace-period", "1", *args, env=self.env)
        self._gens.append(gen)
        worker = next(gen)
        self.workers.append(worker)
        worker.wait_event("endpoint.registered")
        return worker

    def start_frontend(self) -> Worker:
        gen = worker_fixture("--role", "frontend", "--engine", "synthetic", "--http-port", "0",
                             *self.frontend_args, env=self.env)
        self._gens.append(gen)
        self.frontend = next(gen)
        self.frontend.wait_ready(30)
        return self.frontend

    def client(self) -> openai.OpenAI:
        assert self.frontend is not None
        port = self.frontend.wait_event("http.listening")["port"]
        return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)

    def close(self) -> None:
        for gen in reversed(self._gens):
            gen.close()  # SIGTERM what still runs, and assert nothing is left behind


@pytest.fixture
def deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    dep = Deployment(tmp_path, *getattr(request, "param", ()))
    try:
        yield dep
    finally:
        dep.close()


def stream_texts(client: openai.OpenAI, prompts: list[str], max_tokens: int,
                 on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Stream every prompt at once (a thread each); the text each got, or its error."""
    results: dict[str, Any] = {}

    def one(i: int, prompt: str) -> None:
        try:
            got, finish = "", None
            stream = client.completions.create(model="synthetic", prompt=prompt, max_tokens=max_tokens, stream=True)
            for chunks, chunk in enumerate(stream, 1):
                for choice in chunk.choices:
                    got += choice.text
                    finish = choice.finish_reason or finish
                if on_progress is not None:
                    on_progress(i, chunks)
            results[prompt] = (got, finish)
        except Exception as exc:  # reported, not raised: the test says which stream failed how
            results[prompt] = exc

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_32_streams_survive_a_killed_and_a_stopped_worker(deployment: Deployment) -> None:
    workers = [deployment.add_worker() for _ in range(3)]
    frontend = deployment.start_frontend()
    client = deployment.client()
    prompts = [f"prompt {i}" for i in range(32)]
    max_tokens = 400  # 4 s at 10 ms a token: both failures land mid-stream
    progress: dict[int, int] = {}
    all_going = threading.Event()

    def on_progress(i: int, chunks: int) -> None:
        progress[i] = chunks
        if len(progress) == len(prompts) and min(progress.values()) >= 20:
            all_going.set()

    def chaos() -> None:
        assert all_going.wait(60), f"streams did not get going: {progress}"
        workers[0].proc.send_signal(signal.SIGKILL)
        workers[1].signal(signal.SIGTERM)  # drains 1 s, then aborts what is left (migratable)

    saboteur = threading.Thread(target=chaos)
    saboteur.start()
    results = stream_texts(client, prompts, max_tokens, on_progress)
    saboteur.join(60)
    broken = {p: r for p, r in results.items() if r != (text(p.encode(), max_tokens), "length")}
    assert not broken, {p: (r if isinstance(r, Exception) else (len(r[0]), r[1])) for p, r in broken.items()}
    page = frontend.get("/metrics").text
    migrated = value(page, "dynamo_frontend_migrations_total")
    # every stream on the two failed workers moved (about two thirds of 32)
    assert migrated >= 10, f"only {migrated} migrations"
    moved = [e for e in frontend.events() if e["event"] == "request.migrating"]
    assert {e["reason"] for e in moved} <= {"disconnected", "shutting_down", "stream_broken", "timeout"}
    assert workers[1].wait(30) == 0
    print(f"\n32 streams, one worker SIGKILLed and one SIGTERMed mid-stream: {migrated:.0f} migrations")


def test_a_worker_that_joins_is_used_and_one_that_leaves_is_not(deployment: Deployment) -> None:
    first = deployment.add_worker()
    frontend = deployment.start_frontend()
    client = deployment.client()
    assert client.completions.create(model="synthetic", prompt="a", max_tokens=2).choices[0].text == text(b"a", 2)
    second = deployment.add_worker()
    wait_until(lambda: any(e["event"] == "frontend.worker_added" and e["instance"] != _instance(first)
                           for e in frontend.events()), 20, "the frontend to see the new worker")
    for i in range(6):  # round-robin: both take requests
        client.completions.create(model="synthetic", prompt=f"x{i}", max_tokens=2)
    routed = {e["worker"] for e in frontend.events() if e["event"] == "request.routed"}
    assert routed == {_instance(first), _instance(second)}
    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0
    wait_until(lambda: any(e["event"] == "frontend.worker_removed" for e in frontend.events()), 20,
               "the frontend to drop the stopped worker")
    for i in range(4):
        reply = client.completions.create(model="synthetic", prompt=f"y{i}", max_tokens=2)
        assert reply.choices[0].text == text(f"y{i}".encode(), 2)


def _instance(worker: Worker) -> str:
    return str(worker.wait_event("endpoint.registered")["key"]).rsplit(".", 1)[-1]


def test_the_frontend_killed_under_load_comes_back_and_serves(deployment: Deployment) -> None:
    deployment.frontend_args = ("--enable-chaos",)
    deployment.add_worker()
    deployment.add_worker()
    frontend = deployment.start_frontend()
    client = deployment.client()
    results = {}
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            prompt = f"load {uuid.uuid4().hex[:6]}"
            try:
                reply = client.completions.create(model="synthetic", prompt=prompt, max_tokens=20)
                results[prompt] = reply.choices[0].text == text(prompt.encode(), 20)
            except openai.APIError as exc:
                results[prompt] = exc

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) >= 8, 30, "requests under load")
        for actor in ("root/http", "root/watcher"):
            r = frontend.post(f"/debug/actors/{actor}/kill")
            assert r.status_code == 200, r.text
        count = len(results)
        wait_until(lambda: len(results) >= count + 8, 30, "requests after the kills")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    good = [p for p, ok in results.items() if ok is True]
    assert len(good) >= 16
    # whatever was cut by the kill of the HTTP actor itself is an error, never a wrong answer
    assert all(ok is True or isinstance(ok, openai.APIError) for ok in results.values())
    restarts = {e["actor"] for e in frontend.events() if e["event"] == "actor.restarted"}
    assert {"root/http", "root/watcher"} <= restarts
    assert httpx.get(frontend.url("/ready"), timeout=5).status_code == 200


def _kv_worker(deployment: Deployment) -> Worker:
    from tests.procs import free_port

    port = free_port()
    deployment.env = {**deployment.env, "DYN_VLLM_KV_EVENT_PORT": str(port),
                      "DYN_VLLM_KV_EVENT_REPLAY_PORT": str(free_port())}
    return deployment.add_worker("--synthetic-kv-events", step_ms="2")  # 16-token blocks


def _prefix_hit_rate(tmp_path: Path, mode: str) -> tuple[float, list[dict[str, Any]]]:
    """Four long shared prefixes (system prompts), six requests each, one at a time, over
    three workers: the share of prompt tokens the chosen worker had cached."""
    deployment = Deployment(tmp_path / mode, "--router-mode", mode)
    try:
        for _ in range(3):
            _kv_worker(deployment)
        frontend = deployment.start_frontend()
        client = deployment.client()
        prefixes = [f"system prompt {k}: " + "you are a careful assistant. " * 12 for k in range(4)]
        cached, prompt = 0, 0
        for turn in range(6):
            for prefix in prefixes:
                reply = client.completions.create(model="synthetic", prompt=f"{prefix} question {turn}",
                                                  max_tokens=2)
                assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
                cached += reply.usage.prompt_tokens_details.cached_tokens or 0
                prompt += reply.usage.prompt_tokens
        return cached / prompt, [e for e in frontend.events() if e["event"] == "request.routed"]
    finally:
        deployment.close()


def test_requests_sharing_a_prefix_go_where_it_is_cached(tmp_path: Path) -> None:
    """kv routing follows the workers' KV events (vLLM's format, from the synthetic engine's
    prefix cache) to the worker holding the prompt's prefix; round-robin, the control, does not."""
    kv, routed = _prefix_hit_rate(tmp_path, "kv")
    control, _ = _prefix_hit_rate(tmp_path, "round-robin")
    print(f"\nprompt tokens found cached on the chosen worker: kv {kv:.0%}, round-robin {control:.0%}")
    # after the first round, every kv-routed request lands where its prefix is (but its last partial block)
    assert kv > 0.7, f"kv routing found {kv:.0%} of prompt tokens cached"
    assert kv > control + 0.2, f"kv {kv:.0%} is no better than round-robin {control:.0%}"
    assert sum(e["overlap_blocks"] for e in routed) > 0


def test_one_request_id_from_the_client_through_the_worker(deployment: Deployment) -> None:
    worker = deployment.add_worker()
    frontend = deployment.start_frontend()
    client = deployment.client()
    reply = client.completions.with_raw_response.create(model="synthetic", prompt="traced", max_tokens=3,
                                                        extra_headers={"x-request-id": "trace-42"})
    assert reply.headers["x-request-id"] == "trace-42"
    assert reply.parse().id == "cmpl-trace-42"
    def finished(process: Any) -> bool:
        return any(e["event"] == "request.finished" and e.get("request_id") == "trace-42" for e in process.events())

    for process in (worker, frontend):  # each logs request.finished once the answer is out: it may follow it
        wait_until(partial(finished, process), 10, "request.finished under the client's id")
    for process, expected in ((frontend, {"request.started", "request.routed", "request.finished"}),
                              (worker, {"request.started", "request.finished"})):
        seen = {e["event"] for e in process.events() if e.get("request_id") == "trace-42"}
        assert expected <= seen, (process.args, seen)


@pytest.mark.parametrize("deployment", [("--router-mode", "random"), ("--router-mode", "power-of-two")],
                         indirect=True, ids=["random", "power-of-two"])
def test_the_other_router_modes_spread_the_load(deployment: Deployment) -> None:
    workers = [deployment.add_worker(), deployment.add_worker()]
    frontend = deployment.start_frontend()
    wait_until(lambda: sum(e["event"] == "frontend.worker_added" for e in frontend.events()) >= 2, 20,
               "the frontend to see both workers")
    client = deployment.client()
    for i in range(16):
        reply = client.completions.create(model="synthetic", prompt=f"spread {i}", max_tokens=3)
        assert reply.choices[0].text == text(f"spread {i}".encode(), 3)
    routed = [e for e in frontend.events() if e["event"] == "request.routed"]
    assert {e["mode"] for e in routed} == {deployment.frontend_args[1]}
    assert {e["worker"] for e in routed} == {_instance(w) for w in workers}


@pytest.mark.parametrize("deployment", [("--active-prefill-tokens-threshold", "10")], indirect=True)
def test_busy_workers_get_no_more_work_and_the_client_is_told_when_to_retry(deployment: Deployment) -> None:
    """A worker prefilling more prompt tokens than the threshold is busy; with every worker busy
    the frontend answers 503 with Retry-After, and serves again once the prefill is done."""
    # 20 prompt tokens at 0.1 s each: two seconds of prefill
    deployment.add_worker("--synthetic-prefill-us-per-token", "100000")
    frontend = deployment.start_frontend()
    client = deployment.client()
    first_token = threading.Event()

    def slow() -> None:
        for chunk in client.completions.create(model="synthetic", prompt="twenty bytes of text", max_tokens=3,
                                               stream=True):
            if chunk.choices and chunk.choices[0].text:
                first_token.set()

    runner = threading.Thread(target=slow)
    runner.start()
    try:
        wait_until(lambda: any(e["event"] == "request.routed" for e in frontend.events()), 10,
                   "the slow request to be routed")
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="synthetic", prompt="x", max_tokens=1)
        refused_while_prefilling = not first_token.is_set()
    finally:
        runner.join(30)
    assert refused_while_prefilling
    assert caught.value.status_code == 503 and "busy" in caught.value.message
    assert caught.value.response.headers["retry-after"] == "1"
    assert first_token.is_set()  # the busy worker's own request was served
    assert client.completions.create(model="synthetic", prompt="x", max_tokens=1).choices[0].text == text(b"x", 1)
