"""The agent's HTTP API: desired state from the operator, reports, events, metrics.

Every route but the probes (/healthz, /readyz) needs a request signed with the token
(tracekeeper_api.signing: the operator's way; the answer is signed back) or
`Authorization: Bearer <token>` (tools talking to one agent directly); both are compared
in constant time.

The metrics app (`serve --metrics-listen`) is the other listener: GET /metrics only,
without a token, for Prometheus. The API token authorizes loading programs on every
node and must never be handed to a scraper; this listener reads and changes nothing else.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError

from tracekeeper_agent.host.tracefs import TracefsError, available_tracepoints
from tracekeeper_agent.outputs.cost import CostLedger
from tracekeeper_agent.outputs.events import EventHub
from tracekeeper_agent.reconcile.reconciler import Reconciler, StaleRevision, StateRefused
from tracekeeper_agent.service.event_stream import ndjson_handler
from tracekeeper_agent.service.values import values_handler
from tracekeeper_api import signing
from tracekeeper_api.output import select_tracepoints
from tracekeeper_api.protocol import NodeReport, NodeState, StaleRevisionBody

log = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
TOKEN_ENV = "TRACEKEEPER_TOKEN"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def read_token(token_file: Path | None, environ: Mapping[str, str] = os.environ) -> str:
    """The bearer token: the mounted Secret's file if given, else $TRACEKEEPER_TOKEN."""
    raw = token_file.read_text() if token_file is not None else environ.get(TOKEN_ENV, "")
    token = raw.strip()
    if not token:
        source = str(token_file) if token_file is not None else f"${TOKEN_ENV}"
        raise ValueError(f"no API token: {source} is empty or unset")
    return token


class TokenFile:
    """The token of a mounted Secret, read again when the file changes, so that a rotated
    Secret needs no agent restart (the operator re-reads its copy the same way). While the
    file is missing or empty (mid-update) the last token stays in force."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._token = read_token(path)
        self._seen = self._version()

    def _version(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)  # follows the Secret volume's ..data symlink
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def __call__(self) -> str:
        version = self._version()
        if version is not None and version != self._seen:
            try:
                self._token = read_token(self.path)
                self._seen = version
            except (OSError, ValueError) as exc:
                log.warning("keeping the current API token: %s", exc)
        return self._token


def token_source(
    token_file: Path | None, environ: Mapping[str, str] = os.environ
) -> Callable[[], str]:
    """Where requests' tokens are checked against; raises ValueError when there is none."""
    if token_file is not None:
        return TokenFile(token_file)
    token = read_token(None, environ)
    return lambda: token


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """pydantic errors as [{"loc": "probes.0.spec.tracepoint", "msg": ...}] (wire names)."""
    return [
        {
            "loc": ".".join(str(p) for p in err["loc"]),
            "msg": err["msg"].removeprefix("Value error, "),
        }
        for err in exc.errors(include_url=False, include_input=False)
    ]


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _unauthorized(message: str) -> web.Response:
    return web.json_response(
        {"error": message},
        status=401,
        headers={"WWW-Authenticate": f'Bearer realm="tracekeeper-agent", {signing.SCHEME}'},
    )


def _auth_middleware(token: Callable[[], str]) -> Middleware:
    """Signed requests (the operator's) get signed answers; a bearer token is still taken
    from tools that call one agent directly (curl, the demo's event stream, benchmarks).
    The operator never sends the token, so a peer posing as an agent never sees it."""

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        if request.headers.get("Content-Encoding", "identity").lower() != "identity":
            return _error(415, "request bodies are taken as sent: no Content-Encoding")
        header = request.headers.get(signing.REQUEST_HEADER, "")
        key = token()
        if signing.is_signed(header):
            try:
                # Shape and clock skew first: no body is read for a stale or malformed one.
                signature = signing.parse_request(header)
                body = await request.read()  # bounded by client_max_size (413 beyond)
                signing.verify_request(key, signature, request.method, request.raw_path, body)
            except signing.SignatureError as exc:
                return _unauthorized(str(exc))
            response = await handler(request)
            if isinstance(response, web.Response) and isinstance(response.body, bytes):
                response.headers[signing.RESPONSE_HEADER] = signing.sign_response(
                    key, signature.nonce, response.status, response.body
                )
            return response  # a stream (GET /v1/events) is not signed: it is not state
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(), key.encode()
        ):
            return _unauthorized("a signed request or a valid bearer token is required")
        return await handler(request)

    return auth


