"""What the operator keeps of each watched object: small frozen records parsed from bodies.

Raw Kubernetes payloads are typed at this edge only; everything past it works on records,
so that the indexes hold a few hundred bytes per pod rather than whole bodies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar, cast

from pydantic import ValidationError

from tracekeeper_api.filters import TraceFilterSpec
from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.resources import format_errors
from tracekeeper_api.status import TraceFilterStatus, TraceProbeStatus
from tracekeeper_operator.settings import AGENT_ENDPOINT_ANNOTATION

Body = Mapping[str, Any]


class _ContainerPort(TypedDict, total=False):
    name: str
    containerPort: int


class _Container(TypedDict, total=False):
    name: str
    ports: list[_ContainerPort]


class _ContainerStatus(TypedDict, total=False):
    name: str
    containerID: str


class _PodCondition(TypedDict, total=False):
    type: str
    status: str


class _PodSpec(TypedDict, total=False):
    nodeName: str
    containers: list[_Container]
    initContainers: list[_Container]


class _PodStatus(TypedDict, total=False):
    phase: str
    podIP: str
    conditions: list[_PodCondition]
    containerStatuses: list[_ContainerStatus]
    initContainerStatuses: list[_ContainerStatus]


class _OwnerReference(TypedDict, total=False):
    apiVersion: str
    kind: str
    name: str
    controller: bool


class _Metadata(TypedDict, total=False):
    name: str
    namespace: str
    uid: str
    generation: int
    labels: dict[str, str]
    annotations: dict[str, str]
    creationTimestamp: str
    deletionTimestamp: str
    ownerReferences: list[_OwnerReference]


def _meta(body: Body) -> _Metadata:
    return cast(_Metadata, body.get("metadata") or {})


TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class ContainerRecord:
    name: str
    container_id: str | None = None
    """runtime://id from the pod status; None until the container started."""


@dataclass(frozen=True)
class PodRecord:
    namespace: str
    name: str
    uid: str
    node: str | None
    labels: Mapping[str, str] = field(default_factory=dict)
    phase: str = ""
    containers: tuple[ContainerRecord, ...] = ()

    @property
    def traceable(self) -> bool:
        """Bound to a node and not finished: its processes may run (or start) there."""
        return bool(self.node) and self.phase not in TERMINAL_PHASES


def pod_record(body: Body) -> PodRecord | None:
    meta = _meta(body)
    spec = cast(_PodSpec, body.get("spec") or {})
    status = cast(_PodStatus, body.get("status") or {})
    if not meta.get("uid") or not meta.get("name") or not meta.get("namespace"):
        return None
    ids = {
        s.get("name", ""): s.get("containerID") or None
        for s in [*status.get("initContainerStatuses", []), *status.get("containerStatuses", [])]
    }
    names = [
        c.get("name", "") for c in [*spec.get("initContainers", []), *spec.get("containers", [])]
    ]
    return PodRecord(
        namespace=meta["namespace"],
        name=meta["name"],
        uid=meta["uid"],
        node=spec.get("nodeName") or None,
        labels=dict(meta.get("labels") or {}),
        phase=status.get("phase", ""),
        containers=tuple(ContainerRecord(n, ids.get(n)) for n in names if n),
    )


@dataclass(frozen=True)
class AgentRecord:
    """An agent pod: where the agent of its node listens."""

    node: str
    pod: str
    endpoint: str | None
    """Base URL (http://ip:port), None while the pod has no IP yet."""
    ready: bool = False
    created: str = ""


@dataclass(frozen=True)
class AgentTrust:
    """Which pods are agents: what the operator's own install controls, nothing a tenant
    can imitate by copying labels."""

    namespace: str
    daemonset: str
    port_name: str
    endpoint_annotation: bool = False


def _controlled_by(meta: _Metadata, kind: str, name: str) -> bool:
    return any(
        ref.get("controller") is True
        and ref.get("kind") == kind
        and ref.get("name") == name
        and str(ref.get("apiVersion", "")).startswith("apps/")
        for ref in meta.get("ownerReferences") or []
    )


def agent_record(body: Body, trust: AgentTrust) -> AgentRecord | None:
    """The pod as its node's agent, or None unless it is one: in the operator's namespace,
    controlled by the agent DaemonSet, bound, not finished, not being deleted. The endpoint
    is the pod IP and its `port_name` containerPort (the annotation only when trusted)."""
    meta = _meta(body)
    spec = cast(_PodSpec, body.get("spec") or {})
    status = cast(_PodStatus, body.get("status") or {})
    node = spec.get("nodeName")
    if meta.get("namespace") != trust.namespace or not _controlled_by(
        meta, "DaemonSet", trust.daemonset
    ):
        return None
    if not node or status.get("phase") in TERMINAL_PHASES or meta.get("deletionTimestamp"):
        return None
    endpoint = None
    if trust.endpoint_annotation:
        endpoint = (meta.get("annotations") or {}).get(AGENT_ENDPOINT_ANNOTATION)
    if not endpoint:
        endpoint = _pod_endpoint(spec, status, trust.port_name)
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", [])
    )
    return AgentRecord(
        node=node,
        pod=f"{meta.get('namespace', '')}/{meta.get('name', '')}",
        endpoint=endpoint.rstrip("/") if endpoint else None,
        ready=ready,
        created=meta.get("creationTimestamp", ""),
    )


