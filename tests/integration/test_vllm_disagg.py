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


# vLLM 0.32's ExampleConnector (a debugging connector) crashes the engine core on a repeated
# prompt shorter than one block (IndexError in _prepare_inputs): the idle canary is exactly that,
# so it is pushed out of these tests' way.
NO_CANARY = ("--canary-wait-time", "3600")


def connector(storage: Path) -> str:
    return json.dumps({"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                       "kv_connector_extra_config": {"shared_storage_path": str(storage)}})


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kv-storage")


@pytest.fixture(scope="module")
def prefill(tiny_model: Path, storage: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    gen = start_vllm_worker(tiny_model, tmp_path_factory.mktemp("prefill"), "--role", "prefill",
                            "--kv-transfer-config", connector(storage), *NO_CANARY)
    w = next(gen)
    w.wait_ready(timeout=240)
    yield w
    gen.close()


@pytest.fixture(scope="module")
def decode(tiny_model: Path, storage: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    gen = start_vllm_worker(tiny_model, tmp_path_factory.mktemp("decode"), "--role", "decode",
                            "--kv-transfer-config", connector(storage), *NO_CANARY)
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
