"""The agent's HTTP API in-process over a fake loader: auth, validation errors, revisions,
reports, metrics (also on the token-free metrics listener) and the event stream."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.unit.agent_fakes import (
    CID_A,
    UID_A,
    FakeCgroups,
    FakeLoader,
    fake_build_plan,
    probe,
    unshared_inputs,
)
from tests.unit.output_fakes import FakeAttributor, FakeProgram, ListBoard, make_probe
from tracekeeper_agent.outputs.events import EventHub
from tracekeeper_agent.outputs.metrics import AgentMetrics
from tracekeeper_agent.ports import CountSample, RawEvent, SampleKey
from tracekeeper_agent.reconcile.reconciler import Reconciler
from tracekeeper_agent.service.http_api import (
    TOKEN_ENV,
    TokenFile,
    create_app,
    create_metrics_app,
    read_token,
    token_source,
)
from tracekeeper_api import signing
from tracekeeper_api.output import ProbeValues

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 64 * 1024


@dataclass
class Api:
    client: TestClient[Any, Any]
    metrics_client: TestClient[Any, Any]
    """The metrics listener (serve --metrics-listen) of the same agent."""
    loader: FakeLoader
    reconciler: Reconciler
    ready: asyncio.Event


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    loader = FakeLoader()
    cgroups = FakeCgroups(pods={UID_A: 500}, containers={(UID_A, CID_A): 501})
    reconciler = Reconciler(
        node="node-1",
        loader=loader,
        build_plan=fake_build_plan,
        plan_inputs=unshared_inputs,
        cgroups=cgroups,
    )
    hub = EventHub(reconciler.attributor, poll_timeout_ms=20)
    reconciler.board.add_reader(hub)
    metrics = AgentMetrics(reconciler.board, reconciler.attributor)
    ready = asyncio.Event()
    app = create_app(
        reconciler,
        token=TOKEN,
        registry=metrics.registry,
        events=hub,
        ready=ready,
        max_body=MAX_BODY,
    )
    metrics_app = create_metrics_app(reconciler, metrics.registry)
    async with (
        TestClient(TestServer(app)) as client,
        TestClient(TestServer(metrics_app)) as metrics_client,
    ):
        yield Api(client, metrics_client, loader, reconciler, ready)
    await reconciler.close()
    await hub.close()


def state(revision: int, *probes: dict[str, Any], node: str = "node-1") -> dict[str, Any]:
    return {"node": node, "revision": revision, "probes": list(probes)}


async def put(api: Api, body: Any, headers: dict[str, str] = AUTH) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with api.client.put("/v1/state", data=data, headers=headers) as resp:
        return resp.status, await resp.json()


# --- auth -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer"},
    ],
    ids=["none", "wrong", "basic", "longer", "empty"],
)
async def test_every_api_route_needs_the_token(api: Api, headers: dict[str, str]) -> None:
    for method, path in [
        ("GET", "/v1/state"),
        ("PUT", "/v1/state"),
        ("GET", "/v1/events"),
        ("GET", "/v1/values"),
        ("GET", "/metrics"),
        ("GET", "/nonexistent"),
    ]:
        async with api.client.request(method, path, headers=headers, data=b"{}") as resp:
            assert resp.status == 401, (method, path)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert api.loader.loads == 0


async def test_a_signed_request_gets_a_signed_answer(api: Api) -> None:
    """The operator's way: the token never travels, the answer proves it came from us."""
    body = json.dumps(state(1, probe())).encode()
    signed = signing.sign_request(TOKEN, "PUT", "/v1/state", body)
    headers = {"Authorization": signed.header, "Content-Type": "application/json"}
    async with api.client.put("/v1/state", data=body, headers=headers) as resp:
        assert resp.status == 200
        answer = await resp.read()
        signing.verify_response(
            TOKEN, resp.headers[signing.RESPONSE_HEADER], signed.nonce, 200, answer
        )
    assert api.loader.loads == 1
    stale = state(0)
    body = json.dumps(stale).encode()
    signed = signing.sign_request(TOKEN, "PUT", "/v1/state", body)
    async with api.client.put(
        "/v1/state", data=body, headers={"Authorization": signed.header}
    ) as resp:
        assert resp.status == 409  # errors are signed too: the operator believes the revision
        signing.verify_response(
            TOKEN, resp.headers[signing.RESPONSE_HEADER], signed.nonce, 409, await resp.read()
        )


