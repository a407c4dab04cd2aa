"""The frontend's ear on its workers' event planes: KV events into the router's index,
load metrics onto the instances.

One ZMQ SUB socket, connected to the event plane address each worker registered
(``event_plane``; connected and disconnected as workers come and go), subscribed to
``{namespace}.kv-events`` and ``{namespace}.kv_metrics``. A worker's KV events are
numbered; when one is missing (the SUB socket dropped it, or the frontend restarted)
the worker's ``kv_index`` endpoint says what it holds and the index is rebuilt from it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import structlog
import trio
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
                 nats_servers: Sequence[str] = ()) -> None:
        self.instances = instances
        self.index = index
        self.namespace = namespace
        self.nats_servers = list(nats_servers)
        self.resyncs = 0

    async def run(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
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

    async def _keep_connected(self, sub: Any, connected: dict[str, str]) -> None:
        while True:
            changed = self.instances.changed
            self._follow(sub, connected)
            await changed.wait()

    def _follow(self, sub: Any, connected: dict[str, str]) -> None:
        want = {i.id: i.event_plane for i in self.instances.by_id.values() if i.event_plane}
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
