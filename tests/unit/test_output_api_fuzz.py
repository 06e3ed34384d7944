"""The aggregated output API (output.tracekeeper.dev, served by the operator) fuzzed with what
a tenant, or any peer of its port, can send: paths (namespace, name, subresource), methods,
query parameters, the front proxy's user/group/extra headers, with the front proxy's
certificate, another one or none, and bodies (large, gzip bombs).

The app is the real one (create_output_app, served as OutputServer serves it) over fakes of
its seams: the TLS layer's verified certificate, the SubjectAccessReview, the TraceProbe
lookup and the agents' reads. For every request: no 5xx, the server still serving, nothing
logged as an error, and no agent read for a probe the authorizer did not allow; a resource
answer of 200 only for the proxied, allowed user. /healthz is polled meanwhile.
"""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, seed
from hypothesis import strategies as st

from tests.unit.http_fuzz import (
    EXAMPLES,
    SEED,
    Answer,
    Figures,
    HealthProber,
    Request,
    ServedApp,
    Serving,
    fuzz_settings,
    send,
)
from tracekeeper_api.output import (
    OUTPUT_GROUP,
    OUTPUT_VERSION,
    RESOURCE,
    ProbeValues,
    Tracepoints,
    select_tracepoints,
)
from tracekeeper_api.protocol import ProbeOutcome
from tracekeeper_operator.output_api.access import Access, Decision
from tracekeeper_operator.output_api.front_proxy import Identity, RequestHeaderAuth
from tracekeeper_operator.output_api.listener import output_runner
from tracekeeper_operator.output_api.placement import Placement
from tracekeeper_operator.output_api.server import OutputSources, create_output_app

PROXY = "front-proxy-client"
CERT_HEADER = "X-Fuzz-Verified-Client-Cert"
"""Stands for the TLS handshake: the CN of the client certificate it verified."""
BASE = f"/apis/{OUTPUT_GROUP}/{OUTPUT_VERSION}"
MAX_BODY = 64 * 1024
Draw = Callable[[st.SearchStrategy[Any]], Any]

PROBES: dict[tuple[str, str], dict[str, Any]] = {
    ("team-a", "opens"): {"metadata": {"name": "opens"}, "status": {}},
    ("team-a", "idle"): {
        "metadata": {"name": "idle"},
        "status": {"conditions": [{"type": "Ready", "reason": "NoTargets", "message": "none"}]},
    },
    ("team-b", "opens"): {"metadata": {"name": "opens"}, "status": {}},
}


def allowed(identity: Identity, access: Access) -> bool:
    """The fake RBAC: alice reads team-a; members of group admins read everything."""
    return (identity.user == "alice" and access.namespace == "team-a") or (
        "admins" in identity.groups
    )


@dataclass
class _Seams:
    allowed: list[str]
    reads: list[str]

    async def review(self, identity: Identity, access: Access) -> Decision:
        ok = allowed(identity, access)
        if ok:
            self.allowed.append(f"{access.namespace}/{access.name}")
        return Decision(ok, "" if ok else "fake RBAC says no")

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        found = PROBES.get((namespace, name))
        return dict(found) if found is not None else None

    def placements(self, probe_id: str) -> list[Placement]:
        if probe_id not in ("team-a/opens", "team-b/opens"):
            return []
        outcome = ProbeOutcome(id=probe_id, spec_hash="h", state="Loaded", reason="Loaded")
        # Each probe's node at an endpoint of its own: a tracepoints read names the probe.
        return [Placement("n1", f"http://n1:9400/{probe_id}", outcome, None)]

    async def values(self, endpoint: str, probe_id: str) -> ProbeValues:
        self.reads.append(probe_id)
        return ProbeValues(probe=probe_id, kind="count")

    async def events(self, endpoint: str, probe_id: str) -> AsyncIterator[dict[str, Any]]:
        self.reads.append(probe_id)
        yield {"probe": probe_id, "comm": "cat"}

    async def tracepoints(self, endpoint: str, match: str) -> Tracepoints:
        self.reads.append(endpoint.removeprefix("http://n1:9400/"))
        return select_tracepoints(["syscalls:sys_enter_openat"], match)


def peercert(request: web.Request) -> Mapping[str, Any] | None:
    name = request.headers.get(CERT_HEADER)
    return {"subject": ((("commonName", name),),)} if name else None


async def serve_as_the_operator(app: web.Application) -> Serving:
    runner = output_runner(app)  # the product's runner; TLS left out (peercert stands in)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = runner.server
    assert server is not None
    return int(runner.addresses[0][1]), runner.cleanup, lambda: len(server.connections)


@dataclass
class FuzzedOutput:
    served: ServedApp
    prober: HealthProber
    figures: Figures


