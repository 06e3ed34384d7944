"""Authorization by Kubernetes, asked again: a SubjectAccessReview per request.

The kube-apiserver already checked RBAC before proxying; asking again means a request that
reached us some other way with a valid front-proxy certificate is still only served what
its user may read, and a namespace the user may not read is a 403 here too. Answers are
kept a few seconds (a `top` refreshing every second asks once per TTL).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kubernetes import client

from tracekeeper_api.output import OUTPUT_GROUP, RESOURCE
from tracekeeper_operator.output_api.front_proxy import Identity


@dataclass(frozen=True)
class Access:
    namespace: str
    name: str
    subresource: str
    verb: str = "get"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


class Authorizer(Protocol):
    async def review(self, identity: Identity, access: Access) -> Decision: ...


class SubjectAccessReviews:
    def __init__(self, ttl: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[tuple[object, ...], tuple[float, Decision]] = {}

    async def review(self, identity: Identity, access: Access) -> Decision:
        key = (identity.user, identity.groups, tuple(sorted(identity.extra.items())), access)
        hit = self._cache.get(key)
        now = self._clock()
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        decision = await asyncio.to_thread(self._ask, identity, access)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (now, decision)
        return decision

    @staticmethod
    def _ask(identity: Identity, access: Access) -> Decision:
        body = client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=identity.user,
                groups=list(identity.groups),
                extra={k: list(v) for k, v in identity.extra.items()},
                resource_attributes=client.V1ResourceAttributes(
                    group=OUTPUT_GROUP,
                    resource=RESOURCE,
                    subresource=access.subresource,
                    namespace=access.namespace,
                    name=access.name,
                    verb=access.verb,
                ),
            )
        )
        result = client.AuthorizationV1Api().create_subject_access_review(body)
        status = result.status
        return Decision(bool(status and status.allowed), (status.reason or "") if status else "")
