"""Calling workers: find instances through discovery, call an endpoint over the
TCP or NATS request plane, stream the answer, cancel on exit.

Library::

    async with Call(address, "generate", payload) as call:          # TCP: host:port
        async for item in call:
            ...
    async with NatsCall(subject, "generate", payload, servers=[...]) as call:   # NATS
        ...
    async with open_call(record, "generate", payload) as call:      # either, from a discovery record
        ...

NATS (and etcd discovery) are asyncio libraries: run inside
``supervisor.aio.open_asyncio_loop()``.

CLI (prints one JSON line per item; Ctrl-C cancels the request)::

    python -m supervisor.client --endpoint dynamo.backend.generate --payload '{"token_ids": [1, 2]}'
    NATS_SERVER=nats://127.0.0.1:4222 python -m supervisor.client --discovery-backend nats --payload ...
    ETCD_ENDPOINTS=http://127.0.0.1:2379 python -m supervisor.client --discovery-backend etcd --payload ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import trio
import trio_asyncio

from actors.errors import ErrorCode
from actors.protocol import (
    PROBE_HEADER,
    SILENCE_TIMEOUT,
    Cancel,
    Data,
    End,
    Error,
    Frame,
    FrameError,
    FrameReader,
    Heartbeat,
    Request,
    decode_body,
    encode_body,
    encode_frame,
)
from supervisor.aio import open_asyncio_loop
from supervisor.errors import CallError, ServerUnavailable
from supervisor.planes.discovery import Discovery, FileDiscovery, InstanceRecord, MemDiscovery
from supervisor.planes.servers import close_nats, connect_nats, split_urls

# how long leaving a call early waits for the worker to end the request
CANCEL_ACK_TIMEOUT = 1.0

__all__ = ["Call", "CallError", "HttpCall", "NatsCall", "find_instances", "main", "make_discovery", "open_call"]


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


class _End:
    pass


_END = _End()


class StreamCheck:
    """What a client checks of one request's stream: items numbered 0, 1, 2 ... with no
    gap, and an end frame that counts exactly the items that arrived. Anything else is
    a :class:`CallError` with code ``stream_broken`` (migratable): part of an answer is
    never reported as the answer."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.received = 0

    def broken(self, message: str) -> CallError:
        return CallError(ErrorCode.STREAM_BROKEN.value, f"request {self.request_id}: {message}", True,
                         self.request_id)

    def take(self, frame: Frame) -> Any:
        """The item a data frame carries; ``_END`` for the end; None for a heartbeat."""
        if isinstance(frame, Data):
            if frame.seq != self.received:
                raise self.broken(f"item {frame.seq} arrived where item {self.received} was due "
                                  f"({frame.seq - self.received} lost)" if frame.seq > self.received else
                                  f"item {frame.seq} arrived again after item {self.received - 1}")
            self.received += 1
            return frame.payload
        if isinstance(frame, End):
            if frame.count != self.received:
                raise self.broken(f"the worker sent {frame.count} items, {self.received} arrived")
            return _END
        if isinstance(frame, Error):
            raise CallError(frame.code, frame.message, frame.migratable, self.request_id)
        if isinstance(frame, Heartbeat):
            return None
        raise self.broken(f"unexpected {type(frame).__name__.lower()} frame from the worker")

    def silent(self, seconds: float) -> CallError:
        return CallError(ErrorCode.TIMEOUT.value, f"request {self.request_id}: nothing from the worker for "
                         f"{seconds:g}s (not even a heartbeat)", True, self.request_id)

    def cut(self, why: str) -> CallError:
        return CallError(ErrorCode.DISCONNECTED.value, f"request {self.request_id}: {why} after {self.received} "
                         "items, before the end", True, self.request_id)


