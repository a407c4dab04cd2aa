"""An OpenAI-compatible HTTP front on the worker itself (``--http-port``).

``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, streaming as
server-sent events, errors in OpenAI's JSON shape. Requests become token-mode
requests for the same :class:`~actors.handlers.Handlers` the request plane
uses. Streaming responses are raw ASGI so that a client disconnect cancels the
request at once (which aborts it in the engine), instead of waiting for an
abandoned generator to be collected.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import structlog
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from supervisor.errors import EngineDead
from supervisor.http import BoundSocket, serve_asgi
from supervisor.signals import Lifecycle
from supervisor.tree import ActorContext, ChildSpec, Restart, TaskStatus

from .engine.actor import EngineRef
from .engine.base import EngineRequest, RequestFailed, StepOutput
from .handlers import Handlers, Inflight, RequestControl
from .protocol import RequestError

__all__ = ["ByteTokenizer", "HfTokenizer", "OpenAIFront", "Tokenizer"]

_log = structlog.get_logger("actors.http")
_json_encode = msgspec.json.Encoder().encode
MAX_BODY = 8 * 1024 * 1024
# a stream that fell behind sends at most about this many events in one write
MAX_EVENTS_PER_WRITE = 64


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def chat(self, messages: list[dict[str, Any]]) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """For the synthetic engine: UTF-8 bytes are tokens; ids render as text."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode()) or [0]

    def chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode("".join(f"{m.get('role')}: {m.get('content')}\n" for m in messages) + "assistant:")

    def decode(self, ids: list[int]) -> str:
        return "".join(f" {i}" for i in ids)


class HfTokenizer:
    """The model's own tokenizer and chat template (or a custom Jinja template)."""

    def __init__(self, model: str, chat_template: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model)
        self.chat_template = chat_template

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text))

    def chat(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=self.chat_template
        )
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))


def openai_error(status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


def _error_for(exc: RequestError) -> JSONResponse:
    status = {"not_found": 404, "engine_dead": 503, "shutting_down": 503, "resource_exhausted": 429}.get(
        exc.code, 400 if exc.code == "invalid_request" else 500)
    kind = "invalid_request_error" if status < 500 else "service_unavailable" if status == 503 else "server_error"
    return openai_error(status, exc.message, kind)


_SAMPLING_KEYS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "top_k",
                  "repetition_penalty", "min_p", "length_penalty", "n", "best_of", "use_beam_search")
_STOP_KEYS = ("stop", "ignore_eos", "min_tokens")


