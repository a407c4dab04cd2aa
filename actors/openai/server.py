"""The OpenAI-compatible HTTP server: ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, streaming as server-sent events, errors in the shape
``vllm serve`` gives them.

The same server runs on a worker (``--http-port``, over its own engine) and in
the frontend (over the workers it routes to): what differs is the
:class:`ModelBackend`. Every request runs through the process's request
pipeline (admission, in-flight table, metrics, logs, cancel), so a client that
hangs up aborts its engine requests at once.

Completion and chat requests are raw ASGI (not Starlette handlers) so the
stream is ours to write and a disconnect is noticed while it runs.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import structlog
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from supervisor.http import BoundSocket, serve_asgi
from supervisor.tree import ActorContext, ChildSpec, Restart, TaskStatus

from ..engine.base import StepOutput
from ..errors import ErrorCode, RequestError
from ..pipeline import AbortReason, RequestControl, RequestPipeline, Ticket
from .parsing import ChatParsers, ChatParsing
from .render import Renderer
from .request import OpenAICall, Prompt, messages_payload, parse_call, prompt_payload, tokenize
from .tokenizer import Tokenizer, TokenizerRunner

__all__ = ["MAX_BODY", "ModelBackend", "OpenAIServer", "OutputStream", "ServedModel", "error_body"]

_log = structlog.get_logger("actors.openai")
_json = msgspec.json.Encoder().encode

MAX_BODY = 8 * 1024 * 1024  # bytes; a larger request body is refused while it arrives
MAX_EVENTS_PER_WRITE = 64  # a stream that fell behind sends at most about this many events in one write

# status -> error.type, as vllm serve names them
_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 413: "RequestEntityTooLarge",
                422: "UnprocessableEntityError", 429: "TooManyRequests", 499: "ClientClosedRequest",
                500: "InternalServerError", 501: "NotImplementedError", 502: "BadGateway",
                503: "ServiceUnavailableError", 504: "GatewayTimeout"}


@dataclass(frozen=True)
class ServedModel:
    """What a request's ``model`` resolved to."""

    name: str  # as responses name it
    max_model_len: int
    adapter: str | None = None  # a LoRA adapter's name: the token-mode payload's ``model``
    tokenizer: Tokenizer | None = None  # the model's own, when the server serves several (else the server's)
    # the backend builds the prompt from the chat messages itself (a multimodal processor)
    takes_messages: bool = False
    # vLLM's tool-call and reasoning parsers for its chat answers (--dyn-tool-call-parser ...)
    parsers: ChatParsers = field(default_factory=ChatParsers)


class OutputStream(Protocol):
    def __aiter__(self) -> OutputStream: ...

    async def __anext__(self) -> StepOutput: ...

    def next_ready(self) -> StepOutput | None:
        """An output already waiting, or None (never waits)."""
        ...


class ModelBackend(Protocol):
    """Where the server's requests go: the worker's engine, or the frontend's workers."""

    async def serving(self, model: str | None, endpoint: str = "completions") -> ServedModel:
        """Resolve a request's ``model`` for ``endpoint`` (``chat_completions`` or ``completions``);
        raise NOT_FOUND for a model (or an endpoint of it) that is not served."""
        ...

    async def models(self) -> list[dict[str, Any]]: ...

    def generate(self, payload: dict[str, Any], engine_id: str) -> AbstractAsyncContextManager[OutputStream]: ...


def error_body(error: RequestError) -> tuple[int, dict[str, Any]]:
    status = error.code.http_status
    return status, {"error": {"message": error.message, "type": _ERROR_TYPES.get(status, "Error"),
                              "param": error.param, "code": status}}


def error_response(error: RequestError) -> JSONResponse:
    status, body = error_body(error)
    return JSONResponse(body, status_code=status)


def _event(data: dict[str, Any]) -> bytes:
    # msgspec: a third of json.dumps's time per chunk (compact UTF-8 JSON, as vllm serve sends)
    return b"data: " + _json(data) + b"\n\n"


_DONE = b"data: [DONE]\n\n"


