"""Whom a TraceProbe traces: its filter resolved to pods and containers, per node.

Outside the privileged namespaces only pods of the probe's own namespace can ever match,
whatever the selector says, and privileged fields are refused (the admission policy should
have refused them already; this is the second line). No filter means every pod of the
namespace, never the host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tracekeeper_api.filters import TraceFilterSpec
from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.protocol import (
    MAX_CONTAINERS_PER_POD,
    MAX_PODS_PER_PROBE,
    ContainerTarget,
    PodTarget,
    ProbeTargets,
)
from tracekeeper_api.reasons import RefusalReason
from tracekeeper_operator.cluster_view import ClusterView
from tracekeeper_operator.records import ContainerRecord, PodRecord, ProbeRecord
from tracekeeper_operator.settings import OperatorSettings

NODES_UNREADABLE = (
    "nodeSelector cannot be evaluated: this operator may not read Node objects, "
    "so no node is selected"
)


@dataclass(frozen=True)
class Refusal:
    """The probe is not loaded anywhere, and why (an Accepted=False condition)."""

    reason: RefusalReason
    message: str


@dataclass(frozen=True)
class Selected:
    """The probe's targets on each node it goes to (nodes without targets are left out)."""

    targets: Mapping[str, ProbeTargets] = field(default_factory=dict)
    pods: int = 0
    containers: int = 0
    note: str = ""
    """Why fewer nodes than expected may be selected (shown in status messages)."""

    @property
    def nodes(self) -> list[str]:
        return sorted(self.targets)


Selection = Selected | Refusal


def resolve_filter(probe: ProbeRecord, view: ClusterView) -> TraceFilterSpec | Refusal:
    spec = probe.spec
    assert spec is not None
    if spec.filter_ref is not None:
        ref = view.filters.get(f"{probe.ref.namespace}/{spec.filter_ref}")
        if ref is None or ref.deleting:
            return Refusal(
                "FilterNotFound",
                f"TraceFilter {spec.filter_ref!r} does not exist in namespace "
                f"{probe.ref.namespace!r}",
            )
        if ref.spec is None:
            return Refusal(
                "InvalidSpec", f"TraceFilter {spec.filter_ref!r} is invalid: {ref.invalid}"
            )
        return ref.spec
    return spec.filter if spec.filter is not None else TraceFilterSpec()


def refuse_privileged(
    namespace: str,
    spec: TraceProbeSpec | None,
    filt: TraceFilterSpec | None,
    settings: OperatorSettings,
    *,
    filter_name: str | None = None,
) -> Refusal | None:
    """NotPermitted when the object uses what its namespace may not."""
    privileged = settings.is_privileged(namespace)
    where = ", ".join(sorted(settings.privileged)) or "(none)"
    if spec is not None and spec.program is not None:
        if not privileged:
            return Refusal(
                "NotPermitted",
                f"program (raw BCC source) is privileged: only allowed in the privileged "
                f"namespaces ({where}), not in {namespace!r}",
            )
        if not settings.allow_raw_programs:
            return Refusal(
                "NotPermitted",
                "program (raw BCC source) is disabled: the operator runs without "
                "--allow-raw-programs",
            )
    if spec is not None and not privileged and (why := settings.tenant_rules.refusal(spec)):
        return Refusal(
            "NotPermitted", f"{why}; only the privileged namespaces ({where}), not {namespace!r}"
        )
    if filt is not None and not privileged and (fields := filt.privileged_fields()):
        owner = f"TraceFilter {filter_name!r}" if filter_name else "the filter"
        return Refusal(
            "NotPermitted",
            f"{owner} uses privileged field(s) {', '.join(fields)}: only allowed in the "
            f"privileged namespaces ({where}), not in {namespace!r}",
        )
    return None


def candidate_namespaces(
    namespace: str, filt: TraceFilterSpec, view: ClusterView, settings: OperatorSettings
) -> list[str]:
    """Namespaces whose pods the filter may select. Only a privileged object's
    namespaceSelector reaches beyond its own namespace."""
    if filt.namespace_selector is None or not settings.is_privileged(namespace):
        return [namespace]
    selector = filt.namespace_selector
    return sorted(ns for ns, labels in view.namespace_labels.items() if selector.matches(labels))


