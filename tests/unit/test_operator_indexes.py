"""kopf indexes -> the snapshot a render pass reads (kopf.Index is key -> collection)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import kopf

from tracekeeper_operator.indexes import (
    AGENTS,
    FILTERS,
    NAMESPACES,
    NODES,
    PODS,
    PROBES,
    register_indexes,
    snapshot,
)
from tracekeeper_operator.records import AgentRecord, LabelledRecord, PodRecord
from tracekeeper_operator.settings import OperatorSettings


def test_snapshot_reads_every_index_and_knows_when_nodes_are_not_watched() -> None:
    pod = PodRecord("team-a", "web-0", "u1", "n1", {"app": "web"}, "Running")
    agent = AgentRecord("n1", "tk/agent-n1", "http://n1:9440", ready=True)
    indices = {
        PODS: {"team-a": [pod]},
        AGENTS: {"n1": [agent]},
        NODES: {"n1": [LabelledRecord("n1", {"zone": "z1"})]},
        NAMESPACES: {"team-a": [LabelledRecord("team-a")]},
        PROBES: {},
        FILTERS: {},
    }
    view = snapshot(indices)
    assert view.pods("team-a") == (pod,) and view.agents == {"n1": agent}
    assert view.node_labels == {"n1": {"zone": "z1"}}
    del indices[NODES]  # the operator may not read Node objects
    assert snapshot(indices).node_labels is None


def _agents_index(settings: OperatorSettings) -> Callable[..., Any]:
    registry = kopf.OperatorRegistry()
    register_indexes(registry, settings)
    (handler,) = [h for h in registry._indexing.get_all_handlers() if h.id == AGENTS]
    return handler.fn


def _agent_pod(namespace: str) -> dict[str, Any]:
    owner = {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "agents", "controller": True}
    return {
        "metadata": {
            "namespace": namespace,
            "name": "agent-x",
            "labels": {"app.kubernetes.io/name": "tracekeeper-agent"},
            "ownerReferences": [owner],
            "annotations": {"tracekeeper.dev/agent-endpoint": "http://127.0.0.1:1"},
        },
        "spec": {
            "nodeName": "n1",
            "containers": [{"ports": [{"name": "api", "containerPort": 9}]}],
        },
        "status": {"podIP": "10.0.0.9"},
    }


def test_the_agent_index_trusts_the_settings_namespace_and_daemonset_only() -> None:
    settings = OperatorSettings(namespace="ops", agent_daemonset="agents")
    index = _agents_index(settings)
    assert index(body=_agent_pod("team-a")) is None
    (record,) = index(body=_agent_pod("ops")).values()
    assert record.endpoint == "http://10.0.0.9:9"  # the annotation is not trusted by default
    trusting = _agents_index(dataclasses.replace(settings, trust_endpoint_annotation=True))
    (record,) = trusting(body=_agent_pod("ops")).values()
    assert record.endpoint == "http://127.0.0.1:1"
    assert (
        _agents_index(dataclasses.replace(settings, agent_daemonset="other"))(
            body=_agent_pod("ops")
        )
        is None
    )
