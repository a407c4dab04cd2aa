"""The vLLM internals the engine bridge relies on, pinned to vLLM 0.32.

The bridge replaces each request's ``RequestOutputCollector.put`` with a
forwarder into a trio channel, and reads its ``output`` slot once. If a vLLM
upgrade changes either, these fail before anything else does.
"""

from __future__ import annotations

import inspect
import math

import pytest
import trio

vllm = pytest.importorskip("vllm")

from actors.engine.base import StepOutput  # noqa: E402
from actors.engine.vllm_backend import SUPPORTED_VLLM, _Forwarder, _map_error, vllm_version  # noqa: E402
from actors.errors import EngineDead  # noqa: E402


def test_vllm_version_is_the_pinned_one() -> None:
    assert vllm_version().startswith(SUPPORTED_VLLM)


def test_add_request_hands_back_a_collector_with_put_and_output() -> None:
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.output_processor import RequestOutputCollector

    source = inspect.getsource(AsyncLLM.add_request)
    assert "RequestOutputCollector(" in source and "return queue" in source
    collector = RequestOutputCollector(RequestOutputKind.DELTA, "r1")
    assert collector.output is None and callable(collector.put)
    # the output handler reaches the collector only through .put
    handler_source = inspect.getsource(AsyncLLM._run_output_handler)
    assert "process_outputs" in handler_source
    from vllm.v1.engine.output_processor import OutputProcessor

    assert ".put(" in inspect.getsource(OutputProcessor)


def _request_output(tokens: list[int], finished: bool, reason: str | None = None) -> object:
    from vllm.outputs import CompletionOutput, RequestOutput

    completion = CompletionOutput(index=0, text="x" * len(tokens), token_ids=tokens, cumulative_logprob=None,
                                  logprobs=None, finish_reason=reason)
    return RequestOutput(request_id="r1", prompt=None, prompt_token_ids=[1, 2, 3], prompt_logprobs=None,
                         outputs=[completion], finished=finished, num_cached_tokens=2)


async def test_forwarder_turns_request_outputs_into_step_outputs() -> None:
    send, recv = trio.open_memory_channel[StepOutput | BaseException](math.inf)
    fwd = _Forwarder(send)
    fwd.put(_request_output([5], finished=False))
    fwd.put(_request_output([6, 7], finished=True, reason="length"))
    first, last = recv.receive_nowait(), recv.receive_nowait()
    assert isinstance(first, StepOutput) and first.token_ids == [5] and first.finish_reason is None
    assert isinstance(last, StepOutput) and last.token_ids == [6, 7] and last.finish_reason == "length"
    assert (last.prompt_tokens, last.completion_tokens, last.cached_tokens) == (3, 3, 2)
    with pytest.raises(trio.EndOfChannel):  # closed after the last output
        recv.receive_nowait()


async def test_forwarder_maps_engine_death_and_stops() -> None:
    from vllm.v1.engine.exceptions import EngineDeadError

    send, recv = trio.open_memory_channel[StepOutput | BaseException](math.inf)
    fwd = _Forwarder(send)
    fwd.put(EngineDeadError())
    item = recv.receive_nowait()
    assert isinstance(item, EngineDead)
    fwd.put(_request_output([1], finished=False))  # nothing after death
    with pytest.raises(trio.EndOfChannel):
        recv.receive_nowait()
    assert isinstance(_map_error(ValueError("bad")), Exception)


def test_a_rendered_token_input_skips_the_renderer_thread_pool() -> None:
    """The bridge hands AsyncLLM ``tokens_input(ids)``, as vllm serve does: a rendered input is
    processed on the loop, while a raw ``{"prompt_token_ids": ...}`` goes through the renderer's
    thread pool (slow when our loop holds the GIL)."""
    from vllm.inputs import tokens_input
    from vllm.v1.engine.async_llm import AsyncLLM

    rendered = tokens_input([1, 2, 3])
    assert rendered["type"] == "token" and rendered["prompt_token_ids"] == [1, 2, 3]
    source = inspect.getsource(AsyncLLM.add_request)
    assert '"type" in prompt' in source and "process_inputs_async" in source


def test_kv_event_ports_taken_names_the_port_vllm_would_fail_on() -> None:
    """The check binds what vLLM's ZmqEventPublisher binds (a wildcard publisher
    endpoint, the replay endpoint) and what the relay binds for it (a publisher
    endpoint with a host), each moved by the data-parallel rank."""
    import socket

    from actors.engine.vllm_backend import kv_event_ports_taken
    from tests.procs import free_port

    def cfg(endpoint: str, replay: str | None = None, **extra: object) -> dict[str, object]:
        return {"kv_events_config": {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint,
                                     "replay_endpoint": replay}, **extra}

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        free = free_port()
        assert kv_event_ports_taken({}) is None
        assert kv_event_ports_taken({"kv_events_config": None}) is None
        assert kv_event_ports_taken(cfg(f"tcp://*:{free}")) is None
        taken = kv_event_ports_taken(cfg(f"tcp://*:{port}"))
        assert taken is not None and f"port {port}" in taken and "DYN_VLLM_KV_EVENT_PORT" in taken
        replay = kv_event_ports_taken(cfg(f"tcp://*:{free}", f"tcp://*:{port}"))
        assert replay is not None and "replay_endpoint" in replay
        # vLLM connects to a publisher endpoint with a host: the relay binds it, so it is checked too
        relay = kv_event_ports_taken(cfg(f"tcp://127.0.0.1:{port}"))
        assert relay is not None and "KV event relay" in relay and f"port {port}" in relay
        assert kv_event_ports_taken(cfg(f"tcp://127.0.0.1:{free}", f"tcp://127.0.0.1:{free_port()}")) is None
        # rank 1 binds port + 1
        ranked = kv_event_ports_taken(cfg(f"tcp://*:{port - 1}", data_parallel_rank=1))
        assert ranked is not None and f"port {port}" in ranked and "data-parallel rank 1" in ranked
        assert kv_event_ports_taken({"kv_events_config": {"enable_kv_cache_events": False,
                                                          "endpoint": f"tcp://*:{port}"}}) is None
