"""A consistent snapshot of what the operator knows of the cluster, for one render pass."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tracekeeper_operator.records import (
    AgentRecord,
    FilterRecord,
    LabelledRecord,
    PodRecord,
    ProbeRecord,
    best_agent,
)


@dataclass(frozen=True)
class ClusterView:
    pods_by_namespace: Mapping[str, tuple[PodRecord, ...]] = field(default_factory=dict)
    agents: Mapping[str, AgentRecord] = field(default_factory=dict)
    """node -> the agent that serves it."""
    node_labels: Mapping[str, Mapping[str, str]] | None = field(default_factory=dict)
    """node -> labels; None when the operator may not read Node objects."""
    namespace_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    namespace_annotations: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """namespace -> its tracekeeper.dev/ annotations (budget overrides)."""
    probes: Mapping[str, ProbeRecord] = field(default_factory=dict)
    """namespace/name -> probe."""
    filters: Mapping[str, FilterRecord] = field(default_factory=dict)
    """namespace/name -> filter."""

    def pods(self, namespace: str) -> tuple[PodRecord, ...]:
        return self.pods_by_namespace.get(namespace, ())

    @classmethod
    def build(
        cls,
        *,
        pods: Iterable[PodRecord] = (),
        agents: Iterable[AgentRecord] = (),
        nodes: Iterable[LabelledRecord] | None = (),
        namespaces: Iterable[LabelledRecord] = (),
        probes: Iterable[ProbeRecord] = (),
        filters: Iterable[FilterRecord] = (),
    ) -> ClusterView:
        namespaces = list(namespaces)
        by_ns: dict[str, list[PodRecord]] = {}
        for pod in pods:
            by_ns.setdefault(pod.namespace, []).append(pod)
        node_labels = None if nodes is None else {n.name: n.labels for n in nodes}
        by_node: dict[str, list[AgentRecord]] = {}
        for agent in agents:
            # A pod bound to a node that does not exist serves nothing (when Nodes are read).
            if node_labels is None or agent.node in node_labels:
                by_node.setdefault(agent.node, []).append(agent)
        chosen = {node: best_agent(candidates) for node, candidates in by_node.items()}
        return cls(
            pods_by_namespace={
                ns: tuple(sorted(ps, key=lambda p: p.name)) for ns, ps in by_ns.items()
            },
            agents={node: a for node, a in sorted(chosen.items()) if a is not None},
            node_labels=node_labels,
            namespace_labels={n.name: n.labels for n in namespaces},
            namespace_annotations={n.name: n.annotations for n in namespaces if n.annotations},
            probes={p.id: p for p in sorted(probes, key=lambda p: p.id)},
            filters={f.ref.key: f for f in sorted(filters, key=lambda f: f.ref.key)},
        )
