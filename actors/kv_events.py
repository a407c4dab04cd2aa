"""The KV event relay: vLLM's ZMQ KV event stream -> the event plane (and a local index).

vLLM (each data-parallel rank's engine core) publishes on a ZMQ PUB socket
three frames per batch: ``[topic, seq (u64 big-endian), msgpack EventBatch
[ts, events, dp_rank]]``, ``seq`` counting from 0. It keeps the last batches
for replay on a ROUTER socket: a DEALER sends ``[b"", start_seq]`` and gets
``[b"", topic, seq, payload]`` for every buffered batch from ``start_seq`` on,
then an end marker whose ``seq`` is ``0xff * 8``.

For every rank the relay follows the stream in ``seq`` order:

- a batch it already relayed (``seq <= last``) is dropped;
- the next one (``last + 1``) is decoded, published on ``{namespace}.kv-events``
  and applied to the local index, then ``last`` moves on; these three happen
  together, shielded from cancellation, so a kill never splits them;
- a jump (``seq > last + 1``) is a gap: the missing batches are asked for
  from the replay socket first; what the replay cannot give any more is
  logged as lost, never silently skipped.

``last`` and the index live in :class:`KvEventsState`, owned above the actor:
a restarted relay asks for a replay from ``last + 1`` at once (and once more
after its subscription has settled), so it neither loses nor repeats a batch.

Who listens: vLLM binds a wildcard (``tcp://*:port``) or ipc endpoint and
connects to any other; the worker's default endpoint is ``tcp://127.0.0.1:port``,
so vLLM connects and the relay binds there, on loopback (the replay socket vLLM
always binds, also on loopback). A SUB socket the relay binds is owned above the
actor too: bound at the relay's first start and kept across its restarts, so the
port never passes to another process while vLLM is connected to it, and batches
sent during a restart wait in the socket. If the port is taken the relay starts
anyway (a synthetic engine publishes nothing), logs it and tries again every
:data:`BIND_RETRY_S`; a vLLM engine has already refused to start on a taken port
(``kv_event_ports_taken``).

A malformed frame or an event of an unknown type is logged and skipped; a
batch whose payload cannot be decoded still counts as seen (a replay would
only return the same bytes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
import trio
import zmq

from supervisor.planes import zmq_trio
from supervisor.planes.events import EventPublisher
from supervisor.tree import ActorContext, TaskStatus

from .errors import BadBatch, RequestError
from .handlers import Emit

__all__ = [
    "END_SEQ",
    "AllBlocksCleared",
    "BadBatch",
    "BlockRemoved",
    "BlockStored",
    "EventBatch",
    "KvEventSource",
    "KvEventsRelay",
    "KvEventsState",
    "RankStream",
    "decode_batch",
    "kv_event_sources",
    "normalize_hash",
]

_log = structlog.get_logger("actors.kv_events")

END_SEQ = 2**64 - 1  # the replay socket's end marker: 0xff * 8
_U64 = 2**64 - 1
REPLAY_TIMEOUT_S = 2.0  # a replay silent for this long is given up on (and logged)
SETTLE_S = 0.5  # after (re)connecting, replay once more when the subscription has surely arrived
PUBLISH_TIMEOUT_S = 5.0
RCV_HWM = 100_000
BIND_RETRY_S = 2.0  # a taken port is tried again this often


# -- decoding -----------------------------------------------------------------------------------



@dataclass(frozen=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "stored",
            "block_hashes": list(self.block_hashes),
            "parent_hash": self.parent_hash,
            "token_ids": list(self.token_ids),
            "block_size": self.block_size,
            "lora_id": self.lora_id,
            "lora_name": self.lora_name,
            "medium": self.medium,
        }


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"type": "removed", "block_hashes": list(self.block_hashes), "medium": self.medium}


@dataclass(frozen=True)
class AllBlocksCleared:
    def to_wire(self) -> dict[str, Any]:
        return {"type": "cleared"}


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass
class EventBatch:
    ts: float
    events: list[KvEvent]
    dp_rank: int | None
    skipped: list[str] = field(default_factory=list)  # why events were left out


def normalize_hash(value: Any) -> int:
    """A block hash as an unsigned 64-bit integer. vLLM sends ints, or (its
    default) sha256 bytes, which it would turn into ints the same way
    (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``): the low 64 bits, big-endian."""
    if isinstance(value, bool):
        raise BadBatch(f"block hash must be an integer or bytes, got {value!r}")
    if isinstance(value, int):
        return value & _U64
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if not raw:
            raise BadBatch("empty block hash")
        return int.from_bytes(raw, "big") & _U64
    raise BadBatch(f"block hash must be an integer or bytes, got {type(value).__name__}")


def _hashes(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise BadBatch(f"{what}: block_hashes must be a list, got {type(value).__name__}")
    return tuple(normalize_hash(h) for h in value)


def _opt_int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadBatch(f"{what} must be an integer or null, got {value!r}")
    return value


def _opt_str(value: Any, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise BadBatch(f"{what} must be a string or null, got {value!r}")


_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name")
_REMOVED_FIELDS = ("block_hashes", "medium")


def _fields(raw: Any, names: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """(tag, fields) from a tagged map ``{"type": T, ...}`` or a tagged array ``[T, ...]``."""
    if isinstance(raw, Mapping):
        tag = raw.get("type")
        if not isinstance(tag, str):
            raise BadBatch(f"event without a type tag: {sorted(map(str, raw))}")
        return tag, dict(raw)
    if isinstance(raw, list | tuple) and raw and isinstance(raw[0], str):
        return raw[0], dict(zip(names, raw[1:], strict=False))
    raise BadBatch(f"event must be a tagged map or array, got {type(raw).__name__}")


def decode_event(raw: Any) -> KvEvent:
    """One event; :class:`BadBatch` if it is malformed, ``LookupError`` if its type is unknown."""
    tag, _ = _fields(raw, ())
    if tag == "BlockStored":
        _, f = _fields(raw, _STORED_FIELDS)
        tokens = f.get("token_ids") or []
        if not isinstance(tokens, list | tuple) or any(isinstance(t, bool) or not isinstance(t, int) for t in tokens):
            raise BadBatch("BlockStored: token_ids must be a list of integers")
        block_size = f.get("block_size")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise BadBatch(f"BlockStored: block_size must be a positive integer, got {block_size!r}")
        parent = f.get("parent_block_hash")
        return BlockStored(
            block_hashes=_hashes(f.get("block_hashes"), "BlockStored"),
            parent_hash=None if parent is None else normalize_hash(parent),
            token_ids=tuple(tokens),
            block_size=block_size,
            lora_id=_opt_int(f.get("lora_id"), "BlockStored.lora_id"),
            medium=_opt_str(f.get("medium"), "BlockStored.medium"),
            lora_name=_opt_str(f.get("lora_name"), "BlockStored.lora_name"),
        )
    if tag == "BlockRemoved":
        _, f = _fields(raw, _REMOVED_FIELDS)
        return BlockRemoved(_hashes(f.get("block_hashes"), "BlockRemoved"),
                            _opt_str(f.get("medium"), "BlockRemoved.medium"))
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    raise LookupError(f"unknown KV event type {tag!r}")


def decode_batch(payload: bytes) -> EventBatch:
    """vLLM's msgpack ``EventBatch [ts, events, dp_rank]``. A malformed or
    unknown event is left out (and named in ``skipped``); a payload that is
    not a batch at all raises :class:`BadBatch`."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise BadBatch(f"not msgpack: {exc}") from None
    if isinstance(raw, Mapping):  # a map-encoded batch
        raw = [raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")]
    if not isinstance(raw, list | tuple) or len(raw) < 2:
        raise BadBatch(f"an EventBatch is [ts, events, dp_rank], got {type(raw).__name__}")
    ts, events = raw[0], raw[1]
    dp_rank = raw[2] if len(raw) > 2 else None
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise BadBatch(f"EventBatch.ts must be a number, got {ts!r}")
    if not isinstance(events, list | tuple):
        raise BadBatch(f"EventBatch.events must be a list, got {type(events).__name__}")
    if dp_rank is not None and (isinstance(dp_rank, bool) or not isinstance(dp_rank, int)):
        raise BadBatch(f"EventBatch.dp_rank must be an integer, got {dp_rank!r}")
    batch = EventBatch(float(ts), [], dp_rank)
    for item in events:
        try:
            batch.events.append(decode_event(item))
        except (BadBatch, LookupError) as exc:
            batch.skipped.append(str(exc.args[0]) if exc.args else type(exc).__name__)
    return batch


# -- state owned above the actor ------------------------------------------------------------------


@dataclass(frozen=True)
class KvEventSource:
    """Where one rank's events come from. ``bind`` when vLLM connects to us."""

    dp_rank: int
    endpoint: str
    replay_endpoint: str | None = None
    bind: bool = False


@dataclass
class RankStream:
    """One rank's position in the stream, its index and its counters."""

    source: KvEventSource
    last_seq: int = -1
    blocks: dict[int, int | None] = field(default_factory=dict)  # hash -> parent hash
    relayed: int = 0
    replayed: int = 0
    duplicates: int = 0
    gaps: int = 0
    lost: int = 0
    bad_frames: int = 0
    skipped_events: int = 0
    replay_failures: int = 0
    bind_failures: int = 0
    # The SUB socket bound on ``source.endpoint`` (when ``source.bind``): bound at the
    # relay's first start, then kept here, across restarts, until the state is closed.
    bound: zmq.Socket[Any] | None = field(default=None, repr=False, compare=False)

    def counters(self) -> dict[str, int]:
        return {
            "relayed": self.relayed, "replayed": self.replayed, "duplicates": self.duplicates,
            "gaps": self.gaps, "lost": self.lost, "bad_frames": self.bad_frames,
            "skipped_events": self.skipped_events, "replay_failures": self.replay_failures,
        }


@dataclass
class KvEventsState:
    """What outlives relay restarts: per-rank position and index."""

    streams: dict[int, RankStream]
    namespace: str
    worker_id: str
    enable_index: bool = True

    @classmethod
    def for_sources(cls, sources: Sequence[KvEventSource], *, namespace: str, worker_id: str,
                    enable_index: bool = True) -> KvEventsState:
        return cls({s.dp_rank: RankStream(s) for s in sources}, namespace, worker_id, enable_index)

    @property
    def subject(self) -> str:
        return f"{self.namespace}.kv-events"

    def close(self) -> None:
        """Close the sockets the relay bound (once the relay has stopped for good)."""
        for stream in self.streams.values():
            if stream.bound is not None:
                zmq_trio.close(stream.bound)
                stream.bound = None

    def index(self, dp_rank: int | None = None) -> list[dict[str, Any]]:
        ranks = sorted(self.streams) if dp_rank is None else [dp_rank]
        out = []
        for rank in ranks:
            stream = self.streams.get(rank)
            if stream is None:
                continue
            out.append({
                "dp_rank": rank,
                "block_hashes": sorted(stream.blocks),
                "count": len(stream.blocks),
                "last_event_id": stream.last_seq,
            })
        return out

    async def kv_index(self, payload: Any, emit: Emit, request_id: str) -> None:
        """The ``kv_index`` endpoint: the stored block hashes per dp rank."""
        rank = payload.get("dp_rank") if isinstance(payload, Mapping) else None
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
            raise RequestError("invalid_request", f"dp_rank must be an integer, got {rank!r}")
        if rank is not None and rank not in self.streams:
            raise RequestError("invalid_request",
                               f"dp_rank {rank} is not served here (ranks: {sorted(self.streams)})")
        await emit({"worker_id": self.worker_id, "ranks": self.index(rank)})


def _connect_address(endpoint: str) -> str:
    for wildcard in ("*", "0.0.0.0"):
        endpoint = endpoint.replace(f"//{wildcard}:", "//127.0.0.1:")
    return endpoint.replace("//[::]:", "//127.0.0.1:")


def _offset(endpoint: str, rank: int) -> str:
    """vLLM's ``ZmqEventPublisher.offset_endpoint_port``: rank r binds port + r."""
    if rank == 0:
        return endpoint
    if "inproc" in endpoint:
        return f"{endpoint}_dp{rank}"
    base, _, port = endpoint.rpartition(":")
    if not endpoint.startswith("tcp://") or not port.isdigit() or int(port) == 0:
        return endpoint
    return f"{base}:{int(port) + rank}"


def kv_event_sources(kv_events_config: Mapping[str, Any] | None, ranks: Sequence[int]) -> list[KvEventSource]:
    """Where to listen for the ranks this process hosts, from the engine's kv_events_config."""
    cfg = kv_events_config or {}
    if not cfg.get("enable_kv_cache_events") or cfg.get("publisher", "zmq") != "zmq":
        return []
    endpoint = str(cfg.get("endpoint") or "tcp://*:5557")
    replay = cfg.get("replay_endpoint")
    sources = []
    for rank in ranks:
        ep = _offset(endpoint, rank)
        vllm_binds = "*" in ep or "::" in ep or ep.startswith(("ipc://", "inproc://"))
        sources.append(KvEventSource(
            dp_rank=rank,
            endpoint=_connect_address(ep) if vllm_binds else ep,
            replay_endpoint=_connect_address(_offset(str(replay), rank)) if replay else None,
            bind=not vllm_binds,
        ))
    return sources


# -- the actor --------------------------------------------------------------------------------------


def _worth_logging(count: int) -> bool:
    return count <= 10 or count % 1000 == 0


class KvEventsRelay:
    """``ChildSpec("kv_events", KvEventsRelay(state, publisher).run)``."""

    def __init__(self, state: KvEventsState, publisher: EventPublisher, *,
                 replay_timeout: float = REPLAY_TIMEOUT_S, settle_s: float = SETTLE_S) -> None:
        self.state = state
        self.publisher = publisher
        self.replay_timeout = replay_timeout
        self.settle_s = settle_s

    async def run(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for stream in self.state.streams.values():
                await nursery.start(self._follow, stream)
            ctx.log.info("kv_events.following", ranks=sorted(self.state.streams),
                         endpoints=[s.source.endpoint for s in self.state.streams.values()],
                         resume_from={r: s.last_seq + 1 for r, s in self.state.streams.items()})
            task_status.started()

    async def _follow(self, stream: RankStream, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        source = stream.source
        if source.bind:  # vLLM connects to us: the socket is the state's, never closed here
            bound = _bound_socket(stream)
            task_status.started()
            while bound is None:
                await trio.sleep(BIND_RETRY_S)
                bound = _bound_socket(stream)
            await self._consume(stream, bound)
            return
        sub = zmq_trio.socket(zmq.SUB, rcvhwm=RCV_HWM)
        try:
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(source.endpoint)
            task_status.started()
            await self._consume(stream, sub)
        finally:
            zmq_trio.close(sub)

    async def _consume(self, stream: RankStream, sub: zmq.Socket[Any]) -> None:
        # Whatever was published while nobody listened (or before a restart).
        await self._replay(stream, stream.last_seq + 1)
        settle_at = trio.current_time() + self.settle_s
        while True:
            frames: list[bytes] | None = None
            with trio.move_on_at(settle_at):
                frames = await zmq_trio.recv_multipart(sub)
            if frames is None:
                # a batch published before the subscription reached vLLM is
                # in neither the first replay nor the live stream
                settle_at = math.inf
                await self._replay(stream, stream.last_seq + 1)
                continue
            await self._on_frames(stream, frames)

    async def _on_frames(self, stream: RankStream, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self._bad(stream, "kv_events.bad_frame", frames=len(frames), sizes=[len(f) for f in frames[:4]])
            return
        await self._accept(stream, int.from_bytes(frames[1], "big"), frames[2])

    async def _accept(self, stream: RankStream, seq: int, payload: bytes) -> None:
        if seq <= stream.last_seq:
            stream.duplicates += 1
            return
        if seq > stream.last_seq + 1:
            stream.gaps += 1
            first_missing = stream.last_seq + 1
            _log.info("kv_events.gap", dp_rank=stream.source.dp_rank, missing_from=first_missing,
                      missing_to=seq - 1)
            complete = await self._replay(stream, first_missing)
            if seq <= stream.last_seq:
                stream.duplicates += 1  # the replay brought it
                return
            if complete or not _decodes(payload):
                # vLLM published this batch before we asked, so a complete
                # replay holds it: a frame beyond it is not from vLLM's stream.
                self._bad(stream, "kv_events.bad_frame", seq=seq, reason="sequence number beyond the stream")
                return
            self._lost(stream, stream.last_seq + 1, seq - 1)
        await self._apply(stream, seq, payload)

    def _bad(self, stream: RankStream, event: str, **fields: Any) -> None:
        stream.bad_frames += 1
        if _worth_logging(stream.bad_frames):
            _log.warning(event, dp_rank=stream.source.dp_rank, count=stream.bad_frames, **fields)

    def _lost(self, stream: RankStream, first: int, last: int) -> None:
        stream.lost += last - first + 1
        _log.error("kv_events.lost", dp_rank=stream.source.dp_rank, first=first, last=last,
                   reason="not in vLLM's replay buffer")
        stream.last_seq = last

    async def _replay(self, stream: RankStream, start: int) -> bool:
        """Ask vLLM for every batch from ``start`` on and apply them in order.
        True when the replay came to its end marker. A replay may be long (the
        buffer holds thousands of batches): only silence ends it early."""
        endpoint = stream.source.replay_endpoint
        if endpoint is None:
            return False
        complete = False
        silent = False
        dealer = zmq_trio.socket(zmq.DEALER)
        got = 0
        try:
            dealer.connect(endpoint)
            await zmq_trio.send_multipart(dealer, [b"", start.to_bytes(8, "big")])
            while True:
                frames: list[bytes] | None = None
                with trio.move_on_after(self.replay_timeout):
                    frames = await zmq_trio.recv_multipart(dealer)
                if frames is None:
                    silent = True
                    break
                if len(frames) != 4 or frames[0] != b"" or len(frames[2]) != 8:
                    self._bad(stream, "kv_events.bad_replay_frame", frames=len(frames))
                    continue
                seq = int.from_bytes(frames[2], "big")
                if seq == END_SEQ:
                    complete = True
                    break
                if seq <= stream.last_seq:
                    continue
                if seq > stream.last_seq + 1:
                    self._lost(stream, stream.last_seq + 1, seq - 1)
                got += 1
                stream.replayed += 1
                await self._apply(stream, seq, frames[3])
            if silent:
                stream.replay_failures += 1
                if _worth_logging(stream.replay_failures):
                    # before vLLM ever published (the synthetic engine never does) this is expected
                    log = _log.warning if stream.last_seq >= 0 else _log.info
                    log("kv_events.replay_unanswered", dp_rank=stream.source.dp_rank, start=start,
                        endpoint=endpoint, silent_s=self.replay_timeout, applied=got)
            elif got:
                _log.info("kv_events.replayed", dp_rank=stream.source.dp_rank, start=start, batches=got)
        finally:
            zmq_trio.close(dealer)
        return complete

    async def _apply(self, stream: RankStream, seq: int, payload: bytes) -> None:
        rank = stream.source.dp_rank
        batch: EventBatch | None = None
        try:
            batch = decode_batch(payload)
        except BadBatch as exc:
            self._bad(stream, "kv_events.bad_batch", seq=seq, error=str(exc))
        if batch is not None and batch.skipped:
            stream.skipped_events += len(batch.skipped)
            _log.warning("kv_events.skipped_events", dp_rank=rank, seq=seq, reasons=batch.skipped[:5],
                         count=len(batch.skipped))
        message = None
        if batch is not None:  # even with no events left: event ids stay contiguous downstream
            message = json.dumps({
                "worker_id": self.state.worker_id,
                "dp_rank": rank if batch.dp_rank is None else batch.dp_rank,
                "event_id": seq,
                "ts": batch.ts,
                "events": [e.to_wire() for e in batch.events],
            }, separators=(",", ":")).encode()
        # Publish, index and advance together: a kill must not split them.
        with trio.CancelScope(shield=True):
            if message is not None:
                with trio.fail_after(PUBLISH_TIMEOUT_S):
                    await self.publisher.publish(self.state.subject, message)
                stream.relayed += 1
            if batch is not None and self.state.enable_index:
                _index(stream.blocks, batch.events)
            stream.last_seq = seq


def _bound_socket(stream: RankStream) -> zmq.Socket[Any] | None:
    """The stream's SUB socket bound on its endpoint, bound now if it was not yet;
    None (logged) while the address cannot be bound."""
    if stream.bound is not None:
        return stream.bound
    endpoint = stream.source.endpoint
    sub = zmq_trio.socket(zmq.SUB, rcvhwm=RCV_HWM)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.bind(endpoint)
    except zmq.ZMQError as exc:
        zmq_trio.close(sub)
        stream.bind_failures += 1
        if _worth_logging(stream.bind_failures):
            _log.error("kv_events.bind_failed", dp_rank=stream.source.dp_rank, endpoint=endpoint, error=str(exc),
                       count=stream.bind_failures, retry_s=BIND_RETRY_S,
                       hint="another process holds the port: move it with DYN_VLLM_KV_EVENT_PORT")
        return None
    stream.bound = sub
    _log.info("kv_events.listening", dp_rank=stream.source.dp_rank, endpoint=endpoint)
    return sub


def _decodes(payload: bytes) -> bool:
    try:
        decode_batch(payload)
    except BadBatch:
        return False
    return True


def _index(blocks: dict[int, int | None], events: Sequence[KvEvent]) -> None:
    for event in events:
        if isinstance(event, BlockStored):
            parent = event.parent_hash
            for h in event.block_hashes:
                blocks[h] = parent
                parent = h
        elif isinstance(event, BlockRemoved):
            for h in event.block_hashes:
                blocks.pop(h, None)
        else:
            blocks.clear()
