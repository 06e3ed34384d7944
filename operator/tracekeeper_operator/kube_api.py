"""The operator's own use of the Kubernetes API: credentials (for kopf too), status
patches and Events.

kopf watches and manages the finalizer; status and Event writes happen outside kopf's
handlers (agent reports arrive on their own schedule), so they go through the kubernetes
client, in a worker thread each since that client is synchronous.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any, Protocol

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tracekeeper_api import GROUP, VERSION
from tracekeeper_operator.kube_events import EventSpec, rfc3339
from tracekeeper_operator.records import ObjectRef

log = logging.getLogger(__name__)

COMPONENT = "tracekeeper-operator"
PLURALS = {"TraceProbe": "traceprobes", "TraceFilter": "tracefilters"}


class KubeWrites(Protocol):
    async def patch_status(self, ref: ObjectRef, status: dict[str, Any]) -> bool:
        """Make the object's status this (a merge patch: `WireModel.to_merge_patch`); False
        when the object is gone."""

    async def post_event(self, ref: ObjectRef, event: EventSpec) -> None: ...


def load_config(kubeconfig: str | None = None) -> None:
    """In-cluster credentials in a pod, else the kubeconfig (--kubeconfig or $KUBECONFIG)."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    else:
        # Read $KUBECONFIG now: the client library only reads it when first imported.
        path = kubeconfig or os.environ.get("KUBECONFIG")
        config.load_kube_config(config_file=path)  # type: ignore[no-untyped-call]


def connection_info(kubeconfig: str | None = None) -> kopf.ConnectionInfo:
    """kopf's credentials from the same source as ours (kopf's own login_via_client only
    knows $KUBECONFIG as it was when the client library was imported)."""
    load_config(kubeconfig)
    cfg = client.Configuration.get_default_copy()
    # kubernetes >= 36 keeps the token under BearerToken, older ones under authorization.
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix(
        "authorization"
    )
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


def can_list_nodes() -> tuple[bool, str]:
    """Whether Node objects may be read (for nodeSelector), and why not."""
    try:
        client.CoreV1Api().list_node(limit=1, _request_timeout=10)
    except ApiException as exc:
        if exc.status == 403:
            return False, "forbidden to list nodes"
        raise
    return True, ""


class KubernetesWrites:
    def __init__(self) -> None:
        self._custom = client.CustomObjectsApi()
        self._core = client.CoreV1Api()
        self._instance = socket.gethostname()

    async def patch_status(self, ref: ObjectRef, status: dict[str, Any]) -> bool:
        def patch() -> bool:
            try:
                self._custom.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    ref.namespace,
                    PLURALS[ref.kind],
                    ref.name,
                    # A merge patch of the whole status: every field is always written, and
                    # lists (conditions, failures) are replaced whole.
                    {"status": status},
                    _content_type="application/merge-patch+json",
                    _request_timeout=30,
                )
            except ApiException as exc:
                if exc.status == 404:
                    return False
                raise
            return True

        return await asyncio.to_thread(patch)

    async def post_event(self, ref: ObjectRef, event: EventSpec) -> None:
        now = rfc3339()
        body = client.CoreV1Event.from_dict(
            {
                "metadata": {"generateName": f"{ref.name}.", "namespace": ref.namespace},
                "involvedObject": {
                    "apiVersion": ref.api_version,
                    "kind": ref.kind,
                    "name": ref.name,
                    "namespace": ref.namespace,
                    "uid": ref.uid,
                },
                "reason": event.reason,
                "message": event.message,
                "type": event.type,
                "source": {"component": COMPONENT},
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
                "reportingComponent": COMPONENT,
                "reportingInstance": self._instance,
            }
        )

        assert body is not None

        def create() -> None:
            self._core.create_namespaced_event(ref.namespace, body, _request_timeout=30)

        await asyncio.to_thread(create)
