"""Request and answer signatures (tracekeeper_api.signing), both directions."""

from __future__ import annotations

import pytest

from tracekeeper_api import signing

KEY = "k3y"


def test_a_signed_request_verifies_and_yields_its_nonce() -> None:
    signed = signing.sign_request(KEY, "put", "/v1/state", b"{}", now=1000)
    assert KEY not in signed.header and signing.is_signed(signed.header)
    sig = signing.parse_request(signed.header, now=1010)
    assert sig.nonce == signed.nonce
    signing.verify_request(KEY, sig, "PUT", "/v1/state", b"{}")


@pytest.mark.parametrize(
    ("key", "method", "path", "body"),
    [
        ("other", "PUT", "/v1/state", b"{}"),
        (KEY, "GET", "/v1/state", b"{}"),
        (KEY, "PUT", "/v1/state?x=1", b"{}"),
        (KEY, "PUT", "/v1/state", b"{ }"),
    ],
    ids=["key", "method", "path", "body"],
)
def test_any_change_breaks_the_request_signature(
    key: str, method: str, path: str, body: bytes
) -> None:
    signed = signing.sign_request(KEY, "PUT", "/v1/state", b"{}", now=1000)
    sig = signing.parse_request(signed.header, now=1000)
    with pytest.raises(signing.SignatureError, match="bad request signature"):
        signing.verify_request(key, sig, method, path, body)


@pytest.mark.parametrize(
    "header",
    [
        "Bearer k3y",
        f"{signing.SCHEME} ts=1000,nonce=n",
        f"{signing.SCHEME} ts=x,nonce=n,sig=s",
        f"{signing.SCHEME} ts=1000,nonce={'n' * 65},sig=s",
        f"{signing.SCHEME} garbage",
    ],
)
def test_malformed_headers_are_refused(header: str) -> None:
    with pytest.raises(signing.SignatureError):
        signing.parse_request(header, now=1000)


def test_requests_outside_the_clock_skew_are_refused() -> None:
    signed = signing.sign_request(KEY, "GET", "/v1/state", b"", now=1000)
    signing.parse_request(signed.header, now=1000 + signing.MAX_SKEW)
    with pytest.raises(signing.SignatureError, match="clock skew"):
        signing.parse_request(signed.header, now=1001 + signing.MAX_SKEW)
    with pytest.raises(signing.SignatureError, match="clock skew"):
        signing.parse_request(signed.header, now=999 - signing.MAX_SKEW)


def test_answers_are_bound_to_the_request_nonce_status_and_body() -> None:
    header = signing.sign_response(KEY, "nonce-1", 200, b"report")
    signing.verify_response(KEY, header, "nonce-1", 200, b"report")
    for key, nonce, status, body in [
        ("other", "nonce-1", 200, b"report"),
        (KEY, "nonce-2", 200, b"report"),  # an answer replayed to another request
        (KEY, "nonce-1", 409, b"report"),
        (KEY, "nonce-1", 200, b"forged"),
    ]:
        with pytest.raises(signing.SignatureError):
            signing.verify_response(key, header, nonce, status, body)
    with pytest.raises(signing.SignatureError, match="no signature"):
        signing.verify_response(KEY, "", "nonce-1", 200, b"report")


def test_nonces_differ() -> None:
    a = signing.sign_request(KEY, "GET", "/", b"", now=1)
    b = signing.sign_request(KEY, "GET", "/", b"", now=1)
    assert a.nonce != b.nonce and a.header != b.header
