"""Calling workers: find instances through discovery, call an endpoint over the
TCP request plane, stream the answer, cancel on exit.

Library::

    async with Call(address, "generate", payload) as call:
        async for item in call:
            ...

CLI (prints one JSON line per item; Ctrl-C cancels the request)::

    python -m supervisor.client --endpoint dynamo.backend.generate --payload '{"token_ids": [1, 2]}'
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

from actors.protocol import Cancel, Data, End, Error, FrameReader, Request, encode_frame
from supervisor.planes.discovery import FileDiscovery, InstanceRecord

__all__ = ["Call", "CallError", "find_instances", "main"]


class CallError(Exception):
    """The worker ended the request with an error frame."""

    def __init__(self, code: str, message: str, migratable: bool) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.migratable = migratable


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


class Call:
    """One request on its own connection. Leaving the block early cancels it."""

    def __init__(self, address: str, endpoint: str, payload: Any, *, request_id: str | None = None) -> None:
        self.address = address
        self.endpoint = endpoint
        self.payload = payload
        self.request_id = request_id or uuid.uuid4().hex
        self._stream: trio.SocketStream | None = None
        self._reader = FrameReader()
        self._pending: list[Any] = []
        self.done = False

    async def __aenter__(self) -> Call:
        host, port = _split_address(self.address)
        self._stream = await trio.open_tcp_stream(host, port)
        await self._stream.send_all(encode_frame(Request(self.request_id, self.endpoint, self.payload)))
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
                    with trio.move_on_after(1.0):
                        await stream.send_all(encode_frame(Cancel(self.request_id)))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            await stream.aclose()

    def __aiter__(self) -> Call:
        return self

    async def __anext__(self) -> Any:
        while not self._pending:
            if self.done or self._stream is None:
                raise StopAsyncIteration
            data = await self._stream.receive_some(65536)
            if not data:
                self.done = True
                raise CallError("disconnected", "the worker closed the connection mid-request", True)
            for frame in self._reader.feed(data):
                ours = frame.id == self.request_id or (isinstance(frame, Error) and frame.id == "")
                if ours and isinstance(frame, Data | End | Error):
                    self._pending.append(frame)
        frame = self._pending.pop(0)
        if isinstance(frame, Data):
            return frame.payload
        self.done = True
        if isinstance(frame, Error):
            raise CallError(frame.code, frame.message, frame.migratable)
        raise StopAsyncIteration

    async def collect(self) -> list[Any]:
        return [item async for item in self]


async def find_instances(
    namespace: str, component: str, endpoint: str, *, directory: Path | None = None
) -> list[InstanceRecord]:
    return await FileDiscovery(directory).list(namespace, component, endpoint)


def _parse_endpoint(text: str) -> tuple[str, str, str]:
    body = text.removeprefix("dyn://")
    parts = body.split(".")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"endpoint must be namespace.component.endpoint (or dyn://...), got {text!r}")
    return parts[0], parts[1], parts[2]


async def _cli(args: argparse.Namespace) -> int:
    namespace, component, endpoint = _parse_endpoint(args.endpoint)
    address = args.address
    if address is None:
        found = await find_instances(namespace, component, endpoint,
                                     directory=Path(args.discovery_dir) if args.discovery_dir else None)
        if not found:
            print(f"error: no instance of {namespace}.{component}.{endpoint} is registered", file=sys.stderr)
            return 1
        address = found[0].address
    try:
        payload = json.loads(args.payload)
    except ValueError as exc:
        print(f"error: --payload is not JSON: {exc}", file=sys.stderr)
        return 2
    try:
        async with Call(address, endpoint, payload) as call:
            async for item in call:
                print(json.dumps(item), flush=True)
    except CallError as exc:
        print(json.dumps({"error": exc.code, "message": exc.message, "migratable": exc.migratable}),
              file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot reach {address}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supervisor.client", description=__doc__.split("\n")[0])
    parser.add_argument("--endpoint", default="dynamo.backend.generate", help="namespace.component.endpoint")
    parser.add_argument("--address", default=None, help="host:port, skipping discovery")
    parser.add_argument("--discovery-dir", default=None, help="file discovery directory")
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
