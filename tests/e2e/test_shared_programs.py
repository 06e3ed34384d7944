"""Shared programs end to end: three tenant namespaces with 30 probes of one shape each on
one node become Ready through the operator, served by the agent's shared programs, and each
probe counts only its own namespace's pod."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from tests.e2e.test_operator import probe_obj, wait_condition
from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_sim.local_cluster import LocalCluster
from tracekeeper_sim.world import World, hits_by_pod, wait_until

pytestmark = pytest.mark.e2e

NAMESPACES = 3
PROBES = 30
SPEC = {
    "tracepoint": "syscalls:sys_enter_openat",
    "filter": {"podSelector": {"matchLabels": {"app": "shared"}}},
    "output": {"kind": "count", "by": ["pod"]},
}


@pytest.fixture(scope="module")
def world(
    cluster: LocalCluster, crds: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("the shared-programs e2e tier runs a real agent: needs root")
    w = World(cluster, tmp_path_factory.mktemp("shared-e2e"), detect_root())
    try:
        w.add_node("node-s")
        w.start_operator()
        yield w
    finally:
        w.close()


def test_three_namespaces_of_thirty_probes_share_programs_and_stay_apart(world: World) -> None:
    node = world.nodes["node-s"]
    namespaces = [world.namespace(f"team{i}") for i in range(NAMESPACES)]
    for ns in namespaces:  # the same labels in every namespace, on the same node
        world.create_pod(ns, "app", node, {"app": "shared"})
        items = [probe_obj(f"p{j:02d}", SPEC) for j in range(PROBES)]
        doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        res = world.cluster.kubectl("apply", "-n", ns, "-f", "-", input=doc)
        assert res.returncode == 0, res.stderr
    for ns in namespaces:
        for j in range(PROBES):
            wait_condition(world, ns, f"p{j:02d}", "Ready", "True", timeout=240)

    report = node.agent.report()
    ours = [p for p in report["probes"] if p["id"].split("/")[0] in namespaces]
    assert len(ours) == NAMESPACES * PROBES and {p["state"] for p in ours} == {"Loaded"}
    programs = {tuple(p["programIds"]) for p in ours}
    assert len(programs) == 2  # 90 bindings of one shape: 64, then a second program
    assert sorted({p["sharedBy"] for p in ours}) == [26, 64]
    assert {p["shape"] for p in ours} == {"tracepoint syscalls:sys_enter_openat count by pod"}

    def all_counting() -> dict[str, dict[str, float]] | None:
        text = node.agent.metrics()
        seen = {
            f"{ns}/p{j:02d}": hits_by_pod(text, ns, f"p{j:02d}")
            for ns in namespaces
            for j in range(PROBES)
        }
        return seen if all(h.get("app", 0) > 0 for h in seen.values()) else None

    seen = wait_until("every probe counting its pod", all_counting, timeout=60)
    # Each probe's bit is set only on its own namespace's pod: one pod label, its own.
    assert {probe: set(hits) for probe, hits in seen.items()} == {p: {"app"} for p in seen}
    for p in ours:
        assert p["pods"] == 1 and p["filterEntries"] == 1, p
