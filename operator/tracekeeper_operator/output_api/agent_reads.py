"""Reading from an agent for the output API: GET /v1/values, the GET /v1/events stream, and
GET /v1/tracepoints (the node's kernel, on request).

Requests are signed with the agent token like the operator's pushes (the token never
travels); a values answer is believed only when the agent signed it back. The event stream
is not signed by the agent (it is not state); what it carries is bounded per line and
parsed as JSON objects only. The probe is always selected on the agent, by its id.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ValidationError
from yarl import URL

from tracekeeper_api import signing
from tracekeeper_api.output import ProbeValues, Tracepoints
from tracekeeper_operator.agent_client import TokenSource, _TooLarge, read_bounded
from tracekeeper_operator.agent_errors import AgentError

MAX_VALUES_BYTES = 4 * 1024 * 1024
MAX_EVENT_LINE = 256 * 1024


class AgentReads(Protocol):
    async def values(self, endpoint: str, probe_id: str) -> ProbeValues: ...

    async def tracepoints(self, endpoint: str, match: str) -> Tracepoints: ...

    def events(self, endpoint: str, probe_id: str) -> AsyncIterator[dict[str, Any]]: ...


def _path(route: str, probe_id: str) -> str:
    return f"{route}?probe={quote(probe_id, safe='/')}"


M = TypeVar("M", bound=BaseModel)


def _answer(model: type[M], status: int, body: bytes, not_found: str) -> M:
    """A signed agent answer as `model`; AgentError (`not_found` for a 404) otherwise."""
    if status == 404:
        raise AgentError(not_found)
    if status != 200:
        raise AgentError(f"agent refused the request (HTTP {status})")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise AgentError(f"agent answer is not {model.__name__}") from exc


class HttpAgentReads:
    def __init__(self, tokens: TokenSource, *, timeout: float = 10.0) -> None:
        self._tokens = tokens
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                read_bufsize=MAX_EVENT_LINE, max_line_size=MAX_EVENT_LINE
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _signed_get(self, endpoint: str, path: str) -> tuple[int, bytes]:
        """GET path, signed; (status, body) of an answer the agent signed back."""
        key = self._tokens.token()
        signed = signing.sign_request(key, "GET", path, b"")
        try:
            async with self._client().get(
                URL(endpoint + path, encoded=True),
                headers={signing.REQUEST_HEADER: signed.header},
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as resp:
                status = resp.status
                body = await read_bounded(resp, MAX_VALUES_BYTES)
                signature = resp.headers.get(signing.RESPONSE_HEADER, "")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AgentError(f"agent unreachable ({type(exc).__name__})") from exc
        except _TooLarge:
            raise AgentError(f"agent answer larger than {MAX_VALUES_BYTES} bytes") from None
        try:
            signing.verify_response(key, signature, signed.nonce, status, body)
        except signing.SignatureError:
            raise AgentError(
                f"agent answer not signed with the API token (HTTP {status})"
            ) from None
        return status, body

    async def values(self, endpoint: str, probe_id: str) -> ProbeValues:
        status, body = await self._signed_get(endpoint, _path("/v1/values", probe_id))
        values = _answer(ProbeValues, status, body, "probe not loaded on this node")
        if values.probe != probe_id:
            raise AgentError("agent answered for another probe")
        return values

    async def tracepoints(self, endpoint: str, match: str) -> Tracepoints:
        path = f"/v1/tracepoints?match={quote(match, safe='')}"
        status, body = await self._signed_get(endpoint, path)
        answer = _answer(
            Tracepoints, status, body, "this node's agent predates listing tracepoints"
        )
        if answer.match != match:
            raise AgentError("agent answered for another match")
        return answer

    async def events(self, endpoint: str, probe_id: str) -> AsyncIterator[dict[str, Any]]:
        """The probe's events until the agent ends the stream; AgentError on failure."""
        key = self._tokens.token()
        path = _path("/v1/events", probe_id)
        signed = signing.sign_request(key, "GET", path, b"")
        try:
            async with self._client().get(
                URL(endpoint + path, encoded=True),
                headers={signing.REQUEST_HEADER: signed.header},
                timeout=aiohttp.ClientTimeout(total=None, connect=self._timeout),
            ) as resp:
                if resp.status != 200:
                    raise AgentError(f"agent refused the stream (HTTP {resp.status})")
                async for line in resp.content:
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:
                        raise AgentError("agent sent a line that is not JSON") from None
                    if not isinstance(event, dict) or event.get("probe") != probe_id:
                        raise AgentError("agent sent an event of another probe")
                    yield event
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AgentError(f"agent stream failed ({type(exc).__name__})") from exc
