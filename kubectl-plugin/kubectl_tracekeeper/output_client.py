"""Requests to the output API through the kube-apiserver, as the kubeconfig's user.

The kubernetes client loads the kubeconfig like kubectl (certificates, tokens, exec
plugins, --context); the apiserver authenticates and authorizes, then proxies to the
aggregated server. Failures become `OutputError` with the sentence to print.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tracekeeper_api import GROUP, VERSION
from tracekeeper_api.output import OUTPUT_GROUP, OUTPUT_VERSION, RESOURCE

APISERVICE = f"{OUTPUT_VERSION}.{OUTPUT_GROUP}"


class OutputError(Exception):
    """What went wrong, said for the user."""


@dataclass(frozen=True)
class Target:
    namespace: str
    name: str


def load(kubeconfig: str | None, context: str | None) -> tuple[client.ApiClient, str]:
    """An API client for the kubeconfig's context and that context's namespace."""
    try:
        api = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, context=context
        )
        contexts, active = config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=kubeconfig
        )
    except (config.ConfigException, OSError) as exc:
        raise OutputError(f"cannot load the kubeconfig: {exc}") from exc
    chosen = next((c for c in contexts if c["name"] == context), active) if context else active
    namespace = (chosen or {}).get("context", {}).get("namespace") or "default"
    return api, namespace


def _status(body: bytes | str | None) -> dict[str, Any]:
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def explain(code: int, body: bytes | str | None, target: Target, what: str) -> OutputError:
    """An HTTP error of the apiserver or the output server (a metav1.Status), as one
    sentence that names what to do."""
    status = _status(body)
    message = str(status.get("message") or "")
    details = status.get("details") or {}
    probe = f"{target.namespace}/{target.name}"
    if code == 403:
        return OutputError(f"forbidden: {message}")
    if code == 401:
        return OutputError(f"unauthorized: {message or 'the apiserver refused your credentials'}")
    if code == 404 and details.get("kind") in (RESOURCE, "traceprobes"):
        return OutputError(f"traceprobe {probe} not found (namespace {target.namespace})")
    if code == 404:
        return OutputError(
            f"the output API {OUTPUT_GROUP}/{OUTPUT_VERSION} is not installed in this cluster "
            f"(no APIService {APISERVICE}; it ships with tracekeeper's manifests)"
        )
    if code == 409:
        return OutputError(f"traceprobe {probe} is not Ready: {message}")
    if code == 503:
        return OutputError(
            f"the output API (APIService {APISERVICE}) is unavailable: {message or 'no answer'}"
            f"; see `kubectl get apiservice {APISERVICE}` and the operator's log"
        )
    return OutputError(f"{what} failed: HTTP {code}: {message}")


class OutputApi:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api

    def _get(
        self, target: Target, sub: str, query: list[tuple[str, str]], *, stream: bool = False
    ) -> Any:
        path = (
            f"/apis/{OUTPUT_GROUP}/{OUTPUT_VERSION}/namespaces/{target.namespace}/"
            f"{RESOURCE}/{target.name}/{sub}"
        )
        # The client's own request path (kubernetes >= 35): its authentication (tokens,
        # exec plugins, client certificates) and TLS settings, a body we may stream.
        method, url, headers, _, _ = self.api.param_serialize(
            "GET",
            path,
            query_params=query,
            header_params={"Accept": "application/json, application/x-ndjson"},
            auth_settings=["BearerToken"],
        )
        try:
            resp = self.api.call_api(
                method, url, header_params=headers, _request_timeout=None if stream else 30
            )
        except ApiException as exc:
            raise explain(exc.status or 0, exc.body, target, f"GET {RESOURCE}/{sub}") from None
        except Exception as exc:  # urllib3's connection errors
            raise OutputError(f"cannot reach the apiserver: {exc}") from exc
        if not 200 <= resp.status <= 299:
            raise explain(resp.status, resp.response.data, target, f"GET {RESOURCE}/{sub}")
        return resp.response

    def get_json(self, target: Target, sub: str, **query: str) -> dict[str, Any]:
        resp = self._get(target, sub, list(query.items()))
        data: dict[str, Any] = json.loads(resp.data)
        return data

    def probe(self, target: Target) -> dict[str, Any]:
        """The TraceProbe object itself (tracekeeper.dev)."""
        try:
            obj = client.CustomObjectsApi(self.api).get_namespaced_custom_object(
                GROUP, VERSION, target.namespace, "traceprobes", target.name
            )
        except ApiException as exc:
            if exc.status == 404:
                raise OutputError(
                    f"traceprobe {target.namespace}/{target.name} not found "
                    f"(namespace {target.namespace})"
                ) from None
            raise explain(exc.status or 0, exc.body, target, "GET traceprobes") from None
        return cast(dict[str, Any], obj)

    def records(self, target: Target, deadline_wait: float | None) -> Iterator[dict[str, Any]]:
        """The merged stream's records. Iteration yields {} each `deadline_wait` seconds
        without a record (so a caller can stop at its deadline); None: block."""
        resp = self._get(target, "log", [("follow", "true")], stream=True)
        lines: queue.Queue[bytes | None] = queue.Queue(1024)

        def read() -> None:
            pending = b""
            try:
                for chunk in resp.stream(64 * 1024, decode_content=True):
                    pending += chunk
                    *complete, pending = pending.split(b"\n")
                    for line in complete:
                        if line.strip():
                            lines.put(line)
            except Exception:  # the connection closed under us: the stream ends
                pass
            lines.put(None)

        reader = threading.Thread(target=read, name="tail", daemon=True)
        reader.start()
        try:
            while True:
                try:
                    line = lines.get(timeout=deadline_wait)
                except queue.Empty:
                    yield {}
                    continue
                if line is None:
                    return
                record = json.loads(line)
                if isinstance(record, dict):
                    yield record
        finally:
            # shutdown first: close() alone waits for the reader thread's blocked read (a
            # quiet stream kept `tail --for` from ever ending); shutdown ends that read.
            resp.shutdown()
            resp.close()
