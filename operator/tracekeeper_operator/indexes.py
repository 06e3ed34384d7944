"""kopf indexes of everything a render pass reads, and the snapshot taken from them.

kopf fills every index from a full listing before any other handler runs, so the first
handler call means the indexes are complete: a restarted operator never pushes a state
rendered from half a cluster (which would unload probes on agents).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import kopf

from tracekeeper_api import GROUP, VERSION
from tracekeeper_operator.cluster_view import ClusterView, ViewBuilder
from tracekeeper_operator.records import (
    AgentRecord,
    AgentTrust,
    FilterRecord,
    LabelledRecord,
    PodRecord,
    ProbeRecord,
    agent_record,
    filter_record,
    labelled_record,
    pod_record,
    probe_record,
)
from tracekeeper_operator.settings import OperatorSettings

PODS = "tk_pods"
AGENTS = "tk_agents"
NODES = "tk_nodes"
NAMESPACES = "tk_namespaces"
PROBES = "tk_probes"
FILTERS = "tk_filters"
INDEX_IDS = (PODS, AGENTS, NODES, NAMESPACES, PROBES, FILTERS)


def register_indexes(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    @kopf.index("v1", "pods", id=PODS, registry=registry)
    def tk_pods(*, body: kopf.Body, **_: Any) -> dict[str, PodRecord] | None:
        record = pod_record(body)
        return {record.namespace: record} if record else None

    trust = AgentTrust(
        namespace=settings.namespace,
        daemonset=settings.agent_daemonset,
        port_name=settings.agent_port_name,
        endpoint_annotation=settings.trust_endpoint_annotation,
    )

    # The labels only narrow the watch; agent_record decides (namespace, owning DaemonSet).
    @kopf.index("v1", "pods", id=AGENTS, labels=dict(settings.agent_labels), registry=registry)
    def tk_agents(*, body: kopf.Body, **_: Any) -> dict[str, AgentRecord] | None:
        record = agent_record(body, trust)
        return {record.node: record} if record else None

    if settings.read_nodes:

        @kopf.index("v1", "nodes", id=NODES, registry=registry)
        def tk_nodes(*, body: kopf.Body, **_: Any) -> dict[str, LabelledRecord] | None:
            record = labelled_record(body)
            return {record.name: record} if record else None

    @kopf.index("v1", "namespaces", id=NAMESPACES, registry=registry)
    def tk_namespaces(*, body: kopf.Body, **_: Any) -> dict[str, LabelledRecord] | None:
        record = labelled_record(body)
        return {record.name: record} if record else None

    @kopf.index(GROUP, VERSION, "traceprobes", id=PROBES, registry=registry)
    def tk_probes(*, body: kopf.Body, **_: Any) -> dict[str, ProbeRecord] | None:
        record = probe_record(body)
        return {record.id: record} if record else None

    @kopf.index(GROUP, VERSION, "tracefilters", id=FILTERS, registry=registry)
    def tk_filters(*, body: kopf.Body, **_: Any) -> dict[str, FilterRecord] | None:
        record = filter_record(body)
        return {record.ref.key: record} if record else None


def _values(index: Any) -> Iterator[Any]:
    # kopf.Index: key -> Store (a collection of the values objects contributed under it).
    for store in list(index.values()):
        yield from list(store)


class Snapshots:
    """Snapshots pass after pass that keep unchanged parts as the same objects (see
    `cluster_view.ViewBuilder`); each equals `snapshot` of the same indexes."""

    def __init__(self) -> None:
        self._builder = ViewBuilder()

    def take(self, indices: Mapping[str, Any]) -> ClusterView:
        nodes = indices.get(NODES)
        return self._builder.build(
            pods={ns: list(store) for ns, store in list(indices[PODS].items())},
            agents=_listed(indices[AGENTS]),
            nodes=None if nodes is None else _listed(nodes),
            namespaces=_listed(indices[NAMESPACES]),
            probes=_listed(indices[PROBES]),
            filters=_listed(indices[FILTERS]),
        )


def _listed(index: Any) -> list[Any]:
    """`_values` as a list (without a generator's cost per value: this runs every pass).
    No copy of each store first: kopf changes indexes on this same event loop, never
    while a synchronous pass reads them."""
    return [value for store in index.values() for value in store]


def snapshot(indices: Mapping[str, Any]) -> ClusterView:
    """The indexes as they are now (kopf passes them to handlers under their ids)."""
    nodes = indices.get(NODES)
    return ClusterView.build(
        pods=_values(indices[PODS]),
        agents=_values(indices[AGENTS]),
        nodes=None if nodes is None else _values(nodes),
        namespaces=_values(indices[NAMESPACES]),
        probes=_values(indices[PROBES]),
        filters=_values(indices[FILTERS]),
    )
