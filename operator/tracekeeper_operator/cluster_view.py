"""A consistent snapshot of what the operator knows of the cluster, for one render pass."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

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


_T = TypeVar("_T")


def _kept(new: _T, old: _T | None) -> _T:
    """`old` when it equals `new`: the previous pass's object, so that work remembered by
    what it was computed from finds its inputs unchanged by identity, not only by value."""
    return old if old is not None and (old is new or old == new) else new


class _Parts(NamedTuple):
    agents: list[AgentRecord]
    nodes: list[LabelledRecord] | None
    namespaces: list[LabelledRecord]
    probes: list[ProbeRecord]
    filters: list[FilterRecord]


class ViewBuilder:
    """`ClusterView.build` pass after pass, keeping every part equal to the previous view's
    as the previous object (each namespace's pod tuple on its own): a pod event makes one
    namespace's tuple new and leaves the others, and the probes reading them, as they were.
    Parts are compared by value (by identity first), never assumed unchanged."""

    def __init__(self) -> None:
        self._last: ClusterView | None = None
        self._listed: dict[str, tuple[list[PodRecord], tuple[PodRecord, ...]]] = {}
        self._rest: tuple[_Parts, ClusterView] | None = None

    def build(
        self,
        *,
        pods: Mapping[str, Iterable[PodRecord]],
        agents: Iterable[AgentRecord] = (),
        nodes: Iterable[LabelledRecord] | None = (),
        namespaces: Iterable[LabelledRecord] = (),
        probes: Iterable[ProbeRecord] = (),
        filters: Iterable[FilterRecord] = (),
    ) -> ClusterView:
        """`pods`: namespace -> its pods (kopf's pod index: each pod under its namespace),
        in any order."""
        parts = _Parts(
            list(agents),
            None if nodes is None else list(nodes),
            list(namespaces),
            list(probes),
            list(filters),
        )
        if self._rest is not None and self._rest[0] == parts:
            rest = self._rest[1]  # the same records (by identity first): the same parts
        else:
            rest = ClusterView.build(
                agents=parts.agents,
                nodes=parts.nodes,
                namespaces=parts.namespaces,
                probes=parts.probes,
                filters=parts.filters,
            )
            self._rest = (parts, rest)
        listed: dict[str, tuple[list[PodRecord], tuple[PodRecord, ...]]] = {}
        for ns, records in pods.items():
            members = list(records)
            if not members:
                continue
            kept = self._listed.get(ns)
            if kept is None or kept[0] != members:
                kept = (members, tuple(sorted(members, key=lambda p: p.name)))
            listed[ns] = kept
        self._listed = listed
        last = self._last
        view = ClusterView(
            pods_by_namespace=_kept(
                {ns: sorted_pods for ns, (_, sorted_pods) in listed.items()},
                last.pods_by_namespace if last else None,
            ),
            agents=_kept(rest.agents, last.agents if last else None),
            node_labels=rest.node_labels
            if rest.node_labels is None
            else _kept(rest.node_labels, last.node_labels if last else None),
            namespace_labels=_kept(rest.namespace_labels, last.namespace_labels if last else None),
            namespace_annotations=_kept(
                rest.namespace_annotations, last.namespace_annotations if last else None
            ),
            probes=_kept(rest.probes, last.probes if last else None),
            filters=_kept(rest.filters, last.filters if last else None),
        )
        self._last = view
        return view


_K = TypeVar("_K")


def _changed_keys(before: Mapping[_K, object], after: Mapping[_K, object]) -> frozenset[_K]:
    """Keys added, removed, or whose value is another object than before."""
    if before is after:
        return frozenset()
    gone = before.keys() - after.keys()
    return frozenset([k for k, v in after.items() if before.get(k) is not v]).union(gone)


@dataclass(frozen=True)
class ViewChanges:
    """What differs between two views, by identity (a `ViewBuilder` keeps equal parts as the
    same objects, so this is exact for its views; a view built from nothing shows every part
    changed). `everything`: a part that every probe may read changed (or no view before),
    and the pieces below are not to be relied on."""

    everything: bool
    pod_namespaces: frozenset[str] = frozenset()
    probes: frozenset[str] = frozenset()
    filters: frozenset[str] = frozenset()


def changes_between(before: ClusterView | None, after: ClusterView) -> ViewChanges:
    if before is None or not (
        before.agents is after.agents
        and before.node_labels is after.node_labels
        and before.namespace_labels is after.namespace_labels
        and before.namespace_annotations is after.namespace_annotations
    ):
        return ViewChanges(everything=True)
    return ViewChanges(
        everything=False,
        pod_namespaces=_changed_keys(before.pods_by_namespace, after.pods_by_namespace),
        probes=_changed_keys(before.probes, after.probes),
        filters=_changed_keys(before.filters, after.filters),
    )