def to_payload(body: Mapping[str, Any], token_ids: list[int]) -> dict[str, Any]:
    """OpenAI request fields -> our token-mode request."""
    sampling = {k: body[k] for k in _SAMPLING_KEYS if body.get(k) is not None}
    stop = {k: body[k] for k in _STOP_KEYS if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        stop["max_tokens"] = max_tokens
    output: dict[str, Any] = {}
    logprobs = body.get("logprobs")
    if isinstance(logprobs, bool):  # chat: logprobs true + top_logprobs N
        if logprobs:
            output["logprobs"] = body.get("top_logprobs") or 0
    elif logprobs is not None:
        output["logprobs"] = logprobs
    payload: dict[str, Any] = {"token_ids": token_ids, "sampling_options": sampling, "stop_conditions": stop,
                               "output_options": output}
    if body.get("model") is not None:
        payload["model"] = body["model"]
    return payload


@dataclass
class _Call:
    request_id: str
    created: int
    model: str
    chat: bool
    stream: bool
    include_usage: bool


class OpenAIFront:
    def __init__(
        self,
        bound: BoundSocket,
        handlers: Handlers,
        engine: EngineRef,
        lifecycle: Lifecycle,
        inflight: Inflight,
        tokenizer_factory: Callable[[], Tokenizer],
    ) -> None:
        self.bound = bound
        self.handlers = handlers
        self.engine = engine
        self.lifecycle = lifecycle
        self.inflight = inflight
        self.tokenizer_factory = tokenizer_factory
        self.tokenizer: Tokenizer | None = None

    def spec(self) -> ChildSpec:
        return ChildSpec("http", self.run, Restart.PERMANENT, shutdown=2.0)

    async def run(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        await self.engine.wait_ready()
        if self.tokenizer is None:  # kept across restarts
            self.tokenizer = await trio.to_thread.run_sync(self.tokenizer_factory)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_asgi, self.app(), self.bound)
            ctx.log.info("http.listening", host=self.bound.host, port=self.bound.port)
            task_status.started()

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", _Asgi(self.completions, chat=False), methods=["POST"]),
            Route("/v1/chat/completions", _Asgi(self.completions, chat=True), methods=["POST"]),
        ])

    async def models(self, _: Request) -> JSONResponse:
        info = await self.engine.wait_ready()
        now = int(time.time())
        data = [{"id": info.model, "object": "model", "created": now, "owned_by": "llm-supervisor"}]
        data += [{"id": name, "object": "model", "created": now, "owned_by": "llm-supervisor", "parent": info.model}
                 for name in self.handlers.loras.names()]
        return JSONResponse({"object": "list", "data": data})

    # -- completions -----------------------------------------------------------
    async def completions(self, scope: Scope, receive: Receive, send: Send, chat: bool) -> None:
        request = Request(scope, receive)
        try:
            raw = await request.body()
            if len(raw) > MAX_BODY:
                raise RequestError("invalid_request", f"request body over {MAX_BODY} bytes")
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise RequestError("invalid_request", f"request body is not JSON: {exc}") from None
            if not isinstance(body, dict):
                raise RequestError("invalid_request", "request body must be a JSON object")
            if not self.lifecycle.accepting:
                raise RequestError("shutting_down", "worker is shutting down; retry on another instance",
                                   migratable=True)
            token_ids = self._prompt_tokens(body, chat)
            info = await self.engine.wait_ready()
            call = _Call(
                request_id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                created=int(time.time()),
                model=str(body.get("model") or info.model),
                chat=chat,
                stream=bool(body.get("stream")),
                include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
            )
            if body.get("model") == info.model:
                body = {**body, "model": None}
            engine_request = await self.handlers.prepare(to_payload(body, token_ids), call.request_id)
        except RequestError as exc:
            await _error_for(exc)(scope, receive, send)
            return
        structlog.contextvars.bind_contextvars(request_id=call.request_id)
        control = RequestControl()
        self.inflight.add(call.request_id, control)
        _log.info("request.started", endpoint="chat" if chat else "completions", stream=call.stream)
        try:
            with control.scope:
                if call.stream:
                    await self._stream(call, engine_request, control, receive, send)
                else:
                    await self._unary(call, engine_request, scope, receive, send)
            if control.scope.cancelled_caught:
                reason = control.reason or "cancelled"
                _log.info("request.aborted", reason=reason, message=f"Aborted Request ID: {call.request_id}")
                if reason != "client disconnected":  # shutdown: say so, and that a retry elsewhere is fine
                    err = RequestError("shutting_down", f"request {reason}; retry on another instance",
                                       migratable=True)
                    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                        if call.stream:
                            await send(_sse({"error": {"message": err.message, "type": "service_unavailable",
                                                       "code": err.code, "migratable": True}}))
                            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                                        "more_body": False})
                        else:
                            await _error_for(err)(scope, receive, send)
        finally:
            self.inflight.remove(call.request_id)

    def _prompt_tokens(self, body: Mapping[str, Any], chat: bool) -> list[int]:
        assert self.tokenizer is not None
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise RequestError("invalid_request", "messages must be a non-empty list of objects")
            for m in messages:
                if isinstance(m.get("content"), list):  # content parts: keep the text ones
                    m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
            return self.tokenizer.chat(messages)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            return self.tokenizer.encode(prompt[0])
        raise RequestError("invalid_request", "prompt must be a string or a list of token ids "
                           "(batches of prompts are not supported)")

    async def _unary(self, call: _Call, req: EngineRequest, scope: Scope, receive: Receive, send: Send) -> None:
        texts: list[str] = []
        last: StepOutput | None = None
        try:
            async with self.engine.generate(req) as stream:
                async for out in stream:
                    texts.append(self._text(out))
                    last = out
        except (EngineDead, RequestFailed) as exc:
            await _error_for(_request_error(exc))(scope, receive, send)
            return
        assert last is not None
        text = "".join(texts)
        choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(last.finish_reason)}
        if call.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
            choice["logprobs"] = None
        body = {
            "id": call.request_id,
            "object": "chat.completion" if call.chat else "text_completion",
            "created": call.created,
            "model": call.model,
            "choices": [choice],
            "usage": _usage(last),
        }
        _log.info("request.finished", status="ok", completion_tokens=last.completion_tokens)
        await JSONResponse(body)(scope, receive, send)

    async def _stream(self, call: _Call, req: EngineRequest, control: RequestControl, receive: Receive,
                      send: Send) -> None:
        done = False

        async def watch_disconnect() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not done:  # a client hanging up after [DONE] aborts nothing
                        control.cancel("client disconnected")
                    return

        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_disconnect)
            first = True
            try:
                async with self.engine.generate(req) as stream:
                    async for out in stream:
                        # Outputs that piled up while this task waited for its turn (the engine
                        # outran us) go out in one write: the same events, one trip through
                        # hypercorn and h11 instead of one per token.
                        events: list[bytes] = []
                        ready: StepOutput | None = out
                        while ready is not None and len(events) < MAX_EVENTS_PER_WRITE:
                            events.extend(self._events(call, ready, first))
                            first = False
                            ready = stream.next_ready()
                        if ready is not None:
                            events.extend(self._events(call, ready, first))
                        await send({"type": "http.response.body", "body": b"".join(events), "more_body": True})
                _log.info("request.finished", status="ok")
            except (EngineDead, RequestFailed) as exc:
                err = _request_error(exc)
                await send(_sse({"error": {"message": err.message, "type": "server_error", "code": err.code}}))
                _log.info("request.finished", status="error", code=err.code)
            done = True
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            nursery.cancel_scope.cancel()

    def _events(self, call: _Call, out: StepOutput, first: bool) -> list[bytes]:
        """The server-sent events for one engine output: its chunk, and the usage after the last."""
        delta: dict[str, Any] = {"content": self._text(out)}
        if call.chat and first:
            delta["role"] = "assistant"
        events = [_event(self._chunk(call, delta, _finish(out.finish_reason) if out.finish_reason else None))]
        if out.finish_reason is not None and call.include_usage:
            usage_chunk = self._chunk(call, None, None)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = _usage(out)
            events.append(_event(usage_chunk))
        return events

    def _chunk(self, call: _Call, delta: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if call.chat:
            choice["delta"] = delta or {}
        else:
            choice["text"] = (delta or {}).get("content", "")
            choice["logprobs"] = None
        return {"id": call.request_id, "object": "chat.completion.chunk" if call.chat else "text_completion",
                "created": call.created, "model": call.model, "choices": [choice]}

    def _text(self, out: StepOutput) -> str:
        if out.text is not None:
            return out.text
        assert self.tokenizer is not None
        return self.tokenizer.decode(out.token_ids)


class _Asgi:
    """A raw ASGI endpoint for Starlette's router."""

    def __init__(self, fn: Callable[[Scope, Receive, Send, bool], Awaitable[None]], *, chat: bool) -> None:
        self.fn = fn
        self.chat = chat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.fn(scope, receive, send, self.chat)


def _event(data: dict[str, Any]) -> bytes:
    # msgspec: a third of json.dumps's time per streamed chunk (compact, UTF-8 JSON, as vLLM's server sends)
    return b"data: " + _json_encode(data) + b"\n\n"


def _sse(data: dict[str, Any]) -> dict[str, Any]:
    return {"type": "http.response.body", "body": _event(data), "more_body": True}


def _finish(reason: str | None) -> str | None:
    return {"cancelled": "abort"}.get(reason or "", reason)


def _usage(out: StepOutput) -> dict[str, Any]:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": out.cached_tokens}}


def _request_error(exc: Exception) -> RequestError:
    if isinstance(exc, EngineDead):
        return RequestError("engine_dead", str(exc), migratable=True)
    return RequestError("invalid_request", str(exc))
