"""Bodies -> records: pods with container ids, agent endpoints, probes that do not validate."""

from __future__ import annotations

from tracekeeper_operator.cluster_view import ClusterView
from tracekeeper_operator.records import (
    AgentRecord,
    agent_record,
    filter_record,
    pod_record,
    probe_record,
)
from tracekeeper_operator.settings import parse_label_selector

POD = {
    "metadata": {"name": "web-0", "namespace": "team-a", "uid": "u-1", "labels": {"app": "web"}},
    "spec": {
        "nodeName": "node-a",
        "initContainers": [{"name": "init"}],
        "containers": [
            {"name": "app", "ports": [{"name": "api", "containerPort": 9443}]},
            {"name": "sidecar"},
        ],
    },
    "status": {
        "phase": "Running",
        "podIP": "10.0.0.7",
        "containerStatuses": [{"name": "app", "containerID": "containerd://abc"}],
        "initContainerStatuses": [{"name": "init", "containerID": "containerd://def"}],
    },
}


def test_pod_record_pairs_container_names_with_their_ids() -> None:
    rec = pod_record(POD)
    assert rec is not None and rec.traceable
    assert [(c.name, c.container_id) for c in rec.containers] == [
        ("init", "containerd://def"),
        ("app", "containerd://abc"),
        ("sidecar", None),
    ]
    assert rec.labels == {"app": "web"} and rec.node == "node-a"


def test_agent_endpoint_from_the_named_port_or_the_annotation() -> None:
    rec = agent_record(POD, "api")
    assert rec is not None and rec.endpoint == "http://10.0.0.7:9443"
    assert agent_record(POD, "nope") == AgentRecord("node-a", "team-a/web-0", None)
    annotated = {
        **POD,
        "metadata": {
            **POD["metadata"],  # type: ignore[dict-item]
            "annotations": {"tracekeeper.dev/agent-endpoint": "http://127.0.0.1:7000/"},
        },
    }
    rec = agent_record(annotated, "api")
    assert rec is not None and rec.endpoint == "http://127.0.0.1:7000"


def test_unbound_or_deleting_agent_pods_serve_no_node() -> None:
    assert agent_record({**POD, "spec": {}}, "api") is None
    deleting = {**POD, "metadata": {**POD["metadata"], "deletionTimestamp": "x"}}  # type: ignore[dict-item]
    assert agent_record(deleting, "api") is None


def test_one_agent_per_node_prefers_a_ready_newer_pod() -> None:
    old = AgentRecord("n", "ns/old", "http://a:1", ready=True, created="2024-01-01T00:00:00Z")
    new = AgentRecord("n", "ns/new", "http://b:1", ready=True, created="2024-02-01T00:00:00Z")
    starting = AgentRecord("n", "ns/starting", "http://c:1", ready=False, created="2025-01-01")
    no_ip = AgentRecord("m", "ns/x", None)
    view = ClusterView.build(agents=[old, starting, new, no_ip])
    assert view.agents == {"n": new}


def test_probe_record_keeps_an_invalid_spec_as_a_message() -> None:
    body = {
        "metadata": {"name": "p", "namespace": "team-a", "uid": "u", "generation": 4},
        "spec": {"tracepoint": "syscalls:sys_enter_openat", "kprobe": {"function": "x"}},
    }
    rec = probe_record(body)
    assert rec is not None and rec.spec is None and rec.generation == 4
    assert "exactly one attach point" in rec.invalid


def test_unreadable_status_is_dropped_not_fatal() -> None:
    body = {
        "metadata": {
            "name": "f",
            "namespace": "team-a",
            "uid": "u",
            "deletionTimestamp": "2024-01-01T00:00:00Z",
        },
        "spec": {},
        "status": {"matchedPods": "many"},
    }
    rec = filter_record(body)
    assert rec is not None and rec.status is None and rec.deleting and rec.spec is not None


def test_agent_selector_parsing() -> None:
    assert parse_label_selector("a=b, c=d") == {"a": "b", "c": "d"}
    for bad in ("", "a", "a==b", "=b"):
        try:
            parse_label_selector(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was accepted")