class _Checked:
    """What every call does with a frame of its request (whatever the transport)."""

    _check: StreamCheck
    done: bool

    def _take(self, frame: Frame) -> Any:
        """The item a frame carries, or None for a heartbeat; StopAsyncIteration at the end;
        CallError for an error or a broken stream (after a gap the worker still runs the
        request, so the call stays open to cancel it)."""
        try:
            item = self._check.take(frame)
        except CallError:
            self.done = not isinstance(frame, Data)
            raise
        if item is _END:
            self.done = True
            raise StopAsyncIteration
        return item


class Call(_Checked):
    """One request on its own connection. Leaving the block early cancels it.

    Iterating yields the items; the stream is checked (:class:`StreamCheck`), and
    ``silence_timeout`` seconds without a frame (the worker sends a heartbeat every
    second while it works) end the call with a migratable ``timeout`` error.
    """

    def __init__(self, address: str, endpoint: str, payload: Any, *, request_id: str | None = None,
                 silence_timeout: float = SILENCE_TIMEOUT) -> None:
        self.address = address
        self.endpoint = endpoint
        self.payload = payload
        self.request_id = request_id or uuid.uuid4().hex
        self.silence_timeout = silence_timeout
        self._stream: trio.SocketStream | None = None
        self._reader = FrameReader()
        self._pending: list[Frame] = []
        self._check = StreamCheck(self.request_id)
        self.done = False

    async def __aenter__(self) -> Call:
        host, port = _split_address(self.address)
        self._stream = await trio.open_tcp_stream(host, port)
        try:
            await self._stream.send_all(encode_frame(Request(self.request_id, self.endpoint, self.payload)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # a worker dying as it accepts resets the connection: as migratable as a cut stream
            stream, self._stream = self._stream, None
            await stream.aclose()
            self.done = True
            raise self._check.cut("the connection to the worker broke while sending the request") from None
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        with trio.CancelScope(shield=True):
            if not self.done:
                try:
                    with trio.move_on_after(CANCEL_ACK_TIMEOUT):
                        await stream.send_all(encode_frame(Cancel(self.request_id)))
                        await self._await_end(stream)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            await stream.aclose()

    async def _await_end(self, stream: trio.SocketStream) -> None:
        """Read until the worker ends our request (its answer to the cancel). Closing with
        its frames unread would reset the connection, and a worker whose write fails on the
        reset before it has read the cancel logs a disconnect rather than a cancel."""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            for frame in self._reader.feed(data):
                if frame.id == self.request_id and isinstance(frame, End | Error):
                    return

    def __aiter__(self) -> Call:
        return self

    async def __anext__(self) -> Any:
        while True:
            while not self._pending:
                if self.done or self._stream is None:
                    raise StopAsyncIteration
                try:
                    with trio.fail_after(self.silence_timeout):
                        data = await self._stream.receive_some(65536)
                except trio.TooSlowError:
                    raise self._check.silent(self.silence_timeout) from None  # __aexit__ cancels it
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.done = True
                    raise self._check.cut("the connection to the worker broke") from None
                if not data:
                    self.done = True
                    raise self._check.cut("the worker closed the connection")
                try:
                    frames = self._reader.feed(data)
                except FrameError as exc:
                    self.done = True
                    raise self._check.broken(str(exc)) from None
                for frame in frames:
                    ours = frame.id == self.request_id or (isinstance(frame, Error) and frame.id == "")
                    if ours:
                        self._pending.append(frame)
            frame = self._pending.pop(0)
            item = self._take(frame)
            if item is not None:
                return item

    async def collect(self) -> list[Any]:
        return [item async for item in self]


NO_RESPONDERS = "503"


class NatsCall(_Checked):
    """One request on the NATS request plane: the Request frame goes to the
    worker's subject with a fresh reply inbox; Data/Error/End frames come back
    on the inbox. Leaving the block early publishes a Cancel frame to the
    worker's subject. Same iteration interface as :class:`Call`.

    ``connection`` reuses a connected nats-py client (else one is opened from
    ``servers`` and closed on exit). The stream is checked as :class:`Call`'s is,
    and ``silence_timeout`` seconds without a frame (heartbeats included) end it
    with a migratable ``timeout`` error.
    """

    def __init__(self, subject: str, endpoint: str, payload: Any, *, servers: Sequence[str] | str | None = None,
                 connection: Any = None, request_id: str | None = None,
                 silence_timeout: float = SILENCE_TIMEOUT) -> None:
        self.subject = subject
        self.endpoint = endpoint
        self.payload = payload
        self.servers = split_urls(servers) or split_urls(os.environ.get("NATS_SERVER")) or ["nats://localhost:4222"]
        self.request_id = request_id or uuid.uuid4().hex
        self.silence_timeout = silence_timeout
        self._check = StreamCheck(self.request_id)
        self._given = connection
        self._nc: Any = None
        self._sub: Any = None
        self._send, self._recv = trio.open_memory_channel[Any](math.inf)
        self.done = False

    async def __aenter__(self) -> NatsCall:
        aio = trio_asyncio.aio_as_trio
        self._nc = self._given or await connect_nats(self.servers, name="client")
        try:
            send = self._send

            async def on_message(msg: Any) -> None:  # runs in asyncio, same thread
                if msg.headers and PROBE_HEADER in msg.headers:
                    if msg.reply:  # the worker asks whether we still listen
                        await msg.respond(b"")
                    return
                try:
                    send.send_nowait(msg)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            inbox = self._nc.new_inbox()
            self._sub = await aio(self._nc.subscribe)(inbox, cb=on_message)
            body = encode_body(Request(self.request_id, self.endpoint, self.payload))
            await aio(self._nc.publish)(self.subject, body, reply=inbox)
            await aio(self._nc.flush)()
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is None:
            return
        aio = trio_asyncio.aio_as_trio
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            try:
                if not self.done and not nc.is_closed:
                    await aio(nc.publish)(self.subject, encode_body(Cancel(self.request_id)))
                    await aio(nc.flush)()
                if self._sub is not None and not nc.is_closed:
                    await aio(self._sub.unsubscribe)()
            except Exception:  # the connection is gone: the worker sees no cancel, nothing more to do
                pass
            finally:
                self._recv.close()
                if self._given is None:
                    await close_nats(nc)

    def __aiter__(self) -> NatsCall:
        return self

    async def __anext__(self) -> Any:
        while True:
            if self.done:
                raise StopAsyncIteration
            try:
                with trio.fail_after(self.silence_timeout):
                    msg = await self._recv.receive()
            except trio.TooSlowError:
                raise self._check.silent(self.silence_timeout) from None  # __aexit__ cancels it
            except (trio.EndOfChannel, trio.ClosedResourceError):
                self.done = True
                raise self._check.cut("the call was closed") from None
            if msg.headers and msg.headers.get("Status") == NO_RESPONDERS:
                self.done = True
                raise CallError(ErrorCode.UNAVAILABLE.value, f"request {self.request_id}: no worker serves "
                                f"{self.subject} (it is gone or not started)", True, self.request_id)
            try:
                frame = decode_body(msg.data)
            except FrameError as exc:
                self.done = True
                raise CallError(ErrorCode.INVALID_FRAME.value, str(exc), False, self.request_id) from None
            if not (frame.id == self.request_id or (isinstance(frame, Error) and frame.id == "")):
                continue
            item = self._take(frame)
            if item is not None:
                return item

    async def collect(self) -> list[Any]:
        return [item async for item in self]


class HttpCall(_Checked):
    """One request on the HTTP request plane: ``POST {address}/rpc`` with the request
    frame; the answer's body streams the TCP plane's frames. Leaving early posts a
    ``cancel`` frame to ``{address}/cancel``. Checked like :class:`Call`."""

    def __init__(self, address: str, endpoint: str, payload: Any, *, request_id: str | None = None,
                 silence_timeout: float = SILENCE_TIMEOUT) -> None:
        self.address = address.rstrip("/")
        self.endpoint = endpoint
        self.payload = payload
        self.request_id = request_id or uuid.uuid4().hex
        self.silence_timeout = silence_timeout
        self._client: Any = None
        self._response: Any = None
        self._chunks: Any = None
        self._reader = FrameReader()
        self._pending: list[Frame] = []
        self._check = StreamCheck(self.request_id)
        self.done = False

    async def __aenter__(self) -> HttpCall:
        import httpx

        self._client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0))
        body = encode_body(Request(self.request_id, self.endpoint, self.payload))
        try:
            request = self._client.build_request("POST", f"{self.address}/rpc", content=body)
            self._response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await self._client.aclose()
            raise ConnectionError(f"cannot reach {self.address}: {exc}") from None
        self._chunks = self._response.aiter_raw()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        import httpx

        with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_ACK_TIMEOUT):
            try:
                if not self.done:
                    await self._client.post(f"{self.address}/cancel", content=encode_body(Cancel(self.request_id)))
                if self._response is not None:
                    await self._response.aclose()
            except httpx.HTTPError:
                pass
            finally:
                await self._client.aclose()

    def __aiter__(self) -> HttpCall:
        return self

    async def __anext__(self) -> Any:
        import httpx

        while True:
            while not self._pending:
                if self.done:
                    raise StopAsyncIteration
                try:
                    with trio.fail_after(self.silence_timeout):
                        data = await self._chunks.__anext__()
                except trio.TooSlowError:
                    raise self._check.silent(self.silence_timeout) from None
                except StopAsyncIteration:
                    self.done = True
                    raise self._check.cut("the worker ended the response") from None
                except httpx.HTTPError as exc:
                    self.done = True
                    raise self._check.cut(f"the HTTP stream broke ({exc})") from None
                try:
                    self._pending.extend(f for f in self._reader.feed(data)
                                         if f.id == self.request_id or (isinstance(f, Error) and f.id == ""))
                except FrameError as exc:
                    self.done = True
                    raise self._check.broken(str(exc)) from None
            frame = self._pending.pop(0)
            item = self._take(frame)
            if item is not None:
                return item

    async def collect(self) -> list[Any]:
        return [item async for item in self]