def matching_pods(
    namespace: str, filt: TraceFilterSpec, view: ClusterView, settings: OperatorSettings
) -> list[PodRecord]:
    """Traceable pods the filter selects (before node selection and container names)."""
    if not filt.targets_pods:
        return []
    selector = filt.pod_selector
    return [
        pod
        for ns in candidate_namespaces(namespace, filt, view, settings)
        for pod in view.pods(ns)
        # The namespace check is redundant with pods(ns) by construction; it is the
        # isolation guarantee, so it is stated where the targets are made.
        if pod.namespace == ns
        and pod.traceable
        and (selector is None or selector.matches(pod.labels))
    ]


def _containers(pod: PodRecord, filt: TraceFilterSpec) -> tuple[ContainerRecord, ...]:
    """The pod's containers the filter selects. Only the first MAX_CONTAINERS_PER_POD
    exist for tracing, whatever the filter names, so that every probe sees the same
    containers of a pod (the node's pod table)."""
    containers = pod.containers[:MAX_CONTAINERS_PER_POD]
    if filt.containers:
        wanted = set(filt.containers)
        containers = tuple(c for c in containers if c.name in wanted)
    return containers


def targets_pod(pod: PodRecord, filt: TraceFilterSpec) -> bool:
    """Whether `pod_target` makes a target of the pod (what counting needs, without it)."""
    return not filt.containers or bool(_containers(pod, filt))


def pod_target(pod: PodRecord, filt: TraceFilterSpec) -> PodTarget | None:
    """The pod as a target, or None when none of its containers is selected."""
    containers = _containers(pod, filt)
    if filt.containers and not containers:
        return None
    return PodTarget(
        uid=pod.uid,
        namespace=pod.namespace,
        name=pod.name,
        all_containers=not filt.containers,
        containers=[ContainerTarget(name=c.name, container_id=c.container_id) for c in containers],
    )


def node_selected(node: str, node_selector: Mapping[str, str], view: ClusterView) -> bool:
    if not node_selector:
        return True
    if view.node_labels is None:
        return False
    labels = view.node_labels.get(node, {})
    return all(labels.get(k) == v for k, v in node_selector.items())


def select(probe: ProbeRecord, view: ClusterView, settings: OperatorSettings) -> Selection:
    """The probe's targets per node, or why it is not loaded at all. Suspended probes are
    selected like the others: the caller leaves them out of the desired state."""
    spec = probe.spec
    if spec is None:
        return Refusal("InvalidSpec", probe.invalid or "the spec does not validate")
    filt = resolve_filter(probe, view)
    if isinstance(filt, Refusal):
        return filt
    refusal = refuse_privileged(
        probe.ref.namespace, spec, filt, settings, filter_name=spec.filter_ref
    )
    if refusal is not None:
        return refusal

    def eligible(node: str) -> bool:
        return node_selected(node, spec.node_selector, view)

    pods_by_node: dict[str, list[PodTarget]] = {}
    pods = containers = 0
    for pod in matching_pods(probe.ref.namespace, filt, view, settings):
        assert pod.node is not None  # traceable
        if not eligible(pod.node):
            continue
        target = pod_target(pod, filt)
        if target is None:
            continue
        pods_by_node.setdefault(pod.node, []).append(target)
        pods += 1
        containers += len(target.containers)
    host_targets = bool(filt.pids or filt.cgroup_paths or filt.host_wide)
    nodes = set(pods_by_node)
    if host_targets:  # host PIDs and cgroup paths are node-local: every selected node
        nodes |= {node for node in view.agents if eligible(node)}
    for node, node_pods in pods_by_node.items():
        if len(node_pods) > MAX_PODS_PER_PROBE:
            return Refusal(
                "InvalidSpec",
                f"the filter selects {len(node_pods)} pods on node {node}; at most "
                f"{MAX_PODS_PER_PROBE} per node: narrow the podSelector",
            )
    targets = {
        node: ProbeTargets(
            pods=pods_by_node.get(node, []),
            process_names=list(filt.process_names),
            pids=list(filt.pids),
            follow_children=filt.follow_children,
            cgroup_paths=list(filt.cgroup_paths),
            host_wide=filt.host_wide,
        )
        for node in sorted(nodes)
    }
    note = NODES_UNREADABLE if spec.node_selector and view.node_labels is None else ""
    return Selected(targets=targets, pods=pods, containers=containers, note=note)
