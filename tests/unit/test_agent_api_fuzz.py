"""The agent's HTTP API fuzzed: generated requests for every route (valid, near-valid, malformed
JSON, huge, deeply nested, wrong types, unknown fields, stale and future revisions, the wrong
node), each signed, wrongly signed, with the bearer token or with nothing.

The app is the real one (create_app, served by start_listener on loopback, its own event
loop), over the fake loader. For every request: no 5xx; the app still serving, nothing
logged as an error; a refused request changes nothing (GET /v1/state, the loader's log, the
persisted state); a PUT is accepted exactly when the model says the state is valid, for
this node, not stale, and the request is authenticated; nothing but the health routes
answers 200 unauthenticated; a signed 200 is signed back. Meanwhile GET /healthz is polled
and must always be answered (its latency is a figure: `make reliability` prints the table).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import gzip
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given, seed
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.unit.agent_fakes import (
    CID_A,
    UID_A,
    UID_B,
    FakeCgroups,
    FakeLoader,
    fake_build_plan,
    pod,
    unshared_inputs,
)
from tests.unit.http_fuzz import (
    EXAMPLES,
    SEED,
    Answer,
    Figures,
    HealthProber,
    Request,
    ServedApp,
    fuzz_settings,
    listener_of,
    send,
)
from tracekeeper_agent.outputs.events import EventHub
from tracekeeper_agent.outputs.metrics import AgentMetrics
from tracekeeper_agent.reconcile.reconciler import Reconciler
from tracekeeper_agent.reconcile.state_store import StateStore
from tracekeeper_agent.service.http_api import API_LIMITS, MAX_BODY, create_app
from tracekeeper_api import signing
from tracekeeper_api.protocol import NodeState

NODE = "node-1"
TOKEN = "fuzz-token"
BEARER = f"Bearer {TOKEN}"
HEALTH_BODIES = ({"ok": True}, {"ready": True})

Json = Any
Draw = Callable[[st.SearchStrategy[Any]], Any]
"""data.draw: a value of the strategy."""


# --- the agent under fuzz ------------------------------------------------------------------


@dataclass
class FuzzedAgent:
    served: ServedApp
    store: StateStore
    prober: HealthProber
    figures: Figures
    applied: NodeState | None = None
    """The state the agent should hold (the last accepted PUT), resolved."""
    applied_body: bytes | None = None

    @property
    def port(self) -> int:
        return self.served.port

    @property
    def revision(self) -> int:
        return self.applied.revision if self.applied is not None else 0

    def probe_ids(self) -> list[str]:
        return [p.id for p in self.applied.probes] if self.applied is not None else []


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzedAgent]:
    store = StateStore(tmp_path_factory.mktemp("fuzzed-agent") / "state")

    async def build() -> Any:
        loader = FakeLoader()
        cgroups = FakeCgroups(pods={UID_A: 500, UID_B: 600}, containers={(UID_A, CID_A): 501})
        reconciler = Reconciler(
            node=NODE,
            loader=loader,
            build_plan=fake_build_plan,
            plan_inputs=unshared_inputs,
            cgroups=cgroups,
            store=store,
        )
        hub = EventHub(reconciler.attributor, poll_timeout_ms=20)
        reconciler.board.add_reader(hub)
        metrics = AgentMetrics(reconciler.board, reconciler.attributor)
        ready = asyncio.Event()
        ready.set()
        app = create_app(
            reconciler, token=TOKEN, registry=metrics.registry, events=hub, ready=ready
        )  # the product's body limit (MAX_BODY): "huge" is beyond the real one

        async def close() -> None:
            await reconciler.close()
            await hub.close()

        def inspect() -> dict[str, Any]:
            return {"loader": len(loader.log), "identity syncs": loader.identities.syncs}

        return app, close, inspect

    served = ServedApp(build, listener_of(API_LIMITS))
    served.start()
    prober = HealthProber(served.port)
    prober.start()
    fuzzed = FuzzedAgent(served, store, prober, Figures("agent API fuzz"))
    # Probes of every output kind loaded first: the GET routes are fuzzed against them, and
    # PUT /v1/state (fuzzed last) moves the state on from there.
    first = {
        "node": NODE,
        "revision": 1,
        "probes": [
            {"id": f"team-a/{name}", "specHash": f"{i:016x}", "spec": SPECS[i],
             "targets": {"pods": [pod(UID_A)]}}
            for i, name in enumerate(NAMES)
        ],
    }  # fmt: skip
    body = encoded(first)
    answer = send(
        served.port, Request("", "", "PUT", "/v1/state", (("Authorization", BEARER),), body)
    )
    assert answer.status == 200, answer
    fuzzed.applied, fuzzed.applied_body = NodeState.model_validate_json(body).resolved(), body
    try:
        yield fuzzed
    finally:
        prober.stop()
        code = served.stop()
        fuzzed.figures.table(prober).print()
    assert code == 0, f"the agent's process exited {code}"


# --- authentication --------------------------------------------------------------------------

VALID_AUTHS = ("signed", "bearer")
AUTHS = (
    *VALID_AUTHS,
    "signed, wrong key",
    "signed, other body",
    "signed, other target",
    "signed, stale",
    "signed, future",
    "signed, malformed",
    "bearer, wrong",
    "none",
)
auths = st.sampled_from([*VALID_AUTHS * 3, *AUTHS])
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)


def authorization(
    draw: Draw, auth: str, method: str, target: str, body: bytes
) -> tuple[tuple[str, str | bytes], ...]:
    now = time.time()
    header: str | bytes
    if auth == "none":
        return ()
    if auth == "bearer":
        header = BEARER
    elif auth == "bearer, wrong":
        header = "Bearer " + draw(header_text.filter(lambda t: t.strip() != TOKEN))
    elif auth == "signed":
        header = signing.sign_request(TOKEN, method, target, body).header
    elif auth == "signed, wrong key":
        header = signing.sign_request("another-token", method, target, body).header
    elif auth == "signed, other body":
        header = signing.sign_request(TOKEN, method, target, body + b" ").header
    elif auth == "signed, other target":
        header = signing.sign_request(TOKEN, method, target + "x", body).header
    elif auth == "signed, stale":
        header = signing.sign_request(TOKEN, method, target, body, now=now - 400).header
    elif auth == "signed, future":
        header = signing.sign_request(TOKEN, method, target, body, now=now + 400).header
    else:
        assert auth == "signed, malformed"
        header = f"{signing.SCHEME} " + draw(header_text)
    return (("Authorization", header),)


# --- bodies ----------------------------------------------------------------------------------

SPECS: list[Json] = [
    {"tracepoint": "syscalls:sys_enter_openat"},
    {"tracepoint": "syscalls:sys_enter_read", "output": {"kind": "events"}},
    {"tracepoint": "sched:sched_process_exec", "output": {"by": ["pod", "comm"]}},
    {"kprobe": {"function": "vfs_read"}},
    {"tracepoint": "syscalls:sys_enter_write", "suspend": True},
]
NAMES = ("opens", "reads", "execs", "idle")
TARGETS = ("pod a", "pod b", "pod a by ref", "container of a by ref", "pid", "nothing")


@st.composite
def valid_state(draw: st.DrawFn, revision: int) -> Json:
    """A NodeState for this node as the operator sends it (pods inline or in the table)."""
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3))
    probes: list[Json] = []
    table: dict[str, Json] = {}
    for name in names:
        index = draw(st.integers(0, len(SPECS) - 1))
        target = draw(st.sampled_from(TARGETS))
        targets: Json
        if target == "pod a":
            targets = {"pods": [pod(UID_A)]}
        elif target == "pod b":
            targets = {"pods": [pod(UID_B, "web-1")]}
        elif target == "pod a by ref":
            table[UID_A] = pod(UID_A, containers=[{"name": "app", "containerId": CID_A}])
            targets = {"podRefs": [{"uid": UID_A}]}
        elif target == "container of a by ref":
            table[UID_A] = pod(UID_A, containers=[{"name": "app", "containerId": CID_A}])
            targets = {"podRefs": [{"uid": UID_A, "containers": ["app"]}]}
        elif target == "pid":
            targets = {"pids": [1]}
        else:
            targets = {}
        probes.append(
            {
                "id": f"team-a/{name}",
                "specHash": f"{index:016x}",
                "spec": copy.deepcopy(SPECS[index]),  # mutated by near-valid kinds
                "targets": targets,
            }
        )
    state: Json = {"node": NODE, "revision": revision, "probes": probes}
    if table:
        state["pods"] = list(table.values())
    return state


odd_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.just("x" * 300),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def places(value: Json, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every field and list item of a JSON value, by path."""
    found: list[tuple[str | int, ...]] = []
    children: list[tuple[str | int, Json]] = []
    if isinstance(value, dict):
        children = list(value.items())
    elif isinstance(value, list):
        children = list(enumerate(value))
    for key, child in children:
        found.append((*path, key))
        found += places(child, (*path, key))
    return found


