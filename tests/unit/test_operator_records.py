"""Bodies -> records: pods with container ids, agent endpoints, probes that do not validate."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from tracekeeper_operator.cluster_view import ClusterView
from tracekeeper_operator.records import (
    AgentRecord,
    AgentTrust,
    LabelledRecord,
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


TRUST = AgentTrust(namespace="tk", daemonset="tracekeeper-agent", port_name="api")
DS_OWNER = {
    "apiVersion": "apps/v1",
    "kind": "DaemonSet",
    "name": "tracekeeper-agent",
    "uid": "ds-uid",
    "controller": True,
}


def agent_pod(namespace: str = "tk", owners: list[dict[str, Any]] | None = None,
              **meta: Any) -> dict[str, Any]:  # fmt: skip
    body: dict[str, Any] = copy.deepcopy(POD)
    body["metadata"].update(
        namespace=namespace,
        name="tracekeeper-agent-x1",
        labels={"app.kubernetes.io/name": "tracekeeper-agent"},
        ownerReferences=[DS_OWNER] if owners is None else owners,
        **meta,
    )
    return body


ANNOTATED: dict[str, Any] = {
    "annotations": {"tracekeeper.dev/agent-endpoint": "http://127.0.0.1:7000/"}
}


def test_an_agent_is_reached_at_its_pod_ip_and_named_port() -> None:
    rec = agent_record(agent_pod(), TRUST)
    assert rec == AgentRecord("node-a", "tk/tracekeeper-agent-x1", "http://10.0.0.7:9443")
    no_port = dataclasses.replace(TRUST, port_name="nope")
    assert agent_record(agent_pod(), no_port) == AgentRecord(
        "node-a", "tk/tracekeeper-agent-x1", None
    )


def test_the_endpoint_annotation_counts_only_when_the_operator_trusts_it() -> None:
    rec = agent_record(agent_pod(**ANNOTATED), TRUST)
    assert rec is not None and rec.endpoint == "http://10.0.0.7:9443"
    trusting = dataclasses.replace(TRUST, endpoint_annotation=True)
    rec = agent_record(agent_pod(**ANNOTATED), trusting)
    assert rec is not None and rec.endpoint == "http://127.0.0.1:7000"


@pytest.mark.parametrize(
    ("namespace", "owners"),
    [
        ("team-a", None),  # agent labels and even the DaemonSet's ownerReference, elsewhere
        ("tk", []),  # a bare pod in the operator's namespace
        ("tk", [{**DS_OWNER, "name": "impostor"}]),
        ("tk", [{**DS_OWNER, "kind": "ReplicaSet"}]),
        ("tk", [{**DS_OWNER, "controller": False}]),
        ("tk", [{**DS_OWNER, "apiVersion": "example.com/v1"}]),
    ],
    ids=["tenant-namespace", "no-owner", "other-daemonset", "not-a-daemonset",
         "not-controller", "other-group"],
)  # fmt: skip
def test_only_pods_of_the_agent_daemonset_in_the_operator_namespace_are_agents(
    namespace: str, owners: list[dict[str, Any]] | None
) -> None:
    trusting = dataclasses.replace(TRUST, endpoint_annotation=True)
    assert agent_record(agent_pod(namespace, owners, **ANNOTATED), trusting) is None


def test_unbound_or_deleting_agent_pods_serve_no_node() -> None:
    unbound = agent_pod()
    unbound["spec"] = {}
    assert agent_record(unbound, TRUST) is None
    assert agent_record(agent_pod(deletionTimestamp="x"), TRUST) is None


def test_one_agent_per_node_prefers_a_ready_newer_pod() -> None:
    old = AgentRecord("n", "ns/old", "http://a:1", ready=True, created="2024-01-01T00:00:00Z")
    new = AgentRecord("n", "ns/new", "http://b:1", ready=True, created="2024-02-01T00:00:00Z")
    starting = AgentRecord("n", "ns/starting", "http://c:1", ready=False, created="2025-01-01")
    no_ip = AgentRecord("m", "ns/x", None)
    view = ClusterView.build(
        agents=[old, starting, new, no_ip], nodes=[LabelledRecord("n"), LabelledRecord("m")]
    )
    assert view.agents == {"n": new}


def test_an_agent_bound_to_a_node_that_does_not_exist_serves_nothing() -> None:
    real = AgentRecord("n", "tk/a", "http://a:1", ready=True)
    ghost = AgentRecord("ghost", "tk/g", "http://g:1", ready=True)
    assert ClusterView.build(agents=[real, ghost], nodes=[LabelledRecord("n")]).agents == {
        "n": real
    }
    # Without Node objects (RBAC forbids them) there is nothing to check against.
    assert set(ClusterView.build(agents=[real, ghost], nodes=None).agents) == {"n", "ghost"}


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
