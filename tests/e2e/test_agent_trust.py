"""Who is an agent, end to end: a tenant pod posing as one (agent labels, a real node,
even the DaemonSet's ownerReference and an endpoint annotation pointing at a listener this
test runs) and a pod of the operator's namespace bound to a node that does not exist get
no request at all, while the real agent keeps receiving its pushes."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_sim.local_cluster import LocalCluster, find_free_ports
from tracekeeper_sim.world import (
    AGENT_LABELS,
    ENDPOINT_ANNOTATION,
    OPERATOR_NS,
    World,
    condition,
    wait_until,
)

pytestmark = pytest.mark.e2e


class Listener:
    """An HTTP server on loopback that records every request line and headers it gets."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.port = find_free_ports(1)[0]
        seen = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                seen.append((self.requestline, dict(self.headers)))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_PUT = do_POST = _any

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def world(
    cluster: LocalCluster, crds: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("the operator e2e tier runs real agents: needs root to load BPF programs")
    w = World(cluster, tmp_path_factory.mktemp("trust-e2e"), detect_root())
    try:
        w.add_node("trust-node")
        w.start_operator()
        yield w
    finally:
        w.close()


def _impostor(world: World, namespace: str, name: str, node: str, listener: Listener) -> None:
    """A pod that claims to be `node`'s agent in every way a pod spec can, newer than the
    real one (the operator used to prefer the newest Ready pod)."""
    world.kube.create(
        f"/api/v1/namespaces/{namespace}/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": AGENT_LABELS,
                "annotations": {ENDPOINT_ANNOTATION: listener.endpoint},
                "ownerReferences": [world.agent_owner],
            },
            "spec": {
                "nodeName": node,
                "containers": [
                    {
                        "name": "agent",
                        "image": "evil:latest",
                        "ports": [{"name": "api", "containerPort": listener.port}],
                    }
                ],
            },
        },
    )
    world.kubelet_status(namespace, name, {"agent": None})


def test_no_pod_but_the_daemonsets_gets_a_push(world: World) -> None:
    listener = Listener()
    ns = world.namespace("impostor")
    ghost = f"tracekeeper-agent-ghost-{ns}"
    try:
        node = world.nodes["trust-node"]
        _impostor(world, ns, "tracekeeper-agent-fake", node.name, listener)
        # In the operator's namespace, owned by the DaemonSet, but on no real node.
        _impostor(world, OPERATOR_NS, ghost, f"ghost-{ns}", listener)
        world.create_pod(ns, "web-0", node, {"app": "web"})
        world.kube.create(
            f"/apis/tracekeeper.dev/v1alpha1/namespaces/{ns}/traceprobes",
            {
                "apiVersion": "tracekeeper.dev/v1alpha1",
                "kind": "TraceProbe",
                "metadata": {"name": "opens"},
                "spec": {"tracepoint": "syscalls:sys_enter_openat"},
            },
        )

        def ready() -> dict[str, Any] | None:
            obj = world.probe(ns, "opens")
            c = condition(obj, "Ready")
            return obj if c is not None and c["status"] == "True" else None

        wait_until(f"{ns}/opens Ready on the real agent", ready, describe=world.operator_log_tail)
        revision = node.agent.report()["revision"]
        # Another push for the node: its revision moves on at the real agent.
        world.create_pod(ns, "web-1", node, {"app": "web"})
        wait_until(
            "the real agent's revision to advance",
            lambda: node.agent.report()["revision"] > revision,
            describe=world.operator_log_tail,
        )
        outcome = node.agent.outcome(f"{ns}/opens")
        assert outcome is not None and outcome["state"] == "Loaded" and outcome["pods"] == 2
        # Resyncs run every second here: let a few more rounds pass for every agent known.
        resyncs = world.operator_metric("tracekeeper_operator_resyncs_total")
        wait_until(
            "three more resync rounds",
            lambda: world.operator_metric("tracekeeper_operator_resyncs_total") >= resyncs + 3,
        )
        assert listener.requests == []
        status = world.probe(ns, "opens")["status"]
        assert status["nodes"]["targeted"] == 1 and status["nodes"]["loaded"] == 1
    finally:
        listener.close()
        world.kube.delete(f"/api/v1/namespaces/{OPERATOR_NS}/pods/{ghost}", force=True)