def objects(value: Json, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """The paths of every object (dict) in a JSON value, the root's () first."""
    found = [path] if isinstance(value, dict) else []
    for key in places(value):
        if isinstance(at(value, key), dict):
            found.append(key)
    return found


def at(value: Json, path: tuple[str | int, ...]) -> Json:
    for key in path:
        value = value[key]
    return value


def near_valid(draw: Draw, state: Json) -> Json:
    """`state` with one field dropped or replaced by an odd value."""
    where = draw(st.sampled_from(places(state)))
    parent = at(state, where[:-1])
    if draw(st.booleans()):
        del parent[where[-1]]
    else:
        parent[where[-1]] = draw(odd_values)
    return state


WRONG_TYPES: dict[str, list[Json]] = {
    "node": [5, None, [], {"a": 1}, True],
    "revision": ["3", 1.5, True, None, [], -1, "x", 1e30],
    "probes": [{}, "x", [1], [None], [[]], None],
    "pods": [{}, 1, [1], "x"],
}


def nested(depth: int, kind: str) -> bytes:
    if kind == "lists":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def encoded(state: Json) -> bytes:
    return json.dumps(state).encode()


PUT_KINDS = (
    "valid",
    "same revision, same state",
    "same revision, other state",
    "stale revision",
    "future revision",
    "wrong node",
    "near-valid",
    "wrong types",
    "unknown fields",
    "malformed JSON",
    "deeply nested",
    "huge",
    "at the body limit",
    "gzip-encoded",
    "compression bomb",
)


def put_body(draw: Draw, kind: str, agent: FuzzedAgent) -> bytes:
    rev = agent.revision
    nxt = rev + draw(st.integers(1, 3))
    if kind == "valid":
        return encoded(draw(valid_state(nxt)))
    # Every kind draws the same whatever the agent holds (hypothesis replays draws: what
    # they depend on must be drawn too); the agent's state only fills values in.
    if kind == "same revision, same state":
        drawn = encoded(draw(valid_state(rev)))
        return agent.applied_body or drawn
    if kind == "same revision, other state":
        return encoded(draw(valid_state(rev)))
    if kind == "stale revision":
        return encoded(draw(valid_state(max(0, rev - draw(st.integers(1, 5))))))
    if kind == "future revision":
        jump = draw(st.sampled_from([10**6, 2**31, 2**53 + 1, 2**63, 2**64 + 7, 10**30]))
        return encoded(draw(valid_state(rev + jump)))
    if kind == "wrong node":
        state = draw(valid_state(nxt))
        state["node"] = draw(
            st.one_of(
                st.sampled_from(["node-2", "Node-1", "node-1 ", " node-1", "node-1\x00", ""]),
                st.text(max_size=20).filter(lambda t: t != NODE),
            )
        )
        return encoded(state)
    if kind == "near-valid":
        return encoded(near_valid(draw, draw(valid_state(nxt))))
    if kind == "wrong types":
        state = draw(valid_state(nxt))
        name = draw(st.sampled_from(sorted(WRONG_TYPES)))
        state[name] = draw(st.sampled_from(WRONG_TYPES[name]))
        return encoded(state)
    if kind == "unknown fields":
        state = draw(valid_state(nxt))
        where = at(state, draw(st.sampled_from(objects(state))))
        name = draw(st.text(min_size=1, max_size=20).filter(lambda n: n not in where))
        where[name] = draw(odd_values)
        return encoded(state)
    if kind == "malformed JSON":
        valid = encoded(draw(valid_state(nxt)))
        malformed: bytes = draw(
            st.one_of(
                # cut at a drawn share of its length (its length follows the revision)
                st.integers(0, 999).map(lambda n: valid[: n * len(valid) // 1000]),
                st.binary(max_size=200),
                st.sampled_from([b"}", b"x", b"\x00", b" {}", b","]).map(lambda g: valid + g),
                st.just(valid.replace(NODE.encode(), b"node-\xff\xfe")),
                st.just(b'{"node":"node-1","revision":NaN,"probes":[]}'),
                st.just(b'{"node":"node-1","revision":Infinity,"probes":[]}'),
                st.just(b"\xef\xbb\xbf" + valid),
                st.just(valid.replace(b'"', b"'")),
                st.just(b"/* c */" + valid),
                st.just(valid.replace(b'"node": "node-1"', b'"node": "node-1", "node": "x"')),
            )
        )
        return malformed
    if kind == "deeply nested":
        depth = draw(st.sampled_from([64, 200, 1000, 10_000, 100_000, 1_000_000]))
        shape = draw(st.sampled_from(["lists", "objects"]))
        where = draw(st.sampled_from(["whole body", "a field"]))
        if where == "whole body":
            return nested(depth, shape)
        valid = encoded(draw(valid_state(nxt)))
        return valid.replace(b'"probes": ', b'"probes": ' + nested(depth, shape) + b', "x": ')
    if kind == "at the body limit":  # a valid state padded with whitespace to the limit
        valid = encoded(draw(valid_state(nxt)))
        return valid + b" " * (MAX_BODY - len(valid))
    assert kind == "huge"
    size: int = MAX_BODY + draw(st.integers(1, 1 << 20))
    head = encoded(draw(valid_state(nxt)))[:-1] + b', "pad": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


@functools.cache
def compression_bomb() -> bytes:
    """64 MiB of JSON whitespace after a valid state, gzipped (64 KiB on the wire)."""
    valid = encoded({"node": NODE, "revision": 2**62, "probes": []})
    return gzip.compress(valid + b" " * (64 << 20), compresslevel=9)


def oracle_accepts(
    agent: FuzzedAgent, auth: str, request: Request
) -> tuple[bool, NodeState | None]:
    """Whether the agent must take this PUT, and the state it then holds (resolved). An
    encoded body is refused whatever it holds (the listener does not inflate bodies)."""
    body = request.body
    encoded = any(name == "Content-Encoding" for name, _ in request.headers)
    if auth not in VALID_AUTHS or len(body) > MAX_BODY or encoded:
        return False, None
    try:
        state = NodeState.model_validate_json(body).resolved()
    except ValidationError:
        return False, None
    if state.node != NODE:
        return False, None
    current = agent.applied
    if current is None or state.revision > current.revision:
        return True, state
    if state.revision == current.revision and state == current:
        return True, None  # an idempotent retry: taken, nothing changes
    return False, None


# --- queries ---------------------------------------------------------------------------------


def query_value(draw: Draw, agent: FuzzedAgent) -> str:
    known = agent.probe_ids() or ["team-a/opens"]
    raw = draw(
        st.one_of(
            st.integers(0, 7).map(lambda i: known[i % len(known)]),
            st.sampled_from(["team-a/none", "", "/", "team-a/", "a/b/c", "..", "*"]),
            st.text(max_size=40),
            st.integers(100, 20_000).map(lambda n: "a" * n),
        )
    )
    return quote(raw, safe="/")


def query(draw: Draw, agent: FuzzedAgent, name: str | None) -> str:
    parts: list[str] = []
    if name is not None and draw(st.integers(0, 4)) > 0:
        parts.append(f"{name}={query_value(draw, agent)}")
    extra = draw(
        st.lists(
            st.sampled_from(
                ["probe=a&probe=b", "%zz", "%00", "&&", "=", "x=%ff%fe", "a=" + "%41" * 50]
            ),
            max_size=2,
        )
    )
    parts += extra
    draw_text = draw(st.text(st.characters(codec="utf-8"), max_size=20))
    if draw_text and draw(st.booleans()):
        parts.append(quote(draw_text, safe="=&"))
    return "?" + "&".join(parts) if parts else ""


def get_body(draw: Draw) -> bytes:
    size: int = draw(st.sampled_from([0, 1, 100, 256 << 10, 1 << 20, MAX_BODY + 1]))
    return b"x" * size


ROUTES = (
    ("GET", "/v1/state"),
    ("GET", "/v1/events"),
    ("GET", "/v1/values"),
    ("GET", "/metrics"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("PUT", "/v1/state"),
)
OTHER = "other routes and methods"
ENDPOINTS = (*(f"{m} {p}" for m, p in ROUTES[:-1]), OTHER, "PUT /v1/state")
QUERY_NAMES = {"/v1/events": "probe", "/v1/values": "probe"}
ODD_PATHS = (
    "/v1/state/",
    "/v1/State",
    "/v1/",
    "/v1",
    "/v2/state",
    "/",
    "/healthz/",
    "/healthz/../v1/state",
    "/x/../v1/state",
    "/v1/%2e%2e/v1/state",
    "/v1%2fstate",
    "/%00",
    "/health%7a",
)


def generate(draw: Draw, endpoint: str, agent: FuzzedAgent) -> tuple[Request, str]:
    auth = draw(auths)
    encoding: tuple[tuple[str, str | bytes], ...] = ()
    if endpoint == "PUT /v1/state":
        kind = draw(st.sampled_from([*PUT_KINDS[:1] * 3, *PUT_KINDS]))
        method, target = "PUT", "/v1/state"
        if kind == "gzip-encoded":
            body = gzip.compress(put_body(draw, draw(st.sampled_from(PUT_KINDS[:-2])), agent))
            encoding = (("Content-Encoding", "gzip"),)
        elif kind == "compression bomb":
            body, encoding = compression_bomb(), (("Content-Encoding", "gzip"),)
        else:
            body = put_body(draw, kind, agent)
    elif endpoint == OTHER:
        kind = draw(st.sampled_from(["other method", "unknown path"]))
        if kind == "other method":
            method = draw(st.sampled_from(["POST", "DELETE", "PATCH", "OPTIONS", "TRACE"]))
            target = draw(st.sampled_from([p for _, p in ROUTES]))
        else:
            method = draw(st.sampled_from(["GET", "PUT"]))
            target = draw(
                st.one_of(
                    st.sampled_from(ODD_PATHS),
                    st.text(max_size=30).map(lambda t: "/v1/" + quote(t, safe="/")),
                )
            )
        body = draw(st.sampled_from([b"", b"{}", b"x" * (MAX_BODY + 1)]))
    else:
        method, path = endpoint.split(" ", 1)
        kind = draw(st.sampled_from(["plain", "with a body"]))
        target = path + query(draw, agent, QUERY_NAMES.get(path))
        body = get_body(draw) if kind == "with a body" else b""
    headers = (*authorization(draw, auth, method, target, body), *encoding)
    return Request(endpoint, f"{kind}; {auth}", method, target, headers, body), auth


# --- the properties --------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    report: Json
    loader: Json
    """The fake loader's log length and identity table syncs."""
    stored: bytes | None


def snapshot(agent: FuzzedAgent) -> tuple[Snapshot, list[str]]:
    """What the agent holds, and the errors it logged since the last look."""
    answer = send(agent.port, Request("", "", "GET", "/v1/state", (("Authorization", BEARER),)))
    assert answer.status == 200, f"GET /v1/state answered {answer.status}: {answer.body[:300]!r}"
    path = agent.store.path
    stored = path.read_bytes() if path.exists() else None
    inside = agent.served.inspect()
    errors: list[str] = inside.pop("errors")
    inside.pop("bad requests logged")
    inside.pop("open connections")
    return Snapshot(json.loads(answer.body), inside, stored), errors


def is_health(body: bytes) -> bool:
    try:
        return json.loads(body) in HEALTH_BODIES
    except ValueError:
        return False


def violations(
    agent: FuzzedAgent,
    request: Request,
    auth: str,
    answer: Answer,
    before: Snapshot,
    after: Snapshot,
    errors: list[str],
    accepts: bool | None,
    new_state: NodeState | None,
) -> list[str]:
    found: list[str] = []
    if answer.status == 0 and len(request.body) <= MAX_BODY:
        found.append(f"no answer: {answer.error}")
    if answer.status >= 500:
        found.append(f"answered {answer.status}: {answer.body[:500]!r}")
    if errors:
        found.append(f"errors logged: {errors}")
    authenticated = auth in VALID_AUTHS
    # The probes' routes (/healthz, /readyz) need no token, and answer unsigned.
    health = answer.status == 200 and not answer.streamed and is_health(answer.body)
    if answer.status == 200 and not authenticated and not health:
        found.append("answered 200 to an unauthenticated request")
    if auth == "signed" and answer.status == 200 and not answer.streamed and not health:
        try:
            nonce = request.headers[0][1]
            assert isinstance(nonce, str)
            signing.verify_response(
                TOKEN,
                answer.headers.get(signing.RESPONSE_HEADER.lower(), ""),
                nonce.rsplit("nonce=", 1)[1].split(",", 1)[0],
                answer.status,
                answer.body,
            )
        except signing.SignatureError as exc:
            found.append(f"a signed request's answer is not signed: {exc}")
    if accepts is not None and (answer.status == 200) != accepts:
        found.append(f"answered {answer.status}, the model says {'take' if accepts else 'refuse'}")
    if new_state is not None and answer.status == 200:
        if after.report.get("revision") != new_state.revision:
            found.append(f"applied revision {after.report.get('revision')}, not the one sent")
        if after.stored is None or NodeState.model_validate_json(after.stored) != new_state:
            found.append("the persisted state is not the applied one")
    elif after != before:
        found.append(f"a request that changed nothing changed the agent: {before} -> {after}")
    return found


def run_case(agent: FuzzedAgent, endpoint: str, draw: Draw) -> None:
    request, auth = generate(draw, endpoint, agent)
    accepts: bool | None = None
    new_state: NodeState | None = None
    if endpoint == "PUT /v1/state":
        accepts, new_state = oracle_accepts(agent, auth, request)
    before, _ = snapshot(agent)
    with agent.prober.booked_to(f"{endpoint}|{request.kind}"):
        answer = send(agent.port, request)
    if not agent.served.alive():
        agent.figures.of(endpoint).failures.append("the agent's process ended")
        raise AssertionError(f"the agent's process ended\n  request: {request.describe()}")
    after, errors = snapshot(agent)
    figures = agent.figures.of(endpoint)
    figures.cases += 1
    figures.statuses[answer.status] = figures.statuses.get(answer.status, 0) + 1
    found = violations(agent, request, auth, answer, before, after, errors, accepts, new_state)
    if answer.status == 200 and new_state is not None:
        agent.applied, agent.applied_body = new_state, request.body
    if found:
        figures.failures.append("; ".join(found))
        raise AssertionError(f"{'; '.join(found)}\n  request: {request.describe()}")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_the_agent_api_survives_generated_requests(agent: FuzzedAgent, endpoint: str) -> None:
    examples = EXAMPLES * 3 if endpoint == "PUT /v1/state" else EXAMPLES

    @seed(SEED)
    @fuzz_settings(examples)
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        run_case(agent, endpoint, data.draw)

    with agent.prober.booked_to(endpoint):
        fuzz()
    assert agent.prober.failures == 0, "health requests went unanswered (see the table)"
    # Every client is gone: only the prober's keep-alive connection may stay.
    assert agent.served.settles(at_most=1) <= 1, "connections outlived their clients"
    assert agent.figures.of(endpoint).cases >= examples // 2