def _pod_endpoint(spec: _PodSpec, status: _PodStatus, port_name: str) -> str | None:
    ip = status.get("podIP")
    if not ip:
        return None
    for container in spec.get("containers", []):
        for port in container.get("ports", []):
            if port.get("name") == port_name and port.get("containerPort"):
                host = f"[{ip}]" if ":" in ip else ip
                return f"http://{host}:{port['containerPort']}"
    return None


def best_agent(candidates: list[AgentRecord]) -> AgentRecord | None:
    """One agent per node; during a rollout prefer a reachable, ready, newer pod."""
    usable = [a for a in candidates if a.endpoint]
    if not usable:
        return None
    return max(usable, key=lambda a: (a.ready, a.created, a.pod))


@dataclass(frozen=True)
class LabelledRecord:
    """A Node or Namespace: its labels, and its tracekeeper.dev/ annotations (budgets)."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)


def labelled_record(body: Body) -> LabelledRecord | None:
    meta = _meta(body)
    if not meta.get("name"):
        return None
    ours = {
        k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith("tracekeeper.dev/")
    }
    return LabelledRecord(meta["name"], dict(meta.get("labels") or {}), ours)


@dataclass(frozen=True)
class ObjectRef:
    """Enough to patch an object's status and to post an Event about it."""

    kind: str
    namespace: str
    name: str
    uid: str
    api_version: str = "tracekeeper.dev/v1alpha1"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ProbeRecord:
    ref: ObjectRef
    generation: int
    spec: TraceProbeSpec | None
    """None when the stored spec does not validate (admitted before a schema change)."""
    invalid: str = ""
    status: TraceProbeStatus | None = None
    deleting: bool = False
    deletion_timestamp: str = ""
    created: str = ""
    """creationTimestamp: within a namespace over its budget, older probes go first."""

    @property
    def id(self) -> str:
        return self.ref.key

    @property
    def filter_key(self) -> str | None:
        """namespace/name of the TraceFilter its filterRef names (None: no filterRef)."""
        ref = self.spec.filter_ref if self.spec is not None else None
        return f"{self.ref.namespace}/{ref}" if ref is not None else None


@dataclass(frozen=True)
class FilterRecord:
    ref: ObjectRef
    generation: int
    spec: TraceFilterSpec | None
    invalid: str = ""
    status: TraceFilterStatus | None = None
    deleting: bool = False


def _ref(body: Body, kind: str) -> ObjectRef | None:
    meta = _meta(body)
    if not meta.get("name") or not meta.get("namespace"):
        return None
    return ObjectRef(kind, meta["namespace"], meta["name"], meta.get("uid", ""))


_Spec = TypeVar("_Spec", TraceProbeSpec, TraceFilterSpec)
_Status = TypeVar("_Status", TraceProbeStatus, TraceFilterStatus)


def _validated(model: type[_Spec], raw: object) -> tuple[_Spec | None, str]:
    try:
        return model.model_validate(raw), ""
    except ValidationError as exc:
        return None, format_errors(exc).strip()


def _status(model: type[_Status], raw: object) -> _Status | None:
    # A status we cannot read (written by an older operator) is simply rewritten.
    if not raw:
        return None
    try:
        return model.model_validate(raw)
    except ValidationError:
        return None


def probe_record(body: Body) -> ProbeRecord | None:
    ref = _ref(body, "TraceProbe")
    if ref is None:
        return None
    spec, invalid = _validated(TraceProbeSpec, body.get("spec") or {})
    meta = _meta(body)
    return ProbeRecord(
        ref=ref,
        generation=int(meta.get("generation", 0)),
        spec=spec,
        invalid=invalid,
        status=_status(TraceProbeStatus, body.get("status")),
        deleting=bool(meta.get("deletionTimestamp")),
        deletion_timestamp=meta.get("deletionTimestamp", ""),
        created=meta.get("creationTimestamp", ""),
    )


def filter_record(body: Body) -> FilterRecord | None:
    ref = _ref(body, "TraceFilter")
    if ref is None:
        return None
    spec, invalid = _validated(TraceFilterSpec, body.get("spec") or {})
    meta = _meta(body)
    return FilterRecord(
        ref=ref,
        generation=int(meta.get("generation", 0)),
        spec=spec,
        invalid=invalid,
        status=_status(TraceFilterStatus, body.get("status")),
        deleting=bool(meta.get("deletionTimestamp")),
    )
