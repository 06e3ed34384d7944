"""Mutual HMAC authentication between the operator and the agents, keyed by the shared token.

The operator signs each request (method, path, body digest, timestamp, a random nonce);
the agent checks it in constant time, within a bounded clock skew, and signs its answer
(the request's nonce, the status and the body digest) with the same key. The token itself
never crosses the wire, so a peer that is not an agent learns nothing reusable from a
request, and cannot forge an answer the operator accepts. Integrity and peer
authentication, not confidentiality: bodies travel in clear (see DESIGN, Amendments).

Replays inside the skew window are harmless: GET is read-only, and the agent refuses a
desired state older than the one it applied.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

SCHEME = "TK-HMAC-SHA256"
REQUEST_HEADER = "Authorization"
RESPONSE_HEADER = "X-Tracekeeper-Signature"
MAX_SKEW = 300.0
"""Seconds a request's timestamp may differ from the agent's clock."""
_NONCE_BYTES = 16
_MAX_NONCE_CHARS = 64


class SignatureError(ValueError):
    """A request or response whose signature is missing, malformed, stale or wrong."""


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _mac(token: str, *parts: str) -> str:
    return hmac.new(token.encode(), "\n".join(parts).encode(), hashlib.sha256).hexdigest()


def _request_mac(token: str, method: str, path: str, ts: str, nonce: str, digest: str) -> str:
    return _mac(token, "tracekeeper-request-v1", method.upper(), path, ts, nonce, digest)


def _response_mac(token: str, nonce: str, status: int, digest: str) -> str:
    return _mac(token, "tracekeeper-response-v1", nonce, str(status), digest)


@dataclass(frozen=True)
class SignedRequest:
    header: str
    """The value of the Authorization header."""
    nonce: str
    """What the answer's signature must cover."""


def sign_request(
    token: str, method: str, path: str, body: bytes, *, now: float | None = None
) -> SignedRequest:
    """`path` is the request target as sent (path and query string)."""
    ts = str(int(time.time() if now is None else now))
    nonce = secrets.token_hex(_NONCE_BYTES)
    sig = _request_mac(token, method, path, ts, nonce, body_digest(body))
    return SignedRequest(f"{SCHEME} ts={ts},nonce={nonce},sig={sig}", nonce)


def _fields(header: str) -> dict[str, str]:
    scheme, _, rest = header.partition(" ")
    if scheme != SCHEME:
        raise SignatureError(f"not a {SCHEME} request")
    out: dict[str, str] = {}
    for item in rest.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise SignatureError("malformed signature header")
        out[key] = value
    return out


def is_signed(header: str) -> bool:
    return header.startswith(SCHEME + " ")


@dataclass(frozen=True)
class RequestSignature:
    ts: str
    nonce: str
    sig: str


def parse_request(
    header: str, *, now: float | None = None, max_skew: float = MAX_SKEW
) -> RequestSignature:
    """The header's fields, checked for shape and freshness (before any body is read)."""
    fields = _fields(header)
    ts, nonce, sig = fields.get("ts", ""), fields.get("nonce", ""), fields.get("sig", "")
    if not ts.isdigit() or not nonce or len(nonce) > _MAX_NONCE_CHARS or not sig:
        raise SignatureError("malformed signature header")
    current = time.time() if now is None else now
    if abs(current - int(ts)) > max_skew:
        raise SignatureError("request timestamp outside the allowed clock skew")
    return RequestSignature(ts, nonce, sig)


def verify_request(
    token: str, signature: RequestSignature, method: str, path: str, body: bytes
) -> None:
    expected = _request_mac(token, method, path, signature.ts, signature.nonce, body_digest(body))
    if not hmac.compare_digest(expected.encode(), signature.sig.encode()):
        raise SignatureError("bad request signature")


def sign_response(token: str, nonce: str, status: int, body: bytes) -> str:
    """The value of the response's signature header."""
    return f"sig={_response_mac(token, nonce, status, body_digest(body))}"


def verify_response(token: str, header: str, nonce: str, status: int, body: bytes) -> None:
    key, sep, sig = header.strip().partition("=")
    if key != "sig" or not sep or not sig:
        raise SignatureError("the answer carries no signature")
    expected = _response_mac(token, nonce, status, body_digest(body))
    if not hmac.compare_digest(expected.encode(), sig.encode()):
        raise SignatureError("bad answer signature")
