"""The output server's reads and writes of the Kubernetes API (synchronous client, in
worker threads): the TraceProbe asked for, the front-proxy configuration, the APIService's
caBundle."""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Protocol, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tracekeeper_api import GROUP, VERSION
from tracekeeper_operator.output_api.front_proxy import (
    CONFIGMAP_NAME,
    CONFIGMAP_NAMESPACE,
    RequestHeaderAuth,
)


class ProbeLookup(Protocol):
    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The TraceProbe object, or None when there is none."""


class KubeProbeLookup:
    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        def read() -> dict[str, Any] | None:
            try:
                obj = client.CustomObjectsApi().get_namespaced_custom_object(
                    GROUP, VERSION, namespace, "traceprobes", name
                )
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            return cast(dict[str, Any], obj)

        return await asyncio.to_thread(read)


async def read_request_header_auth() -> RequestHeaderAuth:
    def read() -> RequestHeaderAuth:
        cm = client.CoreV1Api().read_namespaced_config_map(CONFIGMAP_NAME, CONFIGMAP_NAMESPACE)
        return RequestHeaderAuth.from_configmap(cm.data or {})

    return await asyncio.to_thread(read)


async def set_ca_bundle(apiservice: str, ca_pem: bytes) -> None:
    """Point the APIService at our serving CA (the kube-apiserver verifies us with it)."""

    def patch() -> None:
        body = {"spec": {"caBundle": base64.b64encode(ca_pem).decode()}}
        client.ApiregistrationV1Api().patch_api_service(apiservice, body)

    await asyncio.to_thread(patch)
