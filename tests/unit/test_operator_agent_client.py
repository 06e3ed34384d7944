"""The agent client over HTTP (a loopback aiohttp server playing the agent): signed
requests that never carry the token, only signed answers believed, bounded reads, and
fixed failure messages that never quote the agent."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tracekeeper_api import signing
from tracekeeper_api.protocol import NodeReport, NodeState
from tracekeeper_operator.agent_client import HttpAgentClient, TokenSource
from tracekeeper_operator.agent_errors import AgentError, StaleRevision

STATE = NodeState(node="n1", revision=7, probes=[])
TOKEN = "s3cret"
UNSIGNED = "agent answer not signed with the API token"
SECRET_TEXT = "<script>tenant-controlled text</script>"


class Agent:
    """Answers like the agent's API: checks the request's signature, signs its answer with
    `sign_with` (None: unsigned); `answer` picks the next response."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, Any]] = []
        self.answer: tuple[int, Any] = (200, None)
        self.sign_with: str | None = TOKEN

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        header = request.headers.get("Authorization", "")
        self.seen.append((request.method, header, json.loads(body) if body else None))
        sig = signing.parse_request(header)
        signing.verify_request(TOKEN, sig, request.method, request.raw_path, body)
        status, payload = self.answer
        if payload is None:
            payload = NodeReport(node="n1", revision=7, boot_id="b1").to_wire()
        response = web.json_response(payload, status=status)
        if self.sign_with is not None:
            assert isinstance(response.body, bytes)
            response.headers[signing.RESPONSE_HEADER] = signing.sign_response(
                self.sign_with, sig.nonce, status, response.body
            )
        return response


async def _serve(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest.fixture
async def agent() -> AsyncIterator[tuple[Agent, str]]:
    fake = Agent()
    app = web.Application()
    app.router.add_route("*", "/v1/state", fake.handle)
    server = await _serve(app)
    yield fake, str(server.make_url("")).rstrip("/")
    await server.close()


def _client(**kw: Any) -> HttpAgentClient:
    return HttpAgentClient(TokenSource(None, {"TRACEKEEPER_TOKEN": TOKEN}), **kw)


async def test_requests_are_signed_never_carry_the_token_and_parse_reports(
    agent: tuple[Agent, str], tmp_path: Path
) -> None:
    fake, url = agent
    (tmp_path / "token").write_text(TOKEN + "\n")
    client = HttpAgentClient(TokenSource(tmp_path / "token"))
    try:
        report = await client.put_state(url, STATE)
        assert report.boot_id == "b1"
        assert (await client.get_state(url)).revision == 7
    finally:
        await client.close()
    (method, auth, body), (method2, auth2, _) = fake.seen
    assert (method, method2) == ("PUT", "GET")
    assert auth.startswith(signing.SCHEME + " ") and TOKEN not in auth + auth2
    assert body == {"node": "n1", "revision": 7, "probes": [], "pods": []}


@pytest.mark.parametrize(
    ("answer", "sign_with", "expected"),
    [
        ((200, None), None, f"{UNSIGNED} (HTTP 200)"),
        ((200, None), "another-token", f"{UNSIGNED} (HTTP 200)"),
        ((401, {"error": SECRET_TEXT}), None, f"{UNSIGNED} (HTTP 401)"),
        ((400, {"error": SECRET_TEXT, "fields": [{"loc": "node", "msg": SECRET_TEXT}]}), TOKEN,
         "agent refused the request (HTTP 400)"),
        ((200, {"not": SECRET_TEXT}), TOKEN, "agent answer is not a NodeReport"),
    ],
)  # fmt: skip
async def test_failures_are_fixed_messages_that_never_quote_the_agent(
    agent: tuple[Agent, str], answer: tuple[int, Any], sign_with: str | None, expected: str
) -> None:
    fake, url = agent
    fake.answer, fake.sign_with = answer, sign_with
    client = _client()
    try:
        with pytest.raises(AgentError) as info:
            await client.put_state(url, STATE)
    finally:
        await client.close()
    assert str(info.value) == expected
    assert "tenant-controlled" not in str(info.value)


async def test_a_forged_report_is_not_believed(agent: tuple[Agent, str]) -> None:
    """A peer without the token (a pod posing as an agent) cannot make its outcomes count."""
    fake, url = agent
    fake.sign_with = "guessed"
    client = _client()
    try:
        with pytest.raises(AgentError, match="not signed"):
            await client.get_state(url)
    finally:
        await client.close()


async def test_stale_revision_carries_the_applied_one(agent: tuple[Agent, str]) -> None:
    fake, url = agent
    fake.answer = (409, {"error": "revision 7 is older", "appliedRevision": 99})
    client = _client()
    try:
        with pytest.raises(StaleRevision) as info:
            await client.put_state(url, STATE)
    finally:
        await client.close()
    assert info.value.applied_revision == 99


async def test_a_huge_answer_is_refused_without_reading_it_all() -> None:
    """An answer streamed without a length: the client stops once it passed the limit."""
    sent = 0
    finished = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"x" * 65536
        try:
            for _ in range(1024):  # 64 MiB if it were all read
                await response.write(chunk)
                sent += len(chunk)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            finished.set()
        return response

    app = web.Application()
    app.router.add_get("/v1/state", endless)
    server = await _serve(app)
    client = _client(max_body=256 * 1024)
    try:
        with pytest.raises(AgentError) as info:
            await client.get_state(str(server.make_url("")).rstrip("/"))
        await client.close()
        await asyncio.wait_for(finished.wait(), 10)
    finally:
        await client.close()
        await server.close()
    assert str(info.value) == "agent answer larger than 262144 bytes"
    assert sent < 16 * 1024 * 1024


async def test_a_declared_oversize_answer_is_refused_unread() -> None:
    async def declared(_: web.Request) -> web.Response:
        return web.Response(body=b"{" * (300 * 1024))

    app = web.Application()
    app.router.add_get("/v1/state", declared)
    server = await _serve(app)
    client = _client(max_body=256 * 1024)
    try:
        with pytest.raises(AgentError, match="larger than 262144 bytes"):
            await client.get_state(str(server.make_url("")).rstrip("/"))
    finally:
        await client.close()
        await server.close()


async def test_unreachable_agent_is_a_fixed_message() -> None:
    client = _client(timeout=2)
    try:
        with pytest.raises(AgentError) as info:
            await client.get_state("http://127.0.0.1:9")
    finally:
        await client.close()
    assert str(info.value) == "agent unreachable (ClientConnectorError)"


def test_token_is_reread_when_the_secret_rotates(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("one\n")
    tokens = TokenSource(path)
    assert tokens.token() == "one"
    path.write_text("two\n")
    os.utime(path, (1, 1))  # a new mtime, whatever the clock's resolution
    assert tokens.token() == "two"
    path.write_text("")
    os.utime(path, (2, 2))
    with pytest.raises(AgentError, match="missing or empty"):
        tokens.token()
