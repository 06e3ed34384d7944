"""Talking to node agents: PUT /v1/state (the desired state), GET /v1/state (their report).

A small Protocol so that push scheduling is tested with a fake; the real client is aiohttp
with a bearer token read from the mounted Secret (re-read when the file changes, so a
rotated token needs no restart).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from pydantic import ValidationError

from tracekeeper_api.protocol import NodeReport, NodeState

TOKEN_ENV = "TRACEKEEPER_TOKEN"
MAX_ERROR_TEXT = 300


class AgentError(Exception):
    """The agent could not be reached, or answered with an error or nonsense."""


class StaleRevision(AgentError):
    """409: the agent applied a newer revision than the one sent."""

    def __init__(self, message: str, applied_revision: int) -> None:
        super().__init__(message)
        self.applied_revision = applied_revision


class AgentClient(Protocol):
    async def put_state(self, endpoint: str, state: NodeState) -> NodeReport: ...

    async def get_state(self, endpoint: str) -> NodeReport: ...


class TokenSource:
    """The bearer token from a file, else $TRACEKEEPER_TOKEN; re-read when the file changes."""

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


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 1] + "…"


def _error_text(status: int, body: str) -> str:
    try:
        data: Any = json.loads(body)
    except ValueError:
        return f"HTTP {status}: {_short(body)}"
    if not isinstance(data, dict):
        return f"HTTP {status}: {_short(body)}"
    message = str(data.get("error", ""))
    fields = data.get("fields") or []
    detail = "; ".join(f"{f.get('loc')}: {f.get('msg')}" for f in fields if isinstance(f, dict))
    return _short(f"HTTP {status}: {message}" + (f" ({detail})" if detail else ""))


class HttpAgentClient:
    def __init__(self, tokens: TokenSource, *, timeout: float = 30.0) -> None:
        self._tokens = tokens
        self._timeout = aiohttp.ClientTimeout(total=timeout)
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
            "PUT", endpoint, state.model_dump_json(by_alias=True, exclude_none=True)
        )

    async def get_state(self, endpoint: str) -> NodeReport:
        return await self._call("GET", endpoint, None)

    async def _call(self, method: str, endpoint: str, body: str | None) -> NodeReport:
        headers = {"Authorization": f"Bearer {self._tokens.token()}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        url = f"{endpoint}/v1/state"
        try:
            async with self._client().request(method, url, data=body, headers=headers) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AgentError(f"{method} {url}: {type(exc).__name__}: {_short(str(exc))}") from exc
        if status == 409:
            applied = 0
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                applied = int(json.loads(text).get("appliedRevision", 0))
            raise StaleRevision(f"{method} {url}: {_error_text(status, text)}", applied)
        if status != 200:
            raise AgentError(f"{method} {url}: {_error_text(status, text)}")
        try:
            return NodeReport.model_validate_json(text)
        except ValidationError as exc:
            raise AgentError(f"{method} {url}: not a NodeReport: {_short(str(exc))}") from exc