@pytest.fixture(scope="module")
def output() -> Iterator[FuzzedOutput]:
    async def build() -> Any:
        seams = _Seams([], [])
        auth = RequestHeaderAuth(
            client_ca="(unused: no TLS here)",
            allowed_names=frozenset({PROXY}),
            username_headers=("X-Remote-User",),
            group_headers=("X-Remote-Group",),
            extra_prefixes=("X-Remote-Extra-",),
        )
        sources = OutputSources(
            auth=lambda: auth,
            authorizer=seams,
            probes=seams,
            placements=seams.placements,
            reads=seams,
            peercert=peercert,
            stream_retry=0.05,
        )

        async def close() -> None:
            pass

        def inspect() -> dict[str, Any]:
            found = {"allowed": list(seams.allowed), "reads": list(seams.reads)}
            seams.allowed.clear()
            seams.reads.clear()
            return found

        return create_output_app(sources), close, inspect

    served = ServedApp(build, serve_as_the_operator)
    served.start()
    prober = HealthProber(served.port)
    prober.start()
    fuzzed = FuzzedOutput(served, prober, Figures("output API fuzz"))
    try:
        yield fuzzed
    finally:
        prober.stop()
        code = served.stop()
        fuzzed.figures.table(prober).print()
    assert code == 0, f"the output API's process exited {code}"


# --- requests --------------------------------------------------------------------------------

segment_text = st.text(max_size=30).map(lambda t: quote(t, safe=""))
NAMESPACES = st.one_of(
    st.sampled_from(["team-a"] * 12 + ["team-b"] * 4 + ["team-c", "", "..", "%2F", "a" * 300]),
    segment_text,
)
NAMES = st.one_of(
    st.sampled_from(["opens"] * 12 + ["idle"] * 3 + ["none", "", "%00", "a" * 300]), segment_text
)
SUBS = st.one_of(
    st.sampled_from(["values", "log", "nodes", "tracepoints"] * 4 + ["status", "", "VALUES"]),
    segment_text,
)
USERS = st.one_of(
    st.sampled_from(["alice"] * 12 + ["bob", "", " alice", "system:anonymous"]),
    st.text(
        st.characters(min_codepoint=0x20, blacklist_characters="\x7f", blacklist_categories=["Cs"]),
        max_size=20,
    ).map(
        lambda t: t.encode("utf-8")  # raw UTF-8 bytes: what a header may carry
    ),
)


@functools.cache
def gzip_bomb() -> bytes:
    return gzip.compress(b" " * (64 << 20), compresslevel=9)


def path(draw: Draw) -> tuple[str, str]:
    kind = draw(st.sampled_from(["resource"] * 6 + ["discovery", "health", "unknown"]))
    if kind == "resource":
        if draw(st.booleans()):  # a probe that exists, or may: most get as far as the reads
            ns = draw(st.sampled_from(["team-a", "team-a", "team-b"]))
            name = draw(st.sampled_from(["opens", "opens", "idle"]))
            sub = draw(st.sampled_from(["values", "log", "nodes", "tracepoints"]))
        else:
            ns, name, sub = draw(NAMESPACES), draw(NAMES), draw(SUBS)
        return kind, f"{BASE}/namespaces/{ns}/{RESOURCE}/{name}/{sub}"
    if kind == "discovery":
        return kind, draw(st.sampled_from(["/apis", f"/apis/{OUTPUT_GROUP}", BASE]))
    if kind == "health":
        return kind, draw(st.sampled_from(["/healthz", "/readyz", "/livez"]))
    return kind, draw(
        st.one_of(
            st.sampled_from([f"{BASE}/namespaces", f"{BASE}/x/../namespaces", "/", "//apis"]),
            segment_text.map(lambda t: f"{BASE}/{t}"),
        )
    )


def query(draw: Draw) -> str:
    parts = draw(
        st.lists(
            st.one_of(
                st.sampled_from(["perNode=true", "perNode=false", "perNode=", "perNode=%ff"]),
                st.sampled_from(["follow=true", "%zz", "&&", "x=" + "y" * 9000]),
                st.text(max_size=20).map(lambda t: quote(t, safe="=&")),
            ),
            max_size=3,
        )
    )
    return "?" + "&".join(parts) if parts else ""


def headers(draw: Draw) -> tuple[tuple[str, str | bytes], ...]:
    found: list[tuple[str, str | bytes]] = []
    cert = draw(st.sampled_from([PROXY] * 4 + ["someone-else", None]))
    if cert is not None:
        found.append((CERT_HEADER, cert))
    if draw(st.integers(0, 5)) > 0:
        found.append(("X-Remote-User", draw(USERS)))
    for group in draw(st.lists(st.sampled_from(["admins", "devs", "", "a" * 500]), max_size=3)):
        found.append(("X-Remote-Group", group))
    for key in draw(st.lists(st.sampled_from(["scopes", "%zz", "a%2Fb", "%", ""]), max_size=2)):
        found.append((f"X-Remote-Extra-{key}", draw(st.sampled_from(["v", "", "%ff"]))))
    return tuple(found)