def open_call(record: InstanceRecord, endpoint: str, payload: Any, *,
              nats_servers: Sequence[str] | str | None = None, nats_connection: Any = None,
              request_id: str | None = None) -> Call | NatsCall | HttpCall:
    """A call to the instance a discovery record describes, on its transport."""
    if record.transport == "http":
        return HttpCall(record.address, endpoint, payload, request_id=request_id)
    if record.transport == "nats":
        return NatsCall(record.address, endpoint, payload, servers=nats_servers, connection=nats_connection,
                        request_id=request_id)
    if record.transport == "tcp":
        return Call(record.address, endpoint, payload, request_id=request_id)
    raise ValueError(f"instance {record.key}: unknown transport {record.transport!r}")


def make_discovery(backend: str = "file", *, directory: Path | None = None,
                   nats_servers: Sequence[str] | str | None = None,
                   etcd_endpoints: Sequence[str] | str | None = None) -> Discovery:
    """A discovery client; server addresses default to NATS_SERVER / ETCD_ENDPOINTS."""
    from supervisor.planes.servers import etcd_endpoints_for, nats_servers_for

    if backend == "file":
        return FileDiscovery(directory)
    if backend == "mem":
        return MemDiscovery()
    if backend == "etcd":
        from supervisor.planes.discovery_etcd import EtcdDiscovery

        return EtcdDiscovery(split_urls(etcd_endpoints) or etcd_endpoints_for())
    if backend == "nats":
        from supervisor.planes.discovery_nats import NatsDiscovery

        return NatsDiscovery(split_urls(nats_servers) or nats_servers_for())
    raise ValueError(f"unknown discovery backend {backend!r} (file, etcd, nats)")


