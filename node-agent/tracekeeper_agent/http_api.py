"""The agent's HTTP API: desired state from the operator, reports, events, metrics.

Every route but the probes (/healthz, /readyz) needs `Authorization: Bearer <token>`,
compared in constant time; the check runs before any body is read.

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
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError

from tracekeeper_agent.events import EventHub, ndjson_handler
from tracekeeper_agent.reconciler import Reconciler, StaleRevision, StateRefused
from tracekeeper_api.protocol import NodeState

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


def _auth_middleware(token: Callable[[], str]) -> Middleware:
    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(), token().encode()
        ):
            return web.json_response(
                {"error": "a valid bearer token is required"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="tracekeeper-agent"'},
            )
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
    ) -> None:
        self.reconciler = reconciler
        self.registry = registry
        self.ready = ready

    async def put_state(self, request: web.Request) -> web.Response:
        body = await request.read()  # bounded by the app's client_max_size (413 beyond)
        try:
            state = NodeState.model_validate_json(body)
        except ValidationError as exc:
            return _error(400, "invalid NodeState", fields=field_errors(exc))
        try:
            report = await self.reconciler.apply(state)
        except StaleRevision as exc:
            return _error(409, str(exc), appliedRevision=exc.applied_revision)
        except StateRefused as exc:
            return _error(exc.status, str(exc), fields=[])
        return web.json_response(report.to_wire())

    async def get_state(self, _: web.Request) -> web.Response:
        return web.json_response(self.reconciler.report().to_wire())

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
) -> web.Application:
    """The API app. `token` is the token or a function returning the current one; `ready`
    is set once the persisted state was re-applied (/readyz)."""
    current = token if callable(token) else (lambda: token)
    if not current():
        raise ValueError("the API needs a non-empty token")
    routes = _Routes(reconciler, registry, ready or asyncio.Event())
    app = web.Application(client_max_size=max_body, middlewares=[_auth_middleware(current)])
    app.router.add_put("/v1/state", routes.put_state)
    app.router.add_get("/v1/state", routes.get_state)
    app.router.add_get("/v1/events", ndjson_handler(events) if events else routes.no_events)
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
