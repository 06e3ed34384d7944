"""GET /v1/events: the event hub's subscriptions streamed as NDJSON over HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from tracekeeper_agent.outputs.events import EventHub

IDLE_CHECK_SECONDS = 5.0
"""How often an idle NDJSON stream checks that its client is still there."""


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def ndjson_handler(hub: EventHub) -> Handler:
    """GET handler streaming a subscription as NDJSON; `?probe=ns/name` selects one probe.

    The stream ends when the probe is removed or the hub closes; a client that goes away
    ends the subscription at the next chunk or idle check."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.body_exists:
            # A body left unread pauses reading the connection: the client's leaving would
            # never be seen, and the stream (its subscription, a connection of the cap)
            # would outlive it, holding up the listener's close. Found by the API fuzz.
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "GET /v1/events takes no body"}),
                content_type="application/json",
            )
        probe = request.query.get("probe") or None
        if probe is not None and not hub.has_probe(probe):
            raise web.HTTPNotFound(
                text=json.dumps({"error": f"no events probe {probe} on this node"}),
                content_type="application/json",
            )
        response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        response.content_type = "application/x-ndjson"
        async with hub.subscribe(probe) as sub:
            await response.prepare(request)
            while True:
                try:
                    async with asyncio.timeout(IDLE_CHECK_SECONDS):
                        chunk = await sub.next()
                except TimeoutError:
                    if request.transport is None or request.transport.is_closing():
                        break
                    continue
                if chunk is None:
                    await response.write_eof()
                    break
                try:
                    await response.write(chunk)
                except ConnectionResetError:
                    break
        return response

    return handle