async def _scrape(reconciler: Reconciler, registry: CollectorRegistry) -> web.Response:
    def scrape() -> bytes:
        # Collectors read kernel maps: off the loop. The probe collector takes the programs
        # lock per probe (never reading a program that closes), not for the whole scrape.
        return generate_latest(registry)

    body = await asyncio.to_thread(scrape)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class _Routes:
    def __init__(
        self,
        reconciler: Reconciler,
        registry: CollectorRegistry | None,
        ready: asyncio.Event,
        costs: CostLedger | None = None,
    ) -> None:
        self.reconciler = reconciler
        self.registry = registry
        self.ready = ready
        self.costs = costs

    async def _answer(self, report: NodeReport) -> web.Response:
        """The report with each loaded probe's cost, read now (off the loop: a scrape may
        hold the ledger meanwhile)."""
        if self.costs is not None:
            try:
                costs = await asyncio.to_thread(self.costs.read)
            except Exception:  # a report must not fail because the accounting did
                log.exception("reading the probes' costs")
                costs = {}
            probes = [p.model_copy(update={"cost": costs.get(p.id)}) for p in report.probes]
            report = report.model_copy(update={"probes": probes})
        return web.json_response(report.to_wire())

    async def put_state(self, request: web.Request) -> web.Response:
        body = await request.read()  # bounded by the app's client_max_size (413 beyond)
        try:
            state = NodeState.model_validate_json(body)
        except ValidationError as exc:
            return _error(400, "invalid NodeState", fields=field_errors(exc))
        try:
            report = await self.reconciler.apply(state)
        except StaleRevision as exc:
            answer = StaleRevisionBody(error=str(exc), applied_revision=exc.applied_revision)
            return web.json_response(answer.to_wire(), status=409)
        except StateRefused as exc:
            return _error(exc.status, str(exc), fields=[])
        return await self._answer(report)

    async def get_state(self, _: web.Request) -> web.Response:
        return await self._answer(self.reconciler.report())

    async def tracepoints(self, request: web.Request) -> web.Response:
        """This kernel's tracepoints matching ?match=GLOB (the node inventory, on request)."""
        try:
            names = await asyncio.to_thread(available_tracepoints)
            answer = select_tracepoints(names, request.query.get("match", "*"))
        except ValueError as exc:
            return _error(400, str(exc))
        except (OSError, TracefsError) as exc:
            return _error(503, f"cannot list tracepoints: {exc}")
        return web.json_response(answer.to_wire())

    async def no_events(self, _: web.Request) -> web.Response:
        return _error(503, "this agent has no event pipeline")

    async def metrics(self, _: web.Request) -> web.Response:
        if self.registry is None:
            return _error(404, "no metrics registry")
        return await _scrape(self.reconciler, self.registry)

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(self, _: web.Request) -> web.Response:
        ready = self.ready.is_set()
        return web.json_response({"ready": ready}, status=200 if ready else 503)


def create_app(
    reconciler: Reconciler,
    *,
    token: str | Callable[[], str],
    registry: CollectorRegistry | None = None,
    events: EventHub | None = None,
    ready: asyncio.Event | None = None,
    max_body: int = MAX_BODY,
    costs: CostLedger | None = None,
) -> web.Application:
    """The API app. `token` is the token or a function returning the current one; `ready`
    is set once the persisted state was re-applied (/readyz)."""
    current = token if callable(token) else (lambda: token)
    if not current():
        raise ValueError("the API needs a non-empty token")
    routes = _Routes(reconciler, registry, ready or asyncio.Event(), costs)
    app = web.Application(client_max_size=max_body, middlewares=[_auth_middleware(current)])
    app.router.add_put("/v1/state", routes.put_state)
    app.router.add_get("/v1/state", routes.get_state)
    app.router.add_get("/v1/events", ndjson_handler(events) if events else routes.no_events)
    app.router.add_get("/v1/values", values_handler(reconciler))
    app.router.add_get("/v1/tracepoints", routes.tracepoints)
    app.router.add_get("/metrics", routes.metrics)
    app.router.add_get("/healthz", routes.healthz)
    app.router.add_get("/readyz", routes.readyz)
    return app


METRICS_MAX_BODY = 1024


def create_metrics_app(reconciler: Reconciler, registry: CollectorRegistry) -> web.Application:
    """The unauthenticated, read-only metrics listener: GET /metrics from the same
    registry as the API's /metrics, and nothing else (404 for other paths, 405 for other
    methods). Scrapes run one at a time: a peer that floods this port cannot pile kernel
    map reads up on the lock that program changes wait for."""
    one_at_a_time = asyncio.Lock()

    async def metrics(_: web.Request) -> web.Response:
        async with one_at_a_time:
            return await _scrape(reconciler, registry)

    app = web.Application(client_max_size=METRICS_MAX_BODY)
    app.router.add_get("/metrics", metrics)
    return app


@dataclass(frozen=True)
class ListenerLimits:
    idle_timeout: float
    """A connection must deliver a complete request head within this many seconds of being
    accepted or of its last answer, else it is closed (half-sent requests, idle keep-alives).
    aiohttp's keep-alive timer does this: it runs from accept and closes a connection still
    waiting for a whole request when it fires."""
    max_connections: int
    """Connections accepted beyond this many open ones are closed at once."""


API_LIMITS = ListenerLimits(idle_timeout=60.0, max_connections=64)
"""The operator keeps one pooled connection per agent (its own idle timeout is 15 s)."""
METRICS_LIMITS = ListenerLimits(idle_timeout=10.0, max_connections=8)
"""A scrape is one short GET; a few scrapers (HA Prometheus pairs) at most."""


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()


class Listener:
    """One app served on host:port within `limits`."""

    def __init__(self, runner: web.AppRunner, server: asyncio.Server) -> None:
        self._runner = runner
        self._server = server

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def open_connections(self) -> int:
        handlers = self._runner.server
        return 0 if handlers is None else len(handlers.connections)

    async def close(self) -> None:
        self._server.close()
        await self._runner.cleanup()  # ends open connections, then the app


async def start_listener(
    app: web.Application, host: str, port: int, limits: ListenerLimits
) -> Listener:
    # auto_decompress=False: aiohttp would inflate a gzip body on the event loop, and keep
    # inflating what no handler reads while it drains it; 1 MiB of gzip (any peer can send
    # it, before any signature is checked) held the loop for 3 s.
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        keepalive_timeout=limits.idle_timeout,
        auto_decompress=False,
    )
    await runner.setup()
    handlers = runner.server
    assert handlers is not None

    def accept() -> asyncio.BaseProtocol:
        # web.Server counts the connections whose handler is live; the new one is not yet.
        if len(handlers.connections) >= limits.max_connections:
            return _Refused()
        return handlers()

    try:
        server = await asyncio.get_running_loop().create_server(accept, host, port)
    except BaseException:
        await runner.cleanup()
        raise
    return Listener(runner, server)