def generate(draw: Draw) -> tuple[str, Request]:
    kind, target = path(draw)
    target += query(draw)
    method = draw(st.sampled_from(["GET"] * 20 + ["POST", "PUT", "DELETE", "PATCH", "HEAD"]))
    extra = headers(draw)
    body = draw(st.sampled_from([b""] * 8 + [b"{}", b"x" * (MAX_BODY + 1), gzip_bomb()]))
    if body is gzip_bomb():
        extra = (*extra, ("Content-Encoding", "gzip"))
    shown = "gzip bomb" if body is gzip_bomb() else f"{len(body)} bytes"
    return kind, Request(kind, f"{kind}, {method}, {shown}", method, target, extra, body)


# --- the properties --------------------------------------------------------------------------


def proxied_user(request: Request) -> Identity | None:
    """Who the server must take the request to be from (None: not a proxied request)."""
    fields = dict(request.headers)
    if fields.get(CERT_HEADER) != PROXY:
        return None
    user = fields.get("X-Remote-User")
    if not user:
        return None
    groups = tuple(str(v) for k, v in request.headers if k == "X-Remote-Group")
    return Identity(str(user), groups)


def violations(request: Request, answer: Answer, inside: dict[str, Any]) -> list[str]:
    found: list[str] = []
    if answer.status == 0 and len(request.body) <= MAX_BODY:
        found.append(f"no answer: {answer.error}")
    if answer.status >= 500:
        found.append(f"answered {answer.status}: {answer.body[:300]!r}")
    if inside["errors"]:
        found.append(f"errors logged: {inside['errors']}")
    if not_allowed := set(inside["reads"]) - set(inside["allowed"]):
        found.append(f"agents read for probes nobody was allowed: {sorted(not_allowed)}")
    if answer.status == 200 and request.endpoint in ("resource", "discovery"):
        user = proxied_user(request)
        if user is None and request.endpoint == "resource":
            found.append("a resource answered 200 to a request the front proxy did not send")
        if request.endpoint == "discovery" and dict(request.headers).get(CERT_HEADER) != PROXY:
            found.append("discovery answered 200 without the front proxy's certificate")
    if answer.status == 200 and request.endpoint == "resource" and not answer.streamed:
        probe = json.loads(answer.body).get("probe", "")
        if probe and probe not in inside["allowed"]:
            found.append(f"answered {probe}'s output, which the authorizer did not allow")
    return found


def run_case(output: FuzzedOutput, draw: Draw) -> None:
    endpoint, request = generate(draw)
    output.served.inspect()  # forget what came before
    with output.prober.booked_to(f"{endpoint}|{request.kind}"):
        answer = send(output.served.port, request)
    figures = output.figures.of(endpoint)
    figures.cases += 1
    figures.statuses[answer.status] = figures.statuses.get(answer.status, 0) + 1
    if not output.served.alive():
        found = ["the output API's process ended"]
    else:
        found = violations(request, answer, output.served.inspect())
    if found:
        figures.failures.append("; ".join(found))
        raise AssertionError(f"{'; '.join(found)}\n  request: {request.describe()}")


def test_the_output_api_survives_generated_requests(output: FuzzedOutput) -> None:
    examples = EXAMPLES * 4

    @seed(SEED)
    @fuzz_settings(examples)
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        run_case(output, data.draw)

    with output.prober.booked_to("(fuzzing)"):
        fuzz()
    assert output.prober.failures == 0, "health requests went unanswered (see the table)"
    assert output.served.settles(at_most=1) <= 1, "connections outlived their clients"
    assert sum(f.cases for f in output.figures.by_endpoint.values()) >= examples // 2


async def test_the_output_server_never_inflates_request_bodies() -> None:
    """No output route reads a body, but aiohttp inflates a gzip one on the loop while it
    drains it (as the agent's listeners did: 1 MiB of gzip held a loop for 3 s): the
    runner hands over bodies as sent."""

    async def length(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    app = web.Application()
    app.router.add_put("/x", length)
    port, stop, _ = await serve_as_the_operator(app)
    bomb = gzip.compress(b" " * (8 << 20))
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.put(
                f"http://127.0.0.1:{port}/x", data=bomb, headers={"Content-Encoding": "gzip"}
            ) as resp,
        ):
            assert resp.status == 200
            assert await resp.text() == str(len(bomb))
    finally:
        await stop()
