"""Prefill -> decode on real vLLM, with vLLM's ExampleConnector sharing KV through a directory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.client import Call
from tests.conftest import request_address, start_vllm_worker
from tests.procs import Worker

pytestmark = pytest.mark.vllm

# 65 tokens: the connector stores the prompt's first 64 (two 32-token blocks). Its consumer
# convention is "prompt = prefilled prompt + the token prefill produced": the decode request
# carries that, and its first 64 tokens match the stored blocks.
PROMPT = [1] + [(7 * i) % 300 + 3 for i in range(64)]


# vLLM 0.32's ExampleConnector crashes the engine core on a repeated prompt shorter than one
# block (IndexError in _prepare_inputs); the idle canary of a disaggregated worker is a block and
# a token long, and it runs here every couple of seconds while the tests do.
CANARY = ("--canary-wait-time", "2")


def connector(storage: Path) -> str:
    return json.dumps({"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                       "kv_connector_extra_config": {"shared_storage_path": str(storage)}})


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kv-storage")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prefill and decode workers register in one discovery directory (a frontend finds both)."""
    return tmp_path_factory.mktemp("disagg")


@pytest.fixture(scope="module")
def prefill(tiny_model: Path, storage: Path, shared: Path) -> Iterator[Worker]:
    gen = start_vllm_worker(tiny_model, shared, "--role", "prefill",
                            "--kv-transfer-config", connector(storage), *CANARY)
    w = next(gen)
    w.wait_ready(timeout=240)
    yield w
    gen.close()


@pytest.fixture(scope="module")
def decode(tiny_model: Path, storage: Path, shared: Path) -> Iterator[Worker]:
    gen = start_vllm_worker(tiny_model, shared, "--role", "decode",
                            "--kv-transfer-config", connector(storage), *CANARY)
    w = next(gen)
    w.wait_ready(timeout=240)
    yield w
    gen.close()


async def generate(w: Worker, payload: dict[str, Any]) -> list[dict[str, Any]]:
    async with Call(request_address(w), "generate", payload) as call:
        return await call.collect()


async def test_prefill_then_decode_loads_the_kv_and_matches_aggregated(
    prefill: Worker, decode: Worker, vllm_worker: Worker, storage: Path
) -> None:
    request = {"token_ids": PROMPT, "sampling_options": {"temperature": 0.0},
               "stop_conditions": {"max_tokens": 8, "ignore_eos": True}}
    # the prefill worker computes the prompt only: one token, whatever max_tokens says
    pre = await generate(prefill, request)
    assert len(pre) == 1 and len(pre[0]["token_ids"]) == 1
    assert pre[0]["finish_reason"] == "length"
    assert pre[0]["completion_usage"]["prompt_tokens"] == len(PROMPT)
    assert list(storage.iterdir()), "the prefill worker stored no KV"  # noqa: ASYNC240
    first = pre[0]["token_ids"][0]
    prefill_result = {"disaggregated_params": pre[0].get("disaggregated_params") or {"kv_transfer_params": {}}}
    # the decode worker loads the prompt's KV instead of computing it
    out = await generate(decode, {"token_ids": [*PROMPT, first], "sampling_options": {"temperature": 0.0},
                                  "stop_conditions": {"max_tokens": 7, "ignore_eos": True},
                                  "prefill_result": prefill_result})
    decode.wait_event("External Cache Hit!", timeout=30)
    tokens = [first] + [t for item in out for t in item["token_ids"]]
    # and together they produce what an aggregated worker produces
    agg = [t for item in await generate(vllm_worker, request) for t in item["token_ids"]]
    assert tokens == agg


def test_roles_register_under_their_components(prefill: Worker, decode: Worker) -> None:
    assert prefill.wait_event("endpoint.registered")["key"].startswith("dynamo.prefill.generate.")
    assert decode.wait_event("endpoint.registered")["key"].startswith("dynamo.backend.generate.")
    # decode workers publish no KV events; prefill workers do
    decode_paths = {a["path"] for a in decode.get("/debug/tree").json()}
    prefill_paths = {a["path"] for a in prefill.get("/debug/tree").json()}
    assert "root/kv_events" not in decode_paths and "root/kv_events" in prefill_paths


def test_through_the_frontend_prefill_then_decode_equals_aggregated(
    prefill: Worker, decode: Worker, vllm_worker: Worker, shared: Path, tiny_model: Path
) -> None:
    """The frontend sees a prefill and a decode worker for the model: it prefills on one and
    decodes on the other, and the client gets what an aggregated worker answers."""
    import openai

    from tests.procs import worker_fixture

    gen = worker_fixture("--role", "frontend", "--engine", "synthetic", "--http-port", "0", "--system-port", "0",
                         env={"DYN_FILE_DISCOVERY_DIR": str(shared / "discovery")})
    frontend = next(gen)
    try:
        frontend.wait_ready(60)

        def client(w: Worker) -> openai.OpenAI:
            port = w.wait_event("http.listening", timeout=60)["port"]
            return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)

        # a text prompt of several KV blocks (vLLM's text for a prompt of token ids starts with
        # the prompt's own text, which no frontend reproduces from tokens)
        kw = {"model": str(tiny_model), "prompt": "the quick brown fox jumps over the lazy dog " * 6,
              "max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}
        disaggregated = client(frontend).completions.create(**kw)
        aggregated = client(vllm_worker).completions.create(**kw)
        assert disaggregated.choices[0].text == aggregated.choices[0].text
        assert disaggregated.usage is not None and disaggregated.usage.completion_tokens == 8
        events = frontend.events()
        assert any(e["event"] == "request.prefilled" for e in events)
        routed = [e for e in events if e["event"] == "request.routed"]
        decode_id = str(decode.wait_event("endpoint.registered")["key"]).rsplit(".", 1)[-1]
        assert [e["worker"] for e in routed] == [decode_id]
        # the disaggregated workers' idle canaries ran through all of it, and passed
        for w in (prefill, decode):
            assert any(e["event"] == "health.canary" and e["ok"] for e in w.events()), w.tail(30)
            assert w.proc.poll() is None
    finally:
        gen.close()
