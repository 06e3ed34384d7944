"""kopf indexes -> the snapshot a render pass reads (kopf.Index is key -> collection)."""

from __future__ import annotations

from tracekeeper_operator.indexes import (
    AGENTS,
    FILTERS,
    NAMESPACES,
    NODES,
    PODS,
    PROBES,
    snapshot,
)
from tracekeeper_operator.records import AgentRecord, LabelledRecord, PodRecord


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
