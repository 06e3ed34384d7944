"""The agent client over HTTP (a loopback aiohttp server playing the agent)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tracekeeper_api.protocol import NodeReport, NodeState
from tracekeeper_operator.agent_client import (
    AgentError,
    HttpAgentClient,
    StaleRevision,
    TokenSource,
)

STATE = NodeState(node="n1", revision=7, probes=[])


class Agent:
    """Answers like the agent's API; `answer` picks the next response."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, Any]] = []
        self.answer: tuple[int, Any] = (200, None)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        self.seen.append((request.method, request.headers.get("Authorization", ""),
                          json.loads(body) if body else None))  # fmt: skip
        status, payload = self.answer
        if payload is None:
            payload = NodeReport(node="n1", revision=7, boot_id="b1").to_wire()
        return web.json_response(payload, status=status)


@pytest.fixture
async def agent() -> AsyncIterator[tuple[Agent, str]]:
    fake = Agent()
    app = web.Application()
    app.router.add_route("*", "/v1/state", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield fake, str(server.make_url("")).rstrip("/")
    await server.close()


async def test_put_and_get_carry_the_token_and_parse_reports(
    agent: tuple[Agent, str], tmp_path: Path
) -> None:
    fake, url = agent
    (tmp_path / "token").write_text("s3cret\n")
    client = HttpAgentClient(TokenSource(tmp_path / "token"))
    try:
        report = await client.put_state(url, STATE)
        assert report.boot_id == "b1"
        assert (await client.get_state(url)).revision == 7
    finally:
        await client.close()
    (method, auth, body), (method2, _, _) = fake.seen
    assert (method, auth, method2) == ("PUT", "Bearer s3cret", "GET")
    assert body == {"node": "n1", "revision": 7, "probes": [], "pods": []}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ((401, {"error": "a valid bearer token is required"}), "HTTP 401: a valid bearer"),
        ((400, {"error": "invalid NodeState", "fields": [{"loc": "node", "msg": "too long"}]}),
         "invalid NodeState (node: too long)"),
        ((200, {"not": "a report"}), "not a NodeReport"),
    ],
)  # fmt: skip
async def test_errors_say_what_the_agent_said(
    agent: tuple[Agent, str], answer: tuple[int, Any], expected: str
) -> None:
    fake, url = agent
    fake.answer = answer
    client = HttpAgentClient(TokenSource(None, {"TRACEKEEPER_TOKEN": "t"}))
    try:
        with pytest.raises(AgentError) as info:
            await client.put_state(url, STATE)
    finally:
        await client.close()
    assert expected in str(info.value)


async def test_stale_revision_carries_the_applied_one(agent: tuple[Agent, str]) -> None:
    fake, url = agent
    fake.answer = (409, {"error": "revision 7 is older", "appliedRevision": 99})
    client = HttpAgentClient(TokenSource(None, {"TRACEKEEPER_TOKEN": "t"}))
    try:
        with pytest.raises(StaleRevision) as info:
            await client.put_state(url, STATE)
    finally:
        await client.close()
    assert info.value.applied_revision == 99


async def test_unreachable_agent_is_an_agent_error() -> None:
    client = HttpAgentClient(TokenSource(None, {"TRACEKEEPER_TOKEN": "t"}), timeout=2)
    try:
        with pytest.raises(AgentError, match=r"127\.0\.0\.1:9\b"):
            await client.get_state("http://127.0.0.1:9")
    finally:
        await client.close()


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