async def find_instances(
    namespace: str, component: str, endpoint: str, *, directory: Path | None = None,
    discovery: Discovery | None = None,
) -> list[InstanceRecord]:
    """Registered instances of ``namespace.component.endpoint`` (file discovery unless
    a ``discovery`` is given; it is left open for the caller to close)."""
    if discovery is not None:
        return await discovery.list(namespace, component, endpoint)
    return await FileDiscovery(directory).list(namespace, component, endpoint)


def _parse_endpoint(text: str) -> tuple[str, str, str]:
    body = text.removeprefix("dyn://")
    parts = body.split(".")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"endpoint must be namespace.component.endpoint (or dyn://...), got {text!r}")
    return parts[0], parts[1], parts[2]


async def _cli(args: argparse.Namespace) -> int:
    async with open_asyncio_loop():  # nats-py and aetcd run on it
        return await _cli_call(args)


async def _cli_call(args: argparse.Namespace) -> int:
    namespace, component, endpoint = _parse_endpoint(args.endpoint)
    try:
        payload = json.loads(args.payload)
    except ValueError as exc:
        print(f"error: --payload is not JSON: {exc}", file=sys.stderr)
        return 2
    if args.address is not None:
        transport = "http" if args.address.startswith(("http://", "https://")) else "tcp"
        record = InstanceRecord(namespace, component, endpoint, "", transport, args.address, "")
    elif args.subject is not None:
        record = InstanceRecord(namespace, component, endpoint, "", "nats", args.subject, "")
    else:
        discovery = make_discovery(args.discovery_backend,
                                   directory=Path(args.discovery_dir) if args.discovery_dir else None,
                                   nats_servers=args.nats_server, etcd_endpoints=args.etcd_endpoints)
        try:
            found = await find_instances(namespace, component, endpoint, discovery=discovery)
        except ServerUnavailable as exc:
            print(f"error: {args.discovery_backend} discovery: {exc}", file=sys.stderr)
            return 1
        finally:
            await discovery.aclose()
        if not found:
            print(f"error: no instance of {namespace}.{component}.{endpoint} is registered "
                  f"({args.discovery_backend} discovery)", file=sys.stderr)
            return 1
        record = found[0]
    try:
        async with open_call(record, endpoint, payload, nats_servers=args.nats_server) as call:
            async for item in call:
                print(json.dumps(item), flush=True)
    except CallError as exc:
        print(json.dumps({"error": exc.code, "message": exc.message, "migratable": exc.migratable}),
              file=sys.stderr)
        return 1
    except OSError as exc:  # ServerUnavailable included
        print(f"error: cannot reach {record.address} ({record.transport}): {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supervisor.client", description=__doc__.split("\n")[0])
    parser.add_argument("--endpoint", default="dynamo.backend.generate", help="namespace.component.endpoint")
    parser.add_argument("--address", default=None,
                        help="host:port (TCP plane) or http://host:port (HTTP plane), skipping discovery")
    parser.add_argument("--subject", default=None, help="a worker's NATS subject (NATS plane), skipping discovery")
    parser.add_argument("--discovery-backend", choices=("file", "etcd", "nats"),
                        default=os.environ.get("DYN_DISCOVERY_BACKEND") or "file",
                        help="where workers registered [env DYN_DISCOVERY_BACKEND] (default: file)")
    parser.add_argument("--discovery-dir", default=None, help="file discovery directory")
    parser.add_argument("--nats-server", default=None,
                        help="NATS URL(s), comma-separated [env NATS_SERVER] (default: nats://localhost:4222)")
    parser.add_argument("--etcd-endpoints", default=None,
                        help="etcd URL(s), comma-separated [env ETCD_ENDPOINTS] (default: http://localhost:2379)")
    parser.add_argument("--payload", required=True, help="the request, as JSON")
    args = parser.parse_args(argv)
    try:
        return trio.run(_cli, args)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