@pytest.mark.parametrize("forgery", ["key", "body", "stale"])
async def test_a_forged_signed_request_is_refused_before_anything_loads(
    api: Api, forgery: str
) -> None:
    body = json.dumps(state(1, probe())).encode()
    key = "not-the-token" if forgery == "key" else TOKEN
    now = time.time() - 2 * signing.MAX_SKEW if forgery == "stale" else None
    signed = signing.sign_request(key, "PUT", "/v1/state", body, now=now)
    sent = body.replace(b'"revision": 1', b'"revision": 2') if forgery == "body" else body
    async with api.client.put(
        "/v1/state", data=sent, headers={"Authorization": signed.header}
    ) as resp:
        assert resp.status == 401
        assert signing.RESPONSE_HEADER not in resp.headers
    assert api.loader.loads == 0


async def test_probes_need_no_token_and_readyz_follows_restore(api: Api) -> None:
    async with api.client.get("/healthz") as resp:
        assert resp.status == 200
    async with api.client.get("/readyz") as resp:
        assert resp.status == 503
    api.ready.set()
    async with api.client.get("/readyz") as resp:
        assert resp.status == 200


def test_read_token(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("abc\n")
    assert read_token(secret, {}) == "abc"
    assert read_token(None, {TOKEN_ENV: " xyz "}) == "xyz"
    with pytest.raises(ValueError, match=TOKEN_ENV):
        read_token(None, {})
    secret.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token(secret, {TOKEN_ENV: "ignored"})
    with pytest.raises(ValueError):
        create_app(None, token="")  # type: ignore[arg-type]


def test_token_source_follows_a_rotated_secret(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("first")
    source = token_source(secret, {})
    assert isinstance(source, TokenFile) and source() == "first"
    # Kubernetes swaps the Secret volume's files atomically: a new file, renamed over.
    (tmp_path / "new").write_text("second\n")
    (tmp_path / "new").rename(secret)
    assert source() == "second"
    secret.unlink()  # mid-update: the current token stays in force
    assert source() == "second"
    secret.write_text("")
    assert source() == "second"
    assert token_source(None, {TOKEN_ENV: "env"})() == "env"


async def test_a_rotated_token_is_accepted_without_restart(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("old")
    reconciler = Reconciler(
        node="node-1", loader=FakeLoader(), build_plan=fake_build_plan, cgroups=FakeCgroups()
    )
    app = create_app(reconciler, token=TokenFile(secret))
    async with TestClient(TestServer(app)) as client:
        (tmp_path / "new").write_text("new")
        (tmp_path / "new").rename(secret)
        async with client.get("/v1/state", headers={"Authorization": "Bearer old"}) as resp:
            assert resp.status == 401
        async with client.get("/v1/state", headers={"Authorization": "Bearer new"}) as resp:
            assert resp.status == 200


# --- PUT /v1/state ------------------------------------------------------------------------------


async def test_put_applies_and_returns_the_report(api: Api) -> None:
    status, body = await put(api, state(1, probe()))
    assert status == 200
    assert body["node"] == "node-1" and body["revision"] == 1 and body["bootId"]
    (outcome,) = body["probes"]
    assert outcome["state"] == "Loaded" and outcome["filterEntries"] == 1
    assert outcome["programIds"] == list(api.loader.only("team-a/opens").program_ids)


async def test_invalid_state_is_400_with_field_errors(api: Api) -> None:
    bad = probe()
    bad["spec"] = {"tracepoint": "Not A Tracepoint"}
    status, body = await put(api, state(1, bad))
    assert status == 400
    assert body["error"] == "invalid NodeState"
    (field,) = body["fields"]
    assert field["loc"] == "probes.0.spec.tracepoint"
    assert "category:name" in field["msg"]
    assert api.loader.loads == 0


async def test_one_invalid_probe_refuses_the_whole_state(api: Api) -> None:
    bad = probe("bad")
    bad["targets"] = {"pids": [0]}
    status, body = await put(api, state(1, probe(), bad))
    assert status == 400 and body["fields"][0]["loc"] == "probes.1.targets.pids.0"
    assert api.loader.loads == 0 and api.reconciler.state is None


async def test_not_json_and_wrong_node_are_400(api: Api) -> None:
    status, body = await put(api, b"{nope")
    assert status == 400 and body["fields"][0]["msg"].startswith("Invalid JSON")
    status, body = await put(api, state(1, probe(), node="node-2"))
    assert status == 400 and "node-1" in body["error"]


async def test_oversized_body_is_refused(api: Api) -> None:
    async with api.client.put("/v1/state", data=b" " * (MAX_BODY + 1), headers=AUTH) as resp:
        assert resp.status == 413


async def test_a_compressed_body_is_refused_unread(api: Api) -> None:
    """Found by the API fuzz (a gzip bomb held the loop): the operator never compresses, so
    an encoded body is 415 whatever it holds, signed or not, and nothing is applied."""
    body = json.dumps(state(1, probe())).encode()
    signed = signing.sign_request(TOKEN, "PUT", "/v1/state", body).header
    for headers in (AUTH, {"Authorization": signed}):
        encoded = {**headers, "Content-Encoding": "gzip"}
        status, answer = await put(api, gzip.compress(body), encoded)
        assert status == 415, answer
        assert "Content-Encoding" in answer["error"]
    assert api.loader.loads == 0 and api.reconciler.report().revision == 0


async def test_put_is_idempotent_and_stale_revisions_are_409(api: Api) -> None:
    status, first = await put(api, state(5, probe()))
    assert status == 200
    status, again = await put(api, state(5, probe()))
    assert status == 200 and again == first
    assert api.loader.loads == 1
    status, body = await put(api, state(4))
    assert status == 409 and body["appliedRevision"] == 5
    status, body = await put(api, state(5, probe("other")))
    assert status == 409 and "different content" in body["error"]
    assert api.loader.live("team-a/opens")


async def test_get_state_reports_outcomes(api: Api) -> None:
    async with api.client.get("/v1/state", headers=AUTH) as resp:
        empty = await resp.json()
    assert empty["probes"] == [] and empty["revision"] == 0
    await put(api, state(2, probe(), probe("paused", suspend=True)))
    async with api.client.get("/v1/state", headers=AUTH) as resp:
        body = await resp.json()
    assert [(p["id"], p["state"]) for p in body["probes"]] == [
        ("team-a/opens", "Loaded"),
        ("team-a/paused", "Suspended"),
    ]
    assert body["probes"][0]["drops"] == {"rateLimited": 0, "ringFull": 0, "backlog": 0}


# --- metrics and events -------------------------------------------------------------------


async def test_metrics_read_the_loaded_programs(api: Api) -> None:
    await put(api, state(1, probe()))
    program = api.loader.only("team-a/opens")
    program.counts = [CountSample(SampleKey(cgroup_id=500), 42)]
    async with api.client.get("/metrics", headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    assert "tracekeeper_probe_hits_total{" in text
    assert 'pod="web-0"' in text and "} 42.0" in text
    assert 'tracekeeper_agent_filter_entries{namespace="team-a",probe="opens"} 1.0' in text


async def test_values_answer_one_probe_by_id_signed(api: Api) -> None:
    """GET /v1/values?probe=: that probe's rows only (another probe's stay out), as JSON
    the output API sums, signed back like every non-stream answer."""
    other = probe(name="other")
    await put(api, state(1, probe(), other))
    api.loader.only("team-a/opens").counts = [CountSample(SampleKey(cgroup_id=500), 42)]
    api.loader.only("team-a/other").counts = [CountSample(SampleKey(cgroup_id=500), 9)]
    path = "/v1/values?probe=team-a/opens"
    signed = signing.sign_request(TOKEN, "GET", path, b"")
    async with api.client.get(path, headers={"Authorization": signed.header}) as resp:
        assert resp.status == 200
        body = await resp.read()
        signing.verify_response(
            TOKEN, resp.headers[signing.RESPONSE_HEADER], signed.nonce, 200, body
        )
    values = ProbeValues.model_validate_json(body)
    assert values.probe == "team-a/opens" and values.kind == "count"
    assert [(r.key, r.count) for r in values.counts] == [({"pod": "web-0"}, 42)]
    async with api.client.get("/v1/values?probe=team-a/nope", headers=AUTH) as resp:
        assert resp.status == 404
    async with api.client.get("/v1/values?probe=team-a/opens") as resp:
        assert resp.status == 401


async def test_the_metrics_listener_serves_the_same_metrics_without_a_token(api: Api) -> None:
    await put(api, state(1, probe()))
    api.loader.only("team-a/opens").counts = [CountSample(SampleKey(cgroup_id=500), 7)]
    async with api.client.get("/metrics", headers=AUTH) as resp:
        behind_the_token = await resp.text()
    async with api.metrics_client.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        open_text = await resp.text()
    # One registry, read the same way: the same text, probe series included.
    assert open_text == behind_the_token
    hits = [line for line in open_text.splitlines() if line.startswith("tracekeeper_probe_hits")]
    assert len(hits) == 1 and 'pod="web-0"' in hits[0] and hits[0].endswith(" 7.0")
    assert 'tracekeeper_agent_filter_entries{namespace="team-a",probe="opens"} 1.0' in open_text


@pytest.mark.parametrize("headers", [{}, AUTH], ids=["no-token", "token"])
async def test_the_metrics_listener_serves_nothing_else(api: Api, headers: dict[str, str]) -> None:
    # Not even with the API token: this listener knows no other route.
    state_body = json.dumps(state(1, probe())).encode()
    for method, path, status in [
        ("PUT", "/v1/state", 404),
        ("GET", "/v1/state", 404),
        ("GET", "/v1/events?probe=team-a/opens", 404),
        ("GET", "/healthz", 404),
        ("GET", "/readyz", 404),
        ("GET", "/", 404),
        ("POST", "/metrics", 405),
        ("PUT", "/metrics", 405),
        ("DELETE", "/metrics", 405),
    ]:
        async with api.metrics_client.request(
            method, path, headers=headers, data=state_body
        ) as resp:
            assert resp.status == status, (method, path, resp.status)
    assert api.loader.loads == 0 and api.reconciler.state is None


async def test_waiting_scrapes_of_the_metrics_listener_hold_one_worker_thread() -> None:
    # Scrapes wait for the programs lock in a worker thread; loads and filter updates need
    # those threads too. A flood of token-free scrapes must not take them all.
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
    reconciler = Reconciler(
        node="node-1", loader=FakeLoader(), build_plan=fake_build_plan, cgroups=FakeCgroups()
    )
    # The probe collector takes the programs lock per probe read (not the whole scrape).
    busy = make_probe("team-a/busy", FakeProgram())
    board = ListBoard(lambda: [busy])
    board.lock = reconciler.board.lock
    metrics = AgentMetrics(board, FakeAttributor())
    app = create_metrics_app(reconciler, metrics.registry)
    async with TestClient(TestServer(app)) as client:

        async def scrape() -> int:
            async with client.get("/metrics") as resp:
                await resp.read()
                return resp.status

        with reconciler.board.lock:  # as while a program closes
            scrapes = [asyncio.create_task(scrape()) for _ in range(4)]
            await asyncio.sleep(0.1)
            assert not any(t.done() for t in scrapes)
            async with asyncio.timeout(5):
                assert await asyncio.to_thread(lambda: "a worker was free") == "a worker was free"
        assert await asyncio.gather(*scrapes) == [200] * 4


async def read_line(stream: Any) -> dict[str, Any]:
    async with asyncio.timeout(10):
        line = await stream.readline()
    assert line, "stream ended"
    decoded: dict[str, Any] = json.loads(line)
    return decoded


async def test_events_stream_as_ndjson(api: Api) -> None:
    events_probe = probe("execs", output={"kind": "events"})
    await put(api, state(1, events_probe))
    program = api.loader.only("team-a/execs")
    async with api.client.get("/v1/events?probe=team-a/execs", headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        program.events.put(RawEvent(1, 1234, 1234, 501, "nginx", {"filename": "/etc/hosts"}))
        event = await read_line(resp.content)
    assert event["probe"] == "team-a/execs"
    assert (event["pod"], event["container"], event["comm"]) == ("web-0", "", "nginx")
    assert event["filename"] == "/etc/hosts"


async def test_an_events_request_with_a_body_is_refused(api: Api) -> None:
    """Found by the API fuzz: a GET /v1/events whose body went unread streamed on after its
    client left (reading the connection stays paused, so the leaving is never seen): each
    such request kept a subscription and a connection of the cap, and held up the
    listener's close. A body is refused; without one, the stream is served."""
    async with api.client.get("/v1/events", data=b"x" * 100_000, headers=AUTH) as resp:
        assert resp.status == 400
        assert "no body" in (await resp.json())["error"]
    async with api.client.get("/v1/events", headers=AUTH) as resp:
        assert resp.status == 200


async def test_events_of_an_unknown_probe_are_404(api: Api) -> None:
    async with api.client.get("/v1/events?probe=team-a/nope", headers=AUTH) as resp:
        assert resp.status == 404
