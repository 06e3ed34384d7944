"""The aggregated API's HTTP side: discovery, and traceprobes/{log,values,nodes,tracepoints}.

Every request needs the front proxy's client certificate (401 otherwise); resource requests
also need the user it names to pass a SubjectAccessReview for that probe and subresource
(403), and the probe to exist (404). Errors are Kubernetes Status objects, so kubectl and
client libraries print them like their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from tracekeeper_api.output import (
    LOG,
    MAX_MATCH,
    NODES,
    OUTPUT_API_VERSION,
    OUTPUT_GROUP,
    OUTPUT_VERSION,
    RESOURCE,
    SUBRESOURCES,
    TRACEPOINTS,
    VALUES,
    NodeValues,
    ProbeNodes,
    ProbeTracepoints,
    merge_values,
    node_detail,
)
from tracekeeper_operator.agent_errors import AgentError
from tracekeeper_operator.output_api.access import Access, Authorizer
from tracekeeper_operator.output_api.agent_reads import AgentReads
from tracekeeper_operator.output_api.front_proxy import (
    Identity,
    RequestHeaderAuth,
    Unauthenticated,
    front_proxy_name,
    identify,
)
from tracekeeper_operator.output_api.kube_reads import ProbeLookup
from tracekeeper_operator.output_api.placement import Placement, running
from tracekeeper_operator.output_api.streams import MergedStream

log = logging.getLogger(__name__)

PeerCert = Callable[[web.Request], Mapping[str, Any] | None]
IDLE_CHECK_SECONDS = 5.0


def transport_peercert(request: web.Request) -> Mapping[str, Any] | None:
    transport = request.transport
    if transport is None:
        return None
    cert: Mapping[str, Any] | None = transport.get_extra_info("peercert")
    return cert


def status(code: int, reason: str, message: str, **details: Any) -> web.Response:
    """A metav1.Status (what the kube-apiserver answers errors with)."""
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return web.json_response(body, status=code)


T = TypeVar("T")


async def ask_each(
    places: Sequence[Placement], read: Callable[[str], Awaitable[T]]
) -> tuple[dict[str, T], dict[str, str]]:
    """`read(endpoint)` of every placement's agent at once: the answers by node, and by
    node why there is none."""

    async def one(p: Placement) -> T | AgentError:
        assert p.endpoint is not None
        try:
            return await read(p.endpoint)
        except AgentError as exc:
            return exc

    answers = await asyncio.gather(*(one(p) for p in places))
    got: dict[str, T] = {}
    missing: dict[str, str] = {}
    for p, a in zip(places, answers, strict=True):
        if isinstance(a, AgentError):
            missing[p.node] = str(a)
        else:
            got[p.node] = a
    return got, missing


def _ready_condition(probe: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for cond in (probe.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return dict(cond)
    return None


def discovery_resources() -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": OUTPUT_API_VERSION,
        "resources": [
            {
                "name": f"{RESOURCE}/{sub}",
                "singularName": "",
                "namespaced": True,
                "kind": f"TraceProbe{sub.capitalize()}",
                "verbs": ["get"],
            }
            for sub in SUBRESOURCES
        ],
    }


def discovery_group() -> dict[str, Any]:
    version = {"groupVersion": OUTPUT_API_VERSION, "version": OUTPUT_VERSION}
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": OUTPUT_GROUP,
        "versions": [version],
        "preferredVersion": version,
    }


@dataclass
class OutputSources:
    auth: Callable[[], RequestHeaderAuth]
    authorizer: Authorizer
    probes: ProbeLookup
    placements: Callable[[str], list[Placement]]
    """probe id (namespace/name) -> the nodes meant to run it or reporting it."""
    reads: AgentReads
    peercert: PeerCert = transport_peercert
    stream_retry: float = 2.0


class _Routes:
    def __init__(self, src: OutputSources) -> None:
        self.src = src

    def _front_proxy(self, request: web.Request) -> web.Response | None:
        try:
            front_proxy_name(self.src.auth(), self.src.peercert(request))
        except Unauthenticated as exc:
            return status(401, "Unauthorized", str(exc))
        return None

    async def group_list(self, request: web.Request) -> web.Response:
        return self._front_proxy(request) or web.json_response(
            {"kind": "APIGroupList", "apiVersion": "v1", "groups": [discovery_group()]}
        )

    async def group(self, request: web.Request) -> web.Response:
        return self._front_proxy(request) or web.json_response(discovery_group())

    async def resources(self, request: web.Request) -> web.Response:
        return self._front_proxy(request) or web.json_response(discovery_resources())

    async def healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def probe_output(self, request: web.Request) -> web.StreamResponse:
        ns = request.match_info["namespace"]
        name = request.match_info["name"]
        sub = request.match_info["subresource"]
        if sub not in SUBRESOURCES:
            return status(404, "NotFound", f"no subresource {sub!r} (one of {SUBRESOURCES})")
        if request.method != "GET":
            return status(405, "MethodNotAllowed", f"{RESOURCE}/{sub} is read-only")
        try:
            identity = identify(
                self.src.auth(),
                self.src.peercert(request),
                request.headers,
                list(request.headers.items()),
            )
        except Unauthenticated as exc:
            return status(401, "Unauthorized", str(exc))
        denied = await self._authorize(identity, Access(ns, name, sub))
        if denied is not None:
            return denied
        probe = await self.src.probes.get(ns, name)
        if probe is None:
            return status(
                404, "NotFound", f'traceprobes.tracekeeper.dev "{name}" not found',
                name=name, group="tracekeeper.dev", kind="traceprobes",
            )  # fmt: skip
        probe_id = f"{ns}/{name}"
        places = self.src.placements(probe_id)
        if sub == NODES:
            nodes = ProbeNodes(
                probe=probe_id,
                nodes=[
                    node_detail(p.node, p.outcome, p.error, p.kernel, p.refused) for p in places
                ],
            )
            return web.json_response(nodes.to_wire())
        if sub == TRACEPOINTS:
            return await self._tracepoints(probe_id, places, request.query.get("match", "*"))
        live = [p for p in places if running(p) and p.endpoint]
        if not live:
            return self._not_ready(probe_id, probe)
        if sub == VALUES:
            return await self._values(probe_id, live, request.query.get("perNode") == "true")
        assert sub == LOG
        return await self._log(request, probe_id)

    async def _authorize(self, identity: Identity, access: Access) -> web.Response | None:
        try:
            decision = await self.src.authorizer.review(identity, access)
        except Exception:
            log.exception("SubjectAccessReview failed")
            return status(503, "ServiceUnavailable", "could not ask for authorization")
        if decision.allowed:
            return None
        return status(
            403,
            "Forbidden",
            f'{RESOURCE}.{OUTPUT_GROUP} "{access.name}" is forbidden: User "{identity.user}" '
            f'cannot {access.verb} resource "{RESOURCE}/{access.subresource}" in API group '
            f'"{OUTPUT_GROUP}" in the namespace "{access.namespace}"'
            + (f": {decision.reason}" if decision.reason else ""),
            name=access.name, group=OUTPUT_GROUP, kind=RESOURCE,
        )  # fmt: skip

    @staticmethod
    def _not_ready(probe_id: str, probe: Mapping[str, Any]) -> web.Response:
        cond = _ready_condition(probe)
        why = (
            f"{cond.get('reason', '')}: {cond.get('message', '')}".strip(": ")
            if cond
            else "the operator has not reported on it yet"
        )
        return status(409, "NotReady", f"traceprobe {probe_id} runs on no node: {why}")

    async def _values(self, probe_id: str, live: list[Placement], per_node: bool) -> web.Response:
        got, missing = await ask_each(live, lambda at: self.src.reads.values(at, probe_id))
        merged = merge_values(probe_id, got)
        if per_node:
            return web.json_response(
                NodeValues(merged=merged, nodes=got, unavailable=missing).to_wire()
            )
        headers = {"X-Tracekeeper-Unavailable": ",".join(sorted(missing))} if missing else {}
        return web.json_response(merged.to_wire(), headers=headers)

    async def _tracepoints(
        self, probe_id: str, places: list[Placement], match: str
    ) -> web.Response:
        """Every node the probe targets, loaded there or not: "why does my probe fail on that
        node" is asked of the nodes where it does not run."""
        if len(match) > MAX_MATCH:
            return status(400, "BadRequest", f"match is longer than {MAX_MATCH} characters")
        got, unavailable = await ask_each(
            [p for p in places if p.endpoint],
            lambda at: self.src.reads.tracepoints(at, match),
        )
        unavailable |= {p.node: "no tracekeeper agent runs on this node"
                        for p in places if not p.endpoint}  # fmt: skip
        listing = ProbeTracepoints(
            probe=probe_id,
            match=match,
            nodes=got,
            unavailable=unavailable,
        )
        return web.json_response(listing.to_wire())

    async def _log(self, request: web.Request, probe_id: str) -> web.StreamResponse:
        stream = MergedStream(
            probe_id,
            lambda: self.src.placements(probe_id),
            self.src.reads,
            retry=self.src.stream_retry,
            rescan=self.src.stream_retry,
        )
        response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        response.content_type = "application/x-ndjson"
        await response.prepare(request)
        runner = asyncio.create_task(stream.run(), name=f"output stream {probe_id}")
        try:
            while True:
                try:
                    async with asyncio.timeout(IDLE_CHECK_SECONDS):
                        first = await stream.queue.get()
                except TimeoutError:
                    if request.transport is None or request.transport.is_closing():
                        break
                    continue
                batch = [first]
                while not stream.queue.empty():
                    batch.append(stream.queue.get_nowait())
                chunk = "".join(
                    json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n" for r in batch
                )
                try:
                    await response.write(chunk.encode())
                except (ConnectionResetError, RuntimeError):
                    break
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_output_app(sources: OutputSources) -> web.Application:
    routes = _Routes(sources)
    app = web.Application(client_max_size=64 * 1024)
    base = f"/apis/{OUTPUT_GROUP}/{OUTPUT_VERSION}"
    app.router.add_get("/apis", routes.group_list)
    app.router.add_get(f"/apis/{OUTPUT_GROUP}", routes.group)
    app.router.add_get(base, routes.resources)
    app.router.add_route(
        "*", base + "/namespaces/{namespace}/" + RESOURCE + "/{name}/{subresource}",
        routes.probe_output,
    )  # fmt: skip
    for path in ("/healthz", "/readyz", "/livez"):
        app.router.add_get(path, routes.healthz)
    return app
