"""Fixtures for the plane tests: real nats-server and etcd (see tests/servers.py)."""

from __future__ import annotations

from tests.servers import etcd_server, nats_server  # noqa: F401
