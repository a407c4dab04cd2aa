"""The frontend's ear on its workers' event planes: KV events into the router's index,
load metrics onto the instances.

With ``--event-plane nats`` the frontend subscribes to the same subjects on NATS (and,
with ``--durable-kv-events``, reads the KV events from the namespace's JetStream stream,
from its start). Otherwise:

One ZMQ SUB socket, connected to the event plane address each worker registered
(``event_plane``; connected and disconnected as workers come and go), subscribed to
``{namespace}.kv-events`` and ``{namespace}.kv_metrics``. A worker's KV events are
numbered; when one is missing (the SUB socket dropped it, or the frontend restarted)
the worker's ``kv_index`` endpoint says what it holds and the index is rebuilt from it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import structlog
import trio
import trio_asyncio
import zmq

from supervisor.client import open_call
from supervisor.planes import zmq_trio
from supervisor.tree import ActorContext, TaskStatus

from .instances import Instance, Instances
from .kv_index import KvIndex

__all__ = ["EventSubscriber"]

_log = structlog.get_logger("actors.frontend.events")


class EventSubscriber:
    """``ChildSpec("events", EventSubscriber(...).run)``."""

    def __init__(self, instances: Instances, index: KvIndex, namespace: str, *,
                 nats_servers: Sequence[str] = (), transport: str = "zmq", durable: bool = False) -> None:
        self.instances = instances
        self.index = index
        self.namespace = namespace
        self.nats_servers = list(nats_servers)
        self.transport = transport
        self.durable = durable
        self.resyncs = 0

    @property
    def subjects(self) -> tuple[str, str]:
        return f"{self.namespace}.kv-events", f"{self.namespace}.kv_metrics"

    async def run(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        if self.transport == "nats":
            await self._run_nats(ctx, task_status=task_status)
            return
        sub = zmq_trio.socket(zmq.SUB, rcvhwm=100_000)
        for subject in (f"{self.namespace}.kv-events", f"{self.namespace}.kv_metrics"):
            sub.setsockopt(zmq.SUBSCRIBE, subject.encode())
        connected: dict[str, str] = {}  # instance id -> address
        try:
            async with trio.open_nursery() as nursery:
                self._follow(sub, connected)
                nursery.start_soon(self._keep_connected, sub, connected)
                task_status.started()
                while True:
                    frames = await zmq_trio.recv_multipart(sub)
                    if len(frames) >= 2:
                        self._handle(ctx, nursery, frames[0].decode(errors="replace"), frames[1])
        finally:
            zmq_trio.close(sub)

    async def _run_nats(self, ctx: ActorContext, *, task_status: TaskStatus) -> None:
        """The same subjects on NATS; with ``durable``, the KV events from the namespace's
        JetStream stream, replayed from its start (a frontend started late learns what the
        workers already cache)."""
        from supervisor.planes.events_nats import ensure_kv_stream, kv_events_stream
        from supervisor.planes.servers import close_nats, connect_nats

        closed = trio.Event()
        incoming_send, incoming_recv = trio.open_memory_channel[tuple[str, bytes, bool]](math.inf)
        nc = await connect_nats(self.nats_servers, name=f"frontend events {self.namespace}", closed=closed)
        try:
            async def on_message(msg: Any) -> None:  # runs in asyncio, same thread
                incoming_send.send_nowait((msg.subject, msg.data, False))

            async def on_stored(msg: Any) -> None:  # from the stream: the last replayed one says so
                pending = getattr(getattr(msg, "metadata", None), "num_pending", None)
                incoming_send.send_nowait((msg.subject, msg.data, pending == 0))

            kv_subject, metrics_subject = self.subjects
            await trio_asyncio.aio_as_trio(nc.subscribe)(metrics_subject, cb=on_message)
            if self.durable:
                from nats.js.api import DeliverPolicy

                js = nc.jetstream()
                await ensure_kv_stream(js, self.namespace)
                info = await trio_asyncio.aio_as_trio(js.stream_info)(kv_events_stream(self.namespace))
                await trio_asyncio.aio_as_trio(js.subscribe)(kv_subject, cb=on_stored, ordered_consumer=True,
                                                             deliver_policy=DeliverPolicy.ALL)
                if not info.state.messages:
                    ctx.log.info("frontend.events_caught_up", replayed=0)
            else:
                await trio_asyncio.aio_as_trio(nc.subscribe)(kv_subject, cb=on_message)
            ctx.log.info("frontend.events_subscribed", transport="nats", durable=self.durable,
                         servers=self.nats_servers)
            task_status.started()
            stored, announced = 0, False
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forget_departed)
                while True:
                    with trio.move_on_after(1.0):
                        subject, payload, last_stored = await incoming_recv.receive()
                        self._handle(ctx, nursery, subject, payload)
                        stored += subject == kv_subject
                        if last_stored and not announced:
                            ctx.log.info("frontend.events_caught_up", replayed=stored)
                            announced = True
                    if closed.is_set():
                        raise ConnectionError("the connection to NATS was closed (reconnect attempts exhausted)")
        finally:
            with ctx.cleanup_scope():
                await close_nats(nc)

    async def _forget_departed(self) -> None:
        """NATS has no per-worker connection to drop: forget a worker's blocks when it leaves."""
        known = set(self.instances.by_id)
        while True:
            changed = self.instances.changed
            await changed.wait()
            now = set(self.instances.by_id)
            for gone in known - now:
                self.index.forget(gone)
            known = now

    async def _keep_connected(self, sub: Any, connected: dict[str, str]) -> None:
        while True:
            changed = self.instances.changed
            self._follow(sub, connected)
            await changed.wait()

    def _follow(self, sub: Any, connected: dict[str, str]) -> None:
        want = {i.id: i.event_plane for i in self.instances.by_id.values()
                if i.event_plane and i.event_plane.startswith("tcp://")}
        for iid, address in list(connected.items()):
            if want.get(iid) != address:
                try:
                    sub.disconnect(address)
                except zmq.ZMQError:
                    pass
                del connected[iid]
                self.index.forget(iid)
        for iid, address in want.items():
            if iid not in connected and address is not None:
                sub.connect(address)
                connected[iid] = address

    def _handle(self, ctx: ActorContext, nursery: trio.Nursery, subject: str, payload: bytes) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            return
        worker = str(message.get("worker_id") or "")
        inst = self.instances.by_id.get(worker)
        if inst is None:
            return
        rank = int(message.get("dp_rank") or 0)
        if subject.endswith(".kv_metrics"):
            used = message.get("kv_used_blocks")
            inst.kv_used_blocks = int(used) if isinstance(used, int) else inst.kv_used_blocks
            return
        in_order = self.index.apply((worker, rank), int(message.get("event_id") or 0), message.get("events") or [])
        if not in_order:
            nursery.start_soon(self._resync, ctx, inst, rank)

    async def _resync(self, ctx: ActorContext, inst: Instance, rank: int) -> None:
        """A gap in a worker's events: take what it holds from its ``kv_index``."""
        self.resyncs += 1
        try:
            with trio.fail_after(10):
                async with open_call(inst.record, "kv_index", {"dp_rank": rank},
                                     nats_servers=self.nats_servers) as call:
                    items = await call.collect()
        except Exception as exc:
            ctx.log.warning("frontend.kv_resync_failed", worker=inst.id, dp_rank=rank, error=str(exc))
            return
        for entry in (items[-1].get("ranks") if items else None) or []:
            if int(entry.get("dp_rank") or 0) == rank:
                self.index.resync((inst.id, rank), [int(h) for h in entry.get("block_hashes") or []],
                                  entry.get("last_event_id"))
                ctx.log.info("frontend.kv_resynced", worker=inst.id, dp_rank=rank, blocks=entry.get("count"))