@dataclass
class _Exchange:
    """One HTTP request's ASGI side."""

    scope: Scope
    receive: Receive
    send: Send
    started: bool = False  # the response's status line went out
    done: bool = False  # the response is complete
    request_id: str = ""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def read_body(self, limit: int, control: RequestControl) -> bytes:
        """The request body, refused as soon as it grows past ``limit`` (not after)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                control.cancel(AbortReason.CLIENT_DISCONNECTED)
                await trio.lowlevel.checkpoint()  # raises Cancelled: nobody to answer
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestError(ErrorCode.PAYLOAD_TOO_LARGE, f"the request body is over the {limit}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def json(self, status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None) -> None:
        self.started = True
        await self.send({"type": "http.response.start", "status": status,
                         "headers": [(b"content-type", b"application/json"), *self.headers, *(extra or [])]})
        self.done = True  # from here a hang-up is the client leaving after the answer, not an abort
        await self.send({"type": "http.response.body", "body": _json(body), "more_body": False})

    async def start_stream(self) -> None:
        self.started = True
        await self.send({"type": "http.response.start", "status": 200,
                         "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                                     *self.headers]})

    async def events(self, data: bytes, *, last: bool = False) -> None:
        if last:
            self.done = True
        await self.send({"type": "http.response.body", "body": data, "more_body": not last})


class OpenAIServer:
    """``ChildSpec("http", OpenAIServer(...).run)``: the OpenAI API on ``bound``."""

    def __init__(self, bound: BoundSocket, backend: ModelBackend, pipeline: RequestPipeline,
                 tokenizer_factory: Callable[[], Tokenizer], *, ready: Callable[[], Awaitable[Any]] | None = None,
                 name: str = "http", max_body: int = MAX_BODY,
                 endpoint_types: tuple[str, ...] = ("chat", "completions"), version: str = "") -> None:
        self.bound = bound
        self.backend = backend
        self.pipeline = pipeline
        self.tokenizer_factory = tokenizer_factory
        self.ready = ready
        self.name = name
        self.max_body = max_body
        self.endpoint_types = endpoint_types
        self.version = version
        self.tokenizer: Tokenizer | None = None
        self._runners: dict[int, TokenizerRunner] = {}
        self._limiter = trio.CapacityLimiter(max(1, (os.cpu_count() or 2) - 1))  # one core stays for the loop

    def spec(self) -> ChildSpec:
        return ChildSpec(self.name, self.run, Restart.PERMANENT, shutdown=2.0)

    async def run(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        if self.ready is not None:
            await self.ready()
        if self.tokenizer is None:  # kept across restarts
            self.tokenizer = await trio.to_thread.run_sync(self.tokenizer_factory)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_asgi, self.app(), self.bound)
            ctx.log.info("http.listening", host=self.bound.host, port=self.bound.port)
            task_status.started()

    def runner(self, tokenizer: Tokenizer) -> TokenizerRunner:
        """One runner per tokenizer, all sharing the process's tokenizing threads."""
        runner = self._runners.get(id(tokenizer))
        if runner is None:
            runner = self._runners[id(tokenizer)] = TokenizerRunner(tokenizer, limiter=self._limiter)
        return runner

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/version", self.show_version, methods=["GET"]),
        ]
        for kind, path, chat in (("completions", "/v1/completions", False), ("chat", "/v1/chat/completions", True)):
            if kind in self.endpoint_types:
                routes.append(Route(path, _Asgi(self.completions, chat=chat), methods=["POST"]))
            else:
                routes.append(Route(path, _not_served(path, self.endpoint_types), methods=["POST"]))
        return routes

    def app(self) -> Starlette:
        return Starlette(routes=self.routes())

    async def list_models(self, _: Request) -> Response:
        return JSONResponse({"object": "list", "data": await self.backend.models()})

    async def show_version(self, _: Request) -> Response:
        from importlib.metadata import version as dist_version

        return JSONResponse({"version": self.version or dist_version("llm-supervisor"),
                             "llm_supervisor": dist_version("llm-supervisor")})

    async def _json_body(self, request: Request) -> dict[str, Any]:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body:
                raise RequestError(ErrorCode.PAYLOAD_TOO_LARGE, f"the request body is over the {self.max_body}-byte "
                                   "limit")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise RequestError(ErrorCode.INVALID_REQUEST, f"request body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError(ErrorCode.INVALID_REQUEST, "the request body must be a JSON object")
        return body

    async def tokenize(self, request: Request) -> Response:
        """vllm serve's /tokenize: a prompt, or chat messages through the chat template."""
        try:
            body = await self._json_body(request)
            chat = "messages" in body
            served = await self.backend.serving(body.get("model"), "chat_completions" if chat else "completions")
            tokenizer = served.tokenizer or self.tokenizer
            assert tokenizer is not None
            runner = self.runner(tokenizer)
            if chat:
                call = parse_call({**body, "max_tokens": 1}, chat=True)
                tokens = (await tokenize(call, runner))[0].token_ids
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise RequestError(ErrorCode.INVALID_REQUEST, "prompt must be a string", param="prompt")
                tokens = await runner.encode(prompt)
        except RequestError as exc:
            return error_response(exc)
        return JSONResponse({"count": len(tokens), "max_model_len": served.max_model_len, "tokens": tokens,
                             "token_strs": None})

    async def detokenize(self, request: Request) -> Response:
        try:
            body = await self._json_body(request)
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in tokens):
                raise RequestError(ErrorCode.INVALID_REQUEST, "tokens must be a list of integers", param="tokens")
            served = await self.backend.serving(body.get("model"), "completions")
            tokenizer = served.tokenizer or self.tokenizer
            assert tokenizer is not None
            text = await self.runner(tokenizer).decode(tokens)
        except RequestError as exc:
            return error_response(exc)
        return JSONResponse({"prompt": text})

    # -- completions -------------------------------------------------------------------
    async def completions(self, scope: Scope, receive: Receive, send: Send, chat: bool) -> None:
        exchange = _Exchange(scope, receive, send)
        header_id = _header(scope, b"x-request-id")
        base_id = header_id or uuid.uuid4().hex
        # the id in every log line of this request, here and in the workers it goes to: the client's
        # own x-request-id when it sent one, else the response's id
        request_id = header_id or f"{'chatcmpl' if chat else 'cmpl'}-{base_id}"
        if header_id is not None:
            exchange.headers.append((b"x-request-id", header_id.encode()))
        control = RequestControl()

        async def work(ticket: Ticket) -> None:
            await self._serve(exchange, ticket, chat, base_id)

        outcome = await self.pipeline.run("chat_completions" if chat else "completions", request_id, work,
                                          control=control)
        if outcome.error is not None and not exchange.done:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                try:
                    await self._send_error(exchange, outcome.error)
                except OSError:  # the client is gone
                    pass

    async def _send_error(self, exchange: _Exchange, error: RequestError) -> None:
        status, body = error_body(error)
        if not exchange.started:
            extra = [(b"retry-after", str(max(1, round(error.retry_after))).encode())] if error.retry_after else []
            await exchange.json(status, body, extra)
            return
        # mid-stream: an error event (with a hint whether a retry elsewhere is fine), then the end
        body["error"]["migratable"] = error.migratable
        await exchange.events(_event(body) + _DONE, last=True)

    async def _serve(self, exchange: _Exchange, ticket: Ticket, chat: bool, base_id: str) -> None:
        raw = await exchange.read_body(self.max_body, ticket.control)
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise RequestError(ErrorCode.INVALID_REQUEST, f"request body is not JSON: {exc}") from None
        call = parse_call(body, chat=chat, request_id=base_id)
        served = await self.backend.serving(call.model, call.endpoint)
        tokenizer = served.tokenizer or self.tokenizer
        assert tokenizer is not None
        if served.takes_messages:
            if not call.chat:
                raise RequestError(ErrorCode.INVALID_REQUEST, f"model {served.name!r} takes chat requests (with "
                                   "images) only: use /v1/chat/completions", param="prompt")
            call.prompts = [Prompt([])]  # the backend tokenizes; usage comes from its answer
            payloads = [messages_payload(call)]
        parsing: ChatParsing | None = None
        if not served.takes_messages:
            if call.chat and (served.parsers or call.body.get("tools") or call.body.get("tool_choice")):
                # vLLM's parsers import vLLM the first time: not on the event loop
                directory = getattr(tokenizer, "directory", None)
                parsing = await trio.to_thread.run_sync(ChatParsing.for_request, call.body, served.parsers, directory)
            call.prompts = await tokenize(call, self.runner(tokenizer), parsing.chat_kwargs if parsing else None)
            payloads = [prompt_payload(call, prompt, max_model_len=served.max_model_len) for prompt in call.prompts]
            for payload in payloads:
                if served.adapter is not None:
                    payload["model"] = served.adapter
                if parsing is not None and parsing.guided:  # the call the answer must be (a named tool...)
                    payload["sampling_options"]["guided_decoding"] = parsing.guided
        renderer = Renderer(call, served.name, tokenizer, parsing)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_disconnect, exchange, ticket.control)
            if call.stream:
                await self._stream(exchange, call, renderer, payloads, ticket)
            else:
                async with self._outputs(payloads, ticket) as outputs:
                    async for prompt_index, out in outputs:
                        renderer.take(prompt_index, out)
                await exchange.json(200, renderer.response())
            nursery.cancel_scope.cancel()

    @staticmethod
    async def _watch_disconnect(exchange: _Exchange, control: RequestControl) -> None:
        while True:
            message = await exchange.receive()
            if message["type"] == "http.disconnect":
                if not exchange.done:  # a client hanging up after the end aborts nothing
                    control.cancel(AbortReason.CLIENT_DISCONNECTED)
                return

    async def _stream(self, exchange: _Exchange, call: OpenAICall, renderer: Renderer,
                      payloads: list[dict[str, Any]], ticket: Ticket) -> None:
        if len(payloads) == 1:
            # One prompt (the usual case): straight from the engine's stream. Outputs that piled
            # up while this task waited for its turn go out in one write: the same events, one
            # trip through hypercorn and h11 instead of one per token.
            async with self.backend.generate(payloads[0], f"{ticket.key}-0") as stream:
                await exchange.start_stream()
                events = [_event(c) for c in renderer.first_chunks()]
                async for out in stream:
                    ready: StepOutput | None = out
                    while ready is not None and len(events) < MAX_EVENTS_PER_WRITE:
                        events.extend(_event(c) for c in renderer.chunks(0, ready))
                        ready = stream.next_ready()
                    if ready is not None:
                        events.extend(_event(c) for c in renderer.chunks(0, ready))
                    if events:
                        await exchange.events(b"".join(events))
                    events = []
        else:
            await exchange.start_stream()
            await exchange.events(b"".join(_event(c) for c in renderer.first_chunks()))
            async with self._outputs(payloads, ticket) as outputs:
                async for prompt_index, out in outputs:
                    chunks = renderer.chunks(prompt_index, out)
                    if chunks:
                        await exchange.events(b"".join(_event(c) for c in chunks))
        await exchange.events(b"".join(_event(c) for c in renderer.last_chunks()) + _DONE, last=True)

    @asynccontextmanager
    async def _outputs(self, payloads: list[dict[str, Any]], ticket: Ticket
                       ) -> AsyncIterator[trio.MemoryReceiveChannel[tuple[int, StepOutput]]]:
        """Every prompt's outputs, tagged with the prompt's index, as they come (one engine
        request per prompt, as vllm serve runs a batch: ``<id>-0``, ``<id>-1`` ...)."""
        send, recv = trio.open_memory_channel[tuple[int, StepOutput]](0)

        async def one(index: int, payload: dict[str, Any], out: trio.MemorySendChannel[tuple[int, StepOutput]]
                      ) -> None:
            async with out, self.backend.generate(payload, f"{ticket.key}-{index}") as stream:
                async for step in stream:
                    await out.send((index, step))

        async with trio.open_nursery() as nursery, send:
            for index, payload in enumerate(payloads):
                nursery.start_soon(one, index, payload, send.clone())
            await send.aclose()
            yield recv


class _Asgi:
    """A raw ASGI endpoint for Starlette's router."""

    def __init__(self, fn: Callable[[Scope, Receive, Send, bool], Awaitable[None]], *, chat: bool) -> None:
        self.fn = fn
        self.chat = chat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.fn(scope, receive, send, self.chat)


def _not_served(path: str, served: tuple[str, ...]) -> Callable[[Request], Awaitable[Response]]:
    async def refuse(_: Request) -> Response:
        return error_response(RequestError(ErrorCode.NOT_FOUND, f"{path} is not served here (--endpoint-types "
                                           f"{','.join(served) or 'none'})"))

    return refuse


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            text: str = value.decode("latin-1").strip()
            return text or None
    return None

