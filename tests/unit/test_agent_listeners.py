"""The agent's listeners on real loopback sockets: half-sent requests and idle connections
are closed after the idle timeout, connections over the cap are closed at once."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tracekeeper_agent.service.http_api import Listener, ListenerLimits, start_listener

HALF_SENT = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"  # the head never ends
WHOLE = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
PATIENCE = 30.0
"""How long a test waits for the server to act (a failure bound, not a timing)."""


async def _hello(_: web.Request) -> web.Response:
    return web.Response(text="ok")


@pytest.fixture
async def listener(request: pytest.FixtureRequest) -> AsyncIterator[Listener]:
    limits: ListenerLimits = request.param
    app = web.Application()
    app.router.add_get("/metrics", _hello)
    started = await start_listener(app, "127.0.0.1", 0, limits)
    yield started
    await started.close()


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent before closing (b'' for a silent close)."""
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), PATIENCE):
            data += chunk
    except ConnectionResetError:
        pass
    return data


@pytest.mark.parametrize("listener", [ListenerLimits(idle_timeout=0.3, max_connections=100)],
                         indirect=True)  # fmt: skip
async def test_half_sent_requests_are_closed_after_the_idle_timeout(listener: Listener) -> None:
    conns = [await _connect(listener.port) for _ in range(50)]
    for _, writer in conns:
        writer.write(HALF_SENT)
        await writer.drain()
    # Each one ends from the server's side (read returns EOF), no answer given.
    results = await asyncio.gather(*(_closed_by_server(r) for r, _ in conns))
    assert results == [b""] * 50
    for _, writer in conns:
        writer.close()


@pytest.mark.parametrize("listener", [ListenerLimits(idle_timeout=0.3, max_connections=100)],
                         indirect=True)  # fmt: skip
async def test_a_keep_alive_connection_is_served_then_closed_when_idle(listener: Listener) -> None:
    reader, writer = await _connect(listener.port)
    writer.write(WHOLE)
    await writer.drain()
    data = await _closed_by_server(reader)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok")
    writer.close()


@pytest.mark.parametrize("listener", [ListenerLimits(idle_timeout=60.0, max_connections=3)],
                         indirect=True)  # fmt: skip
async def test_connections_over_the_cap_are_closed_and_the_cap_frees_up(
    listener: Listener,
) -> None:
    held = [await _connect(listener.port) for _ in range(3)]
    for _, writer in held:  # each is now a live connection of the server
        writer.write(HALF_SENT)
        await writer.drain()
    for _ in range(200):  # the server has accepted them all
        if listener.open_connections == 3:
            break
        await asyncio.sleep(0.01)
    assert listener.open_connections == 3
    extra_reader, extra_writer = await _connect(listener.port)
    extra_writer.write(WHOLE)
    assert await _closed_by_server(extra_reader) == b""  # over the cap: closed unanswered
    extra_writer.close()
    for _, writer in held:
        writer.close()
        await writer.wait_closed()

    async def served() -> bool:
        reader, writer = await _connect(listener.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = await _closed_by_server(reader)
        writer.close()
        return data.startswith(b"HTTP/1.1 200")

    # Once the held ones are gone, new connections are served again.
    for _ in range(200):
        if await served():
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the listener never accepted a connection again")


async def test_request_bodies_are_never_inflated() -> None:
    """Found by the API fuzz: aiohttp inflated a gzip body on the event loop (1 MiB of gzip
    held the agent's loop for 3 s, before any signature was checked). The listeners hand
    handlers the bytes as sent."""

    async def length(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    app = web.Application()
    app.router.add_put("/v1/state", length)
    started = await start_listener(app, "127.0.0.1", 0, ListenerLimits(30.0, 8))
    bomb = gzip.compress(b" " * (8 << 20))
    try:
        reader, writer = await _connect(started.port)
        head = (
            "PUT /v1/state HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
            f"Content-Length: {len(bomb)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + bomb)
        await writer.drain()
        answer = await _closed_by_server(reader)
        writer.close()
    finally:
        await started.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert answer.rsplit(b"\r\n\r\n", 1)[1] == str(len(bomb)).encode()
