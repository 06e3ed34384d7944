"""Who is asking: only the kube-apiserver's front proxy, which names the user in headers.

The apiserver presents a client certificate signed by the request-header CA (one of the
allowed names) and puts the user it authenticated in X-Remote-User, X-Remote-Group and
X-Remote-Extra-*. Those headers mean something only on a connection with that
certificate: anyone else could write them. The configuration is the cluster's own, from
the kube-system/extension-apiserver-authentication ConfigMap.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

CONFIGMAP_NAMESPACE = "kube-system"
CONFIGMAP_NAME = "extension-apiserver-authentication"


class Unauthenticated(Exception):
    """Not a request the kube-apiserver proxied (401)."""


@dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def _names(data: Mapping[str, str], key: str) -> tuple[str, ...]:
    raw = data.get(key, "")
    if not raw:
        return ()
    value = json.loads(raw)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{CONFIGMAP_NAME}: {key} is not a JSON list of strings")
    return tuple(value)


@dataclass(frozen=True)
class RequestHeaderAuth:
    client_ca: str
    """PEM of the CA that signs the front proxy's client certificate."""
    allowed_names: frozenset[str]
    """Common names the certificate may have; empty: any the CA signed."""
    username_headers: tuple[str, ...]
    group_headers: tuple[str, ...]
    extra_prefixes: tuple[str, ...]

    @classmethod
    def from_configmap(cls, data: Mapping[str, str]) -> RequestHeaderAuth:
        ca = data.get("requestheader-client-ca-file", "").strip()
        if not ca:
            raise ValueError(
                f"{CONFIGMAP_NAMESPACE}/{CONFIGMAP_NAME} has no requestheader-client-ca-file: "
                "the kube-apiserver runs without --requestheader-client-ca-file, so it cannot "
                "proxy to aggregated APIs"
            )
        usernames = _names(data, "requestheader-username-headers")
        if not usernames:
            raise ValueError(f"{CONFIGMAP_NAME}: requestheader-username-headers is empty")
        return cls(
            client_ca=ca + "\n",
            allowed_names=frozenset(_names(data, "requestheader-allowed-names")),
            username_headers=usernames,
            group_headers=_names(data, "requestheader-group-headers"),
            extra_prefixes=_names(data, "requestheader-extra-headers-prefix"),
        )

    def server_context(self, cert_file: str, key_file: str) -> ssl.SSLContext:
        """TLS with our serving certificate, asking clients for one signed by the
        request-header CA. Optional at the handshake (a client without one gets a 401 it
        can read), never unverified: another CA's certificate fails the handshake."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert_file, key_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cadata=self.client_ca)
        return ctx


def common_name(peercert: Mapping[str, Any] | None) -> str | None:
    """The subject CN of a verified peer certificate (ssl's getpeercert() dict)."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def front_proxy_name(auth: RequestHeaderAuth, peercert: Mapping[str, Any] | None) -> str:
    """The verified front proxy's name, or Unauthenticated."""
    name = common_name(peercert)
    if name is None:
        raise Unauthenticated(
            "no front-proxy client certificate: this API only serves requests proxied by "
            "the kube-apiserver (use kubectl tracekeeper, or kubectl get --raw)"
        )
    if auth.allowed_names and name not in auth.allowed_names:
        raise Unauthenticated(f"client certificate {name!r} is not an allowed front proxy")
    return name


def identify(
    auth: RequestHeaderAuth,
    peercert: Mapping[str, Any] | None,
    headers: Mapping[str, str],
    header_values: Sequence[tuple[str, str]],
) -> Identity:
    """The user the kube-apiserver authenticated. `header_values` are all (name, value)
    pairs (groups may repeat); `headers` looks one up case-insensitively."""
    front_proxy_name(auth, peercert)
    user = next((headers[h] for h in auth.username_headers if headers.get(h)), "")
    if not user:
        raise Unauthenticated("the front proxy named no user")
    lowered = [(k.lower(), v) for k, v in header_values]
    wanted = {h.lower() for h in auth.group_headers}
    groups = tuple(v for k, v in lowered if k in wanted)
    extra: dict[str, list[str]] = {}
    for prefix in (p.lower() for p in auth.extra_prefixes):
        for k, v in lowered:
            if k.startswith(prefix) and len(k) > len(prefix):
                # The apiserver percent-encodes extra keys (they may hold '/').
                extra.setdefault(unquote(k[len(prefix) :]), []).append(v)
    return Identity(user, groups, {k: tuple(v) for k, v in extra.items()})
