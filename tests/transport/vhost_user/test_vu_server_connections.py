"""The server's connection lifecycle: no memory kept per connection that ends in a
protocol error."""

from __future__ import annotations

import gc
import logging
import socket
import tracemalloc

import pytest
import trio

from virtio.testing.vhost_user_frontend import EchoDevice
from virtio.transport.vhost_user.messages import HEADER
from virtio.transport.vhost_user.messages import FrontendRequest as R
from virtio.transport.vhost_user.server import ERROR_HISTORY, VhostUserServer

# ------------------------------------------------------------------ no memory per bad connection

TRUNCATED_HEADER = HEADER.pack(R.GET_FEATURES, 1, 0)[:5]
UNKNOWN_REQUEST = HEADER.pack(9999, 1, 0)
BAD_CONNECTIONS = 1000
MAX_GROWTH_PER_CONNECTION = 100
"""Bytes.  Measured over 1,000 connections (tracemalloc, after 2 * ERROR_HISTORY to fill
the history): before the fix ~5,400 B per truncated header and ~560 B per unknown
request (every exception was kept, a raised one with its traceback and so every frame
of the dead connection); after it ~0-20 B, the bounded history settling."""


@pytest.mark.parametrize(
    ("data", "kind", "message"),
    [
        (TRUNCATED_HEADER, "PartialMessage", "connection closed after 5 bytes"),
        (UNKNOWN_REQUEST, "UnknownRequest", "unknown front-end request 9999"),
    ],
    ids=["truncated-header", "unknown-request"],
)
async def test_connections_ending_in_protocol_errors_keep_no_memory(
    data: bytes, kind: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL)  # caplog itself would keep every record
    server = VhostUserServer(EchoDevice())

    async def bad_connection() -> None:
        ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        await ours.send(data)
        ours.shutdown(socket.SHUT_WR)
        await server.serve_connection(theirs)
        ours.close()

    tracemalloc.start()
    try:
        for _ in range(2 * ERROR_HISTORY):  # fills the error history
            await bad_connection()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(BAD_CONNECTIONS):
            await bad_connection()
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert growth / BAD_CONNECTIONS < MAX_GROWTH_PER_CONNECTION, growth
    total = 2 * ERROR_HISTORY + BAD_CONNECTIONS
    assert server.connections == total
    assert server.error_counts[kind] == total
    assert len(server.errors) == ERROR_HISTORY
    last = server.errors[-1]
    assert last.kind == kind and last.connection == f"{server.name}#{total}"
    assert message in last.message
