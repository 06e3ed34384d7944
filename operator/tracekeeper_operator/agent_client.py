"""Talking to node agents: PUT /v1/state (the desired state), GET /v1/state (their report).

A small Protocol so that push scheduling is tested with a fake; the real client is aiohttp,
signing with the token read from the mounted Secret (re-read when the file changes, so a
rotated token needs no restart).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import aiohttp
from pydantic import ValidationError

from tracekeeper_api import signing
from tracekeeper_api.protocol import (
    MAX_PROBES_PER_NODE,
    NodeReport,
    NodeState,
    StaleRevisionBody,
)
from tracekeeper_api.text import one_line
from tracekeeper_operator.agent_errors import AgentError, StaleRevision

log = logging.getLogger(__name__)

TOKEN_ENV = "TRACEKEEPER_TOKEN"
STATE_PATH = "/v1/state"


class AgentClient(Protocol):
    async def put_state(self, endpoint: str, state: NodeState) -> NodeReport: ...

    async def get_state(self, endpoint: str) -> NodeReport: ...


class TokenSource:
    """The API token from a file, else $TRACEKEEPER_TOKEN; re-read when the file changes."""

    def __init__(self, path: Path | None, environ: Mapping[str, str] = os.environ) -> None:
        self._path = path
        self._environ = environ
        self._cached: tuple[float, str] | None = None

    def token(self) -> str:
        if self._path is not None and self._path.exists():
            mtime = self._path.stat().st_mtime
            if self._cached is None or self._cached[0] != mtime:
                self._cached = (mtime, self._path.read_text().strip())
            token = self._cached[1]
        else:
            token = self._environ.get(TOKEN_ENV, "").strip()
        if not token:
            raise AgentError(
                f"no agent API token: {self._path} is missing or empty and ${TOKEN_ENV} is unset"
            )
        return token


MAX_OUTCOME_BYTES = 8 * 1024
"""One ProbeOutcome on the wire at most: a MAX_MESSAGE message JSON-escaped, ids, counters."""
MAX_REPORT_BYTES = MAX_PROBES_PER_NODE * MAX_OUTCOME_BYTES + 64 * 1024
"""The largest answer read from an agent; a longer one is refused unread."""
_CHUNK = 64 * 1024


class _TooLarge(Exception):
    pass


async def read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or _TooLarge as soon as it is known to exceed `limit` (never read whole)."""
    if resp.content_length is not None and resp.content_length > limit:
        raise _TooLarge
    body = bytearray()
    async for chunk in resp.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > limit:
            raise _TooLarge
    return bytes(body)


MAX_DETAIL_BYTES = 300
"""An authenticated agent's error text logged at most (for the operator's log, never status)."""


class HttpAgentClient:
    """Requests are signed with the token (tracekeeper_api.signing), never carry it, and
    only signed answers are believed: a peer posing as an agent learns nothing reusable and
    cannot make the operator fold its outcomes. Failures are fixed messages (HTTP status or
    exception type): nothing an agent sends reaches a status but its typed report."""

    def __init__(
        self, tokens: TokenSource, *, timeout: float = 30.0, max_body: int = MAX_REPORT_BYTES
    ) -> None:
        self._tokens = tokens
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_body = max_body
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def put_state(self, endpoint: str, state: NodeState) -> NodeReport:
        return await self._call(
            "PUT", endpoint, state.model_dump_json(by_alias=True, exclude_none=True).encode()
        )

    async def get_state(self, endpoint: str) -> NodeReport:
        return await self._call("GET", endpoint, b"")

    async def _call(self, method: str, endpoint: str, body: bytes) -> NodeReport:
        key = self._tokens.token()
        path = STATE_PATH
        signed = signing.sign_request(key, method, path, body)
        headers = {signing.REQUEST_HEADER: signed.header}
        if body:
            headers["Content-Type"] = "application/json"
        try:
            async with self._client().request(
                method, f"{endpoint}{path}", data=body or None, headers=headers
            ) as resp:
                status = resp.status
                text = await read_bounded(resp, self._max_body)
                signature = resp.headers.get(signing.RESPONSE_HEADER, "")
        except _TooLarge:
            raise AgentError(f"agent answer larger than {self._max_body} bytes") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AgentError(f"agent unreachable ({type(exc).__name__})") from exc
        try:
            signing.verify_response(key, signature, signed.nonce, status, text)
        except signing.SignatureError:
            raise AgentError(
                f"agent answer not signed with the API token (HTTP {status})"
            ) from None
        if status == 409:
            applied = 0
            with contextlib.suppress(ValidationError):
                applied = StaleRevisionBody.model_validate_json(text).applied_revision
            raise StaleRevision("agent applied a newer revision (HTTP 409)", applied)
        if status != 200:
            log.warning(
                "agent at %s: %s %s: HTTP %d: %s",
                endpoint,
                method,
                path,
                status,
                one_line(text, MAX_DETAIL_BYTES),
            )
            raise AgentError(f"agent refused the request (HTTP {status})")
        try:
            return NodeReport.model_validate_json(text)
        except ValidationError as exc:
            log.warning("agent at %s: not a NodeReport: %s", endpoint, exc.error_count())
            raise AgentError("agent answer is not a NodeReport") from exc
