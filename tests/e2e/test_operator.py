"""The operator end to end: real apiserver, the operator and one agent per simulated node as
processes, real BPF programs counting real processes in cgroups laid out as kubelet does.

The tests share one world (two nodes, their agents, the operator) and run in order; each
uses namespaces of its own. Times are printed (run with -s to see them).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_sim.local_cluster import LocalCluster
from tracekeeper_sim.world import (
    EXAMPLES_DIR,
    GROUP_PATH,
    OPERATOR_NS,
    SimNode,
    World,
    bpf_prog_ids,
    condition,
    hits_by_pod,
    samples,
    wait_until,
)

pytestmark = pytest.mark.e2e

TIMINGS: dict[str, float] = {}


def report(name: str, value: str) -> None:
    print(f"\n[e2e operator] {name}: {value}", file=sys.stderr)


@pytest.fixture(scope="module")
def world(
    cluster: LocalCluster,
    crds: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("the operator e2e tier runs real agents: needs root to load BPF programs")
    w = World(cluster, tmp_path_factory.mktemp("operator-e2e"), detect_root())
    try:
        w.add_node("node-a", {"zone": "z1"})
        w.add_node("node-b", {"zone": "z2"})
        w.start_operator()
        yield w
    finally:
        w.close()


def apply(world: World, namespace: str, source: Path | dict[str, Any]) -> None:
    args = ["apply", "-n", namespace, "-f"]
    if isinstance(source, Path):
        res = world.cluster.kubectl(*args, str(source))
    else:
        res = world.cluster.kubectl(*args, "-", input=json.dumps(source))
    assert res.returncode == 0, res.stderr


def probe_obj(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "tracekeeper.dev/v1alpha1",
        "kind": "TraceProbe",
        "metadata": {"name": name},
        "spec": spec,
    }


def wait_condition(
    world: World,
    ns: str,
    name: str,
    type_: str,
    status: str,
    reason: str | None = None,
    *,
    generation: int | None = None,
    timeout: float = 90,
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = world.probe(ns, name)
        c = condition(obj, type_)
        if c is None or c["status"] != status or (reason is not None and c["reason"] != reason):
            return None
        if generation is not None and obj["status"].get("observedGeneration") != generation:
            return None
        return obj  # type: ignore[no-any-return]

    def describe() -> str:
        obj = world.probe(ns, name)
        return (
            f"status: {json.dumps((obj or {}).get('status'), indent=1)}\n"
            f"operator log:\n{world.operator_log_tail()}"
        )

    want = f"{ns}/{name} {type_}={status}" + (f" ({reason})" if reason else "")
    return wait_until(want, check, timeout=timeout, describe=describe)


def wait_programs_gone(ids: list[int]) -> None:
    """The kernel frees a closed program after an RCU grace period, a moment after the agent
    reported it gone."""
    wait_until(
        f"BPF programs {ids} gone from the kernel",
        lambda: not set(ids) & bpf_prog_ids(),
        timeout=15,
    )


def loaded_outcome(node: SimNode, probe_id: str) -> dict[str, Any] | None:
    out = node.agent.outcome(probe_id)
    return out if out is not None and out["state"] == "Loaded" else None


# --- 1. apply an example -> Ready, counts only from the selected pods ------------------------


@pytest.fixture(scope="module")
def web(world: World) -> dict[str, Any]:
    """examples/file-opens-by-pod.yaml applied in a namespace with app=web pods on both nodes
    and an app=db pod that it must not count."""
    ns = world.namespace("opens")
    a, b = world.nodes["node-a"], world.nodes["node-b"]
    pods = {
        "web-0": world.create_pod(ns, "web-0", a, {"app": "web"}),
        "web-1": world.create_pod(ns, "web-1", b, {"app": "web"}),
        "db-0": world.create_pod(ns, "db-0", a, {"app": "db"}),
    }
    started = time.monotonic()
    apply(world, ns, EXAMPLES_DIR / "file-opens-by-pod.yaml")
    obj = wait_condition(world, ns, "web-file-opens", "Ready", "True")
    TIMINGS["apply-to-Ready"] = time.monotonic() - started
    report("apply-to-Ready (2 nodes, first compile)", f"{TIMINGS['apply-to-Ready']:.2f}s")
    return {"ns": ns, "pods": pods, "ready": obj, "id": f"{ns}/web-file-opens"}


def test_example_becomes_ready_and_counts_only_selected_pods(
    world: World, web: dict[str, Any]
) -> None:
    ns, probe_id = web["ns"], web["id"]
    status = web["ready"]["status"]
    assert status["nodes"] == {"targeted": 2, "loaded": 2, "failed": 0}
    assert status["targets"] == {"pods": 2, "containers": 2}
    # What it costs, from the agents' answers that made it Ready (refreshed once a minute).
    assert status["cost"]["nodes"] == 2 and status["cost"]["kernelMemoryBytes"] > 0, status
    assert condition(web["ready"], "Accepted")["status"] == "True"  # type: ignore[index]
    assert condition(web["ready"], "Degraded")["status"] == "False"  # type: ignore[index]
    # The operator posts the Event once its status write returned: a moment after Ready.
    wait_until(
        "the ProbeLoaded Event",
        lambda: "ProbeLoaded" in [e["reason"] for e in world.events(ns, "web-file-opens")],
        timeout=10,
    )
    # The readiness gauge was set in the pass that wrote Ready=True, before the write.
    ready = {"namespace": ns, "probe": "web-file-opens"}
    assert world.operator_metric("tracekeeper_operator_probe_ready", **ready, reason="Loaded") == 1

    a, b = world.nodes["node-a"], world.nodes["node-b"]

    def counted() -> bool:
        on_a = hits_by_pod(a.agent.metrics(), ns, "web-file-opens")
        on_b = hits_by_pod(b.agent.metrics(), ns, "web-file-opens")
        return on_a.get("web-0", 0) >= 5 and on_b.get("web-1", 0) >= 5

    wait_until("openat hits from web-0 (node-a) and web-1 (node-b)", counted, timeout=30)
    on_a = hits_by_pod(a.agent.metrics(), ns, "web-file-opens")
    on_b = hits_by_pod(b.agent.metrics(), ns, "web-file-opens")
    assert set(on_a) == {"web-0"}, on_a  # db-0 runs the same loop on the same node
    assert set(on_b) == {"web-1"}, on_b
    for node in (a, b):
        outcome = node.agent.outcome(probe_id)
        assert outcome is not None and outcome["pods"] == 1 and outcome["filterEntries"] == 1


# --- 2-3. pods come and go: filter entries follow, the program stays -------------------------


def test_new_matching_pod_is_added_with_the_program_unchanged(
    world: World, web: dict[str, Any]
) -> None:
    ns, probe_id = web["ns"], web["id"]
    a = world.nodes["node-a"]
    before = loaded_outcome(a, probe_id)
    assert before is not None
    started = time.monotonic()
    web2 = world.create_pod(ns, "web-2", a, {"app": "web"})
    web["pods"]["web-2"] = web2

    def entered() -> dict[str, Any] | None:
        out = loaded_outcome(a, probe_id)
        return out if out and out["pods"] == 2 and out["filterEntries"] == 2 else None

    after = wait_until("web-2's entry on node-a", entered, timeout=30)
    report("pod created -> filter entry on its node", f"{time.monotonic() - started:.2f}s")
    report("program ids before/after a new pod", f"{before['programIds']} -> {after['programIds']}")
    assert after["programIds"] == before["programIds"]

    def counted() -> bool:
        return hits_by_pod(a.agent.metrics(), ns, "web-file-opens").get("web-2", 0) >= 3

    wait_until("web-2's openat hits", counted, timeout=30)
    obj = wait_until(
        "status targets.pods == 3",
        lambda: (o := world.probe(ns, "web-file-opens"))["status"]["targets"]["pods"] == 3 and o,
    )
    assert obj["status"]["nodes"] == {"targeted": 2, "loaded": 2, "failed": 0}


def test_deleted_pod_is_removed_with_the_program_unchanged(
    world: World, web: dict[str, Any]
) -> None:
    ns, probe_id = web["ns"], web["id"]
    a = world.nodes["node-a"]
    before = loaded_outcome(a, probe_id)
    assert before is not None and before["pods"] == 2
    world.delete_pod(web["pods"].pop("web-2"))

    def removed() -> dict[str, Any] | None:
        out = loaded_outcome(a, probe_id)
        return out if out and out["pods"] == 1 and out["filterEntries"] == 1 else None

    after = wait_until("web-2's entry removed on node-a", removed, timeout=30)
    assert after["programIds"] == before["programIds"]
    wait_until(
        "status targets.pods back to 2",
        lambda: world.probe(ns, "web-file-opens")["status"]["targets"]["pods"] == 2,
    )


# --- 4. a TraceFilter edit updates maps, never reloads ------------------------------------------


def test_trace_filter_edit_updates_maps_without_reload(world: World) -> None:
    ns = world.namespace("checkout")
    a, b = world.nodes["node-a"], world.nodes["node-b"]
    world.create_pod(ns, "checkout-0", a, {"app": "checkout"})
    world.create_pod(ns, "checkout-1", b, {"app": "checkout"})
    world.create_pod(ns, "checkout-canary", a, {"app": "checkout", "track": "canary"})
    apply(world, ns, EXAMPLES_DIR / "shared-filter.yaml")
    for name in ("checkout-connects", "checkout-write-latency"):
        obj = wait_condition(world, ns, name, "Ready", "True")
        assert obj["status"]["targets"]["pods"] == 2, obj["status"]
    ids = {
        (node.name, name): loaded_outcome(node, f"{ns}/{name}")["programIds"]  # type: ignore[index]
        for node in (a, b)
        for name in ("checkout-connects", "checkout-write-latency")
    }
    filt = world.kube.get(
        f"/apis/tracekeeper.dev/v1alpha1/namespaces/{ns}/tracefilters/checkout-pods"
    )
    assert filt["status"]["matchedPods"] == 2
    assert filt["status"]["usedBy"] == ["checkout-connects", "checkout-write-latency"]

    # Let the canary in: both probes follow, on node-a, with map updates only.
    world.kube.merge(
        f"/apis/tracekeeper.dev/v1alpha1/namespaces/{ns}/tracefilters/checkout-pods",
        {"spec": {"podSelector": {"matchLabels": {"app": "checkout"}, "matchExpressions": None}}},
    )
    for name in ("checkout-connects", "checkout-write-latency"):

        def widened(name: str = name) -> dict[str, Any] | None:
            out = loaded_outcome(a, f"{ns}/{name}")
            return out if out and out["pods"] == 2 else None

        after = wait_until(f"{name}: the canary's entry on node-a", widened, timeout=30)
        report(
            f"program ids before/after a TraceFilter edit ({name}, node-a)",
            f"{ids[('node-a', name)]} -> {after['programIds']}",
        )
        assert after["programIds"] == ids[("node-a", name)]
        on_b = loaded_outcome(b, f"{ns}/{name}")
        assert on_b is not None and on_b["programIds"] == ids[("node-b", name)]
    wait_until(
        "TraceFilter status matchedPods == 3",
        lambda: (
            world.kube.get(
                f"/apis/tracekeeper.dev/v1alpha1/namespaces/{ns}/tracefilters/checkout-pods"
            )["status"]["matchedPods"]
            == 3
        ),
    )


# --- 5-6. tenancy: isolation whatever the selector, privileged fields refused ------------------


def test_tenant_probe_never_sees_another_namespace(world: World) -> None:
    team_a, team_b = world.namespace("team-a"), world.namespace("team-b")
    a = world.nodes["node-a"]
    world.create_pod(team_a, "mine", a, {"app": "shared"})
    world.create_pod(team_b, "theirs", a, {"app": "shared"})  # same node, same labels
    everything = {
        "tracepoint": "syscalls:sys_enter_openat",
        "filter": {"podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}},
        "output": {"kind": "count", "by": ["pod"]},
    }
    apply(world, team_a, probe_obj("everything", everything))
    obj = wait_condition(world, team_a, "everything", "Ready", "True")
    assert obj["status"]["targets"]["pods"] == 1 and obj["status"]["nodes"]["targeted"] == 1

    def counted() -> dict[str, float] | None:
        hits = hits_by_pod(a.agent.metrics(), team_a, "everything")
        return hits if hits.get("mine", 0) >= 5 else None

    hits = wait_until("hits from team-a's pod", counted, timeout=30)
    assert set(hits) == {"mine"}, hits  # team-b's identical pod on the same node: never
    outcome = loaded_outcome(a, f"{team_a}/everything")
    assert outcome is not None and outcome["pods"] == 1 and outcome["filterEntries"] == 1


def test_a_namespace_over_its_budget_is_told_and_the_others_keep_theirs(world: World) -> None:
    crowded, calm = world.namespace("crowded"), world.namespace("calm")
    budget = 'tracekeeper.dev/budget={"probesPerNode": 1}'
    res = world.cluster.kubectl("annotate", "namespace", crowded, budget)
    assert res.returncode == 0, res.stderr
    a = world.nodes["node-a"]
    spec = {"tracepoint": "syscalls:sys_enter_openat"}
    for ns in (crowded, calm):
        world.create_pod(ns, "app-0", a, {"app": "x"})
        for name in ("first", "second"):  # created in this order: "first" is the older
            apply(world, ns, probe_obj(name, spec))
    obj = wait_condition(world, crowded, "second", "Accepted", "False", "QuotaExceeded")
    assert condition(obj, "Accepted")["message"] == (  # type: ignore[index]
        f"left out of 1 of 1 node: {crowded} has 2 probes on node node-a, its budget is 1 "
        "probes per node"
    )
    wait_until(
        "a QuotaExceeded Event",
        lambda: [e for e in world.events(crowded, "second") if e["reason"] == "QuotaExceeded"],
        timeout=30,
    )
    for ns, name in ((crowded, "first"), (calm, "first"), (calm, "second")):
        wait_condition(world, ns, name, "Ready", "True")
    assert a.agent.outcome(f"{crowded}/second") is None


@pytest.mark.parametrize(
    "privileged",
    [
        {"hostWide": True},
        {"pids": [1]},
        {"cgroupPaths": ["/system.slice"]},
        {"namespaceSelector": {}},
    ],
    ids=["hostWide", "pids", "cgroupPaths", "namespaceSelector"],
)
def test_privileged_fields_are_refused_outside_privileged_namespaces(
    world: World, privileged: dict[str, Any]
) -> None:
    ns = world.namespace("tenant")
    world.create_pod(ns, "app-0", world.nodes["node-a"], {"app": "x"})
    spec = {"tracepoint": "syscalls:sys_enter_openat", "filter": privileged}
    apply(world, ns, probe_obj("sneaky", spec))
    obj = wait_condition(world, ns, "sneaky", "Accepted", "False", "NotPermitted", timeout=30)
    field = next(iter(privileged))
    assert field in condition(obj, "Accepted")["message"]  # type: ignore[index]
    assert condition(obj, "Ready")["reason"] == "NotPermitted"  # type: ignore[index]
    wait_until(
        "a NotPermitted Event",
        lambda: [e for e in world.events(ns, "sneaky") if e["reason"] == "NotPermitted"],
        timeout=30,
    )
    for node in world.nodes.values():
        assert node.agent.outcome(f"{ns}/sneaky") is None


# --- 7. kprobes: privileged for tenants; a kernel without kprobes: Unsupported -------------


def test_kprobe_is_not_permitted_in_a_tenant_namespace(world: World) -> None:
    ns = world.namespace("kprobe")
    world.create_pod(ns, "a-0", world.nodes["node-a"], {"app": "x"}, run=False)
    apply(world, ns, EXAMPLES_DIR / "kprobe-tcp-connect.yaml")
    obj = wait_condition(world, ns, "tcp-connects", "Accepted", "False", "NotPermitted")
    message = condition(obj, "Accepted")["message"]  # type: ignore[index]
    assert "kprobe 'tcp_v4_connect' is privileged" in message, message
    for node in world.nodes.values():
        assert node.agent.outcome(f"{ns}/tcp-connects") is None


def test_kprobe_probe_is_unsupported_on_each_node_without_a_push(world: World) -> None:
    # In the privileged namespace (kprobes are privileged), on this machine's kernel. The
    # agents reported their kernel facts with their first answer (the operator pushes every
    # node's state at start): the operator refuses it itself, no agent ever sees the probe.
    ns, app = OPERATOR_NS, f"kprobe-{os.getpid()}"
    pods = [
        world.create_pod(ns, f"{app}-a", world.nodes["node-a"], {"app": app}, run=False),
        world.create_pod(ns, f"{app}-b", world.nodes["node-b"], {"app": app}, run=False),
    ]
    spec = {
        "kprobe": {"function": "tcp_v4_connect"},
        "filter": {"podSelector": {"matchLabels": {"app": app}}},
    }
    apply(world, ns, probe_obj(app, spec))
    try:
        obj = wait_condition(world, ns, app, "Degraded", "True", "Unsupported")
        status = obj["status"]
        assert status["nodes"] == {"targeted": 2, "loaded": 0, "failed": 2}
        assert [(f["node"], f["reason"]) for f in status["failures"]] == [
            ("node-a", "Unsupported"),
            ("node-b", "Unsupported"),
        ]
        for f in status["failures"]:
            assert (
                f"node {f['node']}'s kernel ({os.uname().release}) has no kprobes" in (f["message"])
            ), f["message"]
            assert "its agent found: CONFIG_KPROBES" in f["message"], f["message"]
        assert all(n.agent.outcome(f"{ns}/{app}") is None for n in world.nodes.values())
        assert condition(obj, "Ready")["reason"] == "Unsupported"  # type: ignore[index]
        report("kprobe failure message", status["failures"][0]["message"])
        wait_until(
            "ProbeLoadFailed Events",
            lambda: (
                len([e for e in world.events(ns, app) if e["reason"] == "ProbeLoadFailed"]) >= 2
            ),
        )
    finally:
        world.kube.delete(f"{GROUP_PATH}/namespaces/{ns}/traceprobes/{app}")
        for pod in pods:
            world.delete_pod(pod)


# --- nodeSelector, suspend, and a pod churn burst ---------------------------------------------


def test_node_selector_picks_nodes_by_their_labels(world: World) -> None:
    ns = world.namespace("zoned")
    world.create_pod(ns, "a-0", world.nodes["node-a"], {"app": "x"}, run=False)
    world.create_pod(ns, "b-0", world.nodes["node-b"], {"app": "x"}, run=False)
    spec = {"syscall": {"name": "openat"}, "nodeSelector": {"zone": "z2"}}
    apply(world, ns, probe_obj("zoned", spec))
    obj = wait_condition(world, ns, "zoned", "Ready", "True")
    assert obj["status"]["nodes"] == {"targeted": 1, "loaded": 1, "failed": 0}
    assert world.nodes["node-a"].agent.outcome(f"{ns}/zoned") is None
    assert loaded_outcome(world.nodes["node-b"], f"{ns}/zoned") is not None


def test_suspend_unloads_everywhere_and_resume_loads_again(world: World) -> None:
    ns = world.namespace("suspend")
    world.create_pod(ns, "a-0", world.nodes["node-a"], {"app": "x"}, run=False)
    world.create_pod(ns, "b-0", world.nodes["node-b"], {"app": "x"}, run=False)
    apply(world, ns, EXAMPLES_DIR / "sched-switch-raw.yaml")
    probe_id = f"{ns}/context-switches"
    wait_condition(world, ns, "context-switches", "Ready", "True")
    ids = {
        n.name: loaded_outcome(n, probe_id)["programIds"]  # type: ignore[index]
        for n in world.nodes.values()
    }
    path = f"/apis/tracekeeper.dev/v1alpha1/namespaces/{ns}/traceprobes/context-switches"
    world.kube.merge(path, {"spec": {"suspend": True}})
    wait_condition(world, ns, "context-switches", "Ready", "False", "Suspended")
    wait_until(
        "every agent to drop the suspended probe",
        lambda: all(n.agent.outcome(probe_id) is None for n in world.nodes.values()),
        timeout=30,
    )
    wait_programs_gone([i for v in ids.values() for i in v])
    wait_until(
        "a ProbeUnloaded Event",
        lambda: [e for e in world.events(ns, "context-switches") if e["reason"] == "ProbeUnloaded"],
        timeout=30,
    )
    world.kube.merge(path, {"spec": {"suspend": False}})
    obj = wait_condition(world, ns, "context-switches", "Ready", "True")
    assert obj["status"]["nodes"] == {"targeted": 2, "loaded": 2, "failed": 0}


def test_a_debug_session_expires_keeps_its_values_and_runs_again_on_a_new_duration(
    world: World,
) -> None:
    ns = world.namespace("session")
    world.create_pod(ns, "a-0", world.nodes["node-a"], {"app": "x"})
    world.create_pod(ns, "b-0", world.nodes["node-b"], {"app": "x"})
    # A shape no other test of the module loads: its program is this probe's alone, so it
    # must leave the kernel when the session ends (shared programs stay for their others).
    spec = {"tracepoint": "syscalls:sys_enter_close", "output": {"kind": "count", "by": ["pod"]},
            "duration": "5s"}  # fmt: skip
    apply(world, ns, probe_obj("session", spec))
    probe_id = f"{ns}/session"
    obj = wait_condition(world, ns, "session", "Ready", "True")
    session = obj["status"]["session"]
    assert session["duration"] == "5s" and session["expiresAt"] > session["startedAt"]
    ids = [i for n in world.nodes.values() for i in loaded_outcome(n, probe_id)["programIds"]]  # type: ignore[index]
    obj = wait_condition(world, ns, "session", "Ready", "False", "Expired")
    expired = next(c for c in obj["status"]["conditions"] if c["type"] == "Expired")
    assert expired["status"] == "True" and "5s debug session ended" in expired["message"]
    # Its last values, read from both agents before it was unloaded.
    final = obj["status"]["session"]["final"]
    assert final["nodes"] == ["node-a", "node-b"] and final["unread"] == []
    assert final["total"] > 0 and {r["key"]["pod"] for r in final["top"]} == {"a-0", "b-0"}
    wait_until(
        "every agent to drop the expired probe",
        lambda: all(n.agent.outcome(probe_id) is None for n in world.nodes.values()),
        timeout=30,
    )
    wait_programs_gone(ids)
    wait_until(
        "an Expired Event",
        lambda: [e for e in world.events(ns, "session") if e["reason"] == "Expired"],
        timeout=30,
    )
    # The object is kept; a new duration runs it again, with a new session.
    path = f"/apis/tracekeeper.dev/v1alpha1/namespaces/{ns}/traceprobes/session"
    world.kube.merge(path, {"spec": {"duration": "1h"}})
    obj = wait_condition(world, ns, "session", "Ready", "True")
    assert obj["status"]["session"]["duration"] == "1h"
    assert "final" not in obj["status"]["session"]
    table = world.cluster.kubectl("get", "tp", "-n", ns, "session", check=True).stdout
    assert "EXPIRES" in table and obj["status"]["session"]["expiresAt"] in table
    world.kube.delete(path)


def test_a_pod_burst_is_coalesced_into_few_pushes(world: World) -> None:
    ns = world.namespace("burst")
    a = world.nodes["node-a"]
    world.create_pod(ns, "seed", a, {"app": "burst"}, run=False)
    apply(
        world,
        ns,
        probe_obj(
            "burst",
            {
                "syscall": {"name": "openat"},
                "filter": {"podSelector": {"matchLabels": {"app": "burst"}}},
            },
        ),
    )
    wait_condition(world, ns, "burst", "Ready", "True")
    pushes_before = world.operator_metric("tracekeeper_operator_pushes_total")
    started = time.monotonic()
    count = 20
    for i in range(count):
        world.create_pod(ns, f"burst-{i}", a, {"app": "burst"}, run=False)

    def all_in() -> dict[str, Any] | None:
        out = loaded_outcome(a, f"{ns}/burst")
        return out if out and out["pods"] == count + 1 else None

    wait_until(f"{count} new pods in node-a's filter map", all_in, timeout=60)
    pushes = world.operator_metric("tracekeeper_operator_pushes_total") - pushes_before
    report(
        f"{count} pods created in a burst -> pushes to node-a",
        f"{pushes:.0f} (all in the map {time.monotonic() - started:.2f}s after the first)",
    )
    assert pushes < count / 2


# --- 8. an agent dies and comes back empty: the operator restores it --------------------------


def test_killed_agent_is_restored_without_an_operator_restart(
    world: World, web: dict[str, Any]
) -> None:
    ns, probe_id = web["ns"], web["id"]
    b = world.nodes["node-b"]
    before = loaded_outcome(b, probe_id)
    assert before is not None
    boot_id = b.agent.report()["bootId"]
    b.agent.kill()  # SIGKILL: its tracepoint program stays attached, pinned for the next
    assert set(before["programIds"]) <= bpf_prog_ids()
    obj = wait_condition(world, ns, "web-file-opens", "Degraded", "True", "AgentUnreachable")
    assert [f["node"] for f in obj["status"]["failures"]] == ["node-b"]
    # Back with an empty state dir: only the operator can tell it what to run.
    world.restart_agent(b, wipe_state=True)
    started = time.monotonic()
    obj = wait_condition(world, ns, "web-file-opens", "Ready", "True")
    report("agent restarted (empty) -> Ready again", f"{time.monotonic() - started:.2f}s")
    assert obj["status"]["nodes"] == {"targeted": 2, "loaded": 2, "failed": 0}
    after = loaded_outcome(b, probe_id)
    assert after is not None and after["pods"] == 1
    assert b.agent.report()["bootId"] != boot_id
    report(
        "program ids on node-b before/after the agent restart",
        f"{before['programIds']} -> {after['programIds']}",
    )
    # The pinned program was adopted by the push, or detached once the empty restore was
    # over: never left running beside a new one.
    if after["programIds"] != before["programIds"]:
        wait_programs_gone(before["programIds"])

    def counted() -> bool:
        return hits_by_pod(b.agent.metrics(), ns, "web-file-opens").get("web-1", 0) >= 3

    wait_until("web-1 counted again on the restarted agent", counted, timeout=30)


# --- 9. the operator restarts: nothing reloaded, nothing duplicated, no status churn ----------


def _programs(world: World) -> dict[tuple[str, str], list[int]]:
    return {
        (node.name, p["id"]): p["programIds"]
        for node in world.nodes.values()
        for p in node.agent.report()["probes"]
    }


def test_operator_restart_loads_no_duplicate_programs(world: World, web: dict[str, Any]) -> None:
    wait_condition(world, web["ns"], "web-file-opens", "Ready", "True")
    before = _programs(world)
    loaded_before = {
        n.name: _gauge(n, "tracekeeper_agent_programs_loaded") for n in world.nodes.values()
    }
    statuses_before = world.probe(web["ns"], "web-file-opens")["status"]
    world.stop_operator()
    world.start_operator()
    wait_until(
        "the restarted operator's first push to each node",
        lambda: (
            world.operator_metric("tracekeeper_operator_pushes_total", outcome="ok")
            >= len(world.nodes)
        ),
    )
    revisions = {n.name: n.agent.report()["revision"] for n in world.nodes.values()}
    assert _programs(world) == before  # same probes, same BPF program ids: nothing reloaded
    assert {
        n.name: _gauge(n, "tracekeeper_agent_programs_loaded") for n in world.nodes.values()
    } == loaded_before
    assert world.probe(web["ns"], "web-file-opens")["status"] == statuses_before
    # Each agent is read back every second: still nothing to write, nothing to push.
    wait_until(
        "two resyncs of each agent",
        lambda: (
            world.operator_metric("tracekeeper_operator_resyncs_total", outcome="ok")
            >= 2 * len(world.nodes)
        ),
    )
    assert world.operator_metric("tracekeeper_operator_status_patches_total") == 0
    assert world.operator_metric("tracekeeper_operator_pushes_total") == len(world.nodes)
    report("agent revisions after the operator restart", str(revisions))


def _gauge(node: SimNode, name: str) -> float:
    return sum(v for _, v in samples(node.agent.metrics(), name))


# --- 10. a spec edit replaces the program -------------------------------------------------------


def _left_binding(node: SimNode, before: dict[str, Any]) -> None:
    """The probe's binding left the program `before` describes: the program is gone if it
    served no other probe, else it stays with one binding fewer."""
    if before["sharedBy"] == 1:
        wait_programs_gone(before["programIds"])
        return
    sharing = [p for p in node.agent.report()["probes"] if p["programIds"] == before["programIds"]]
    assert len(sharing) == before["sharedBy"] - 1, sharing
    assert {p["sharedBy"] for p in sharing} == {before["sharedBy"] - 1}


def test_spec_edit_replaces_the_program(world: World, web: dict[str, Any]) -> None:
    ns, probe_id = web["ns"], web["id"]
    before = {n.name: loaded_outcome(n, probe_id) for n in world.nodes.values()}
    assert all(before.values())
    path = f"/apis/tracekeeper.dev/v1alpha1/namespaces/{ns}/traceprobes/web-file-opens"

    def edit(patch: dict[str, Any]) -> dict[str, dict[str, Any]]:
        last = {n.name: loaded_outcome(n, probe_id) for n in world.nodes.values()}
        edited = world.kube.merge(path, {"spec": patch})
        wait_condition(
            world,
            ns,
            "web-file-opens",
            "Ready",
            "True",
            generation=edited["metadata"]["generation"],
        )

        def applied() -> dict[str, dict[str, Any]] | None:
            now = {n.name: loaded_outcome(n, probe_id) for n in world.nodes.values()}
            if all(
                o and o["programIds"] and o["specHash"] != last[k]["specHash"]  # type: ignore[index]
                for k, o in now.items()
            ):
                return now  # type: ignore[return-value]
            return None

        return wait_until("the edit applied on both nodes", applied, timeout=30)

    # Sampling is a map value of the probe's binding: the same programs go on.
    sampled = edit({"sampling": 2})
    for node, outcome in sampled.items():
        assert outcome["programIds"] == before[node]["programIds"]  # type: ignore[index]
    # Another output shape is another program: the probe moves, new one first.
    started = time.monotonic()
    after = edit({"output": {"kind": "count", "by": ["pod", "comm"]}})
    report("shape edit -> Ready (new program on 2 nodes)", f"{time.monotonic() - started:.2f}s")
    for node, outcome in after.items():
        old = sampled[node]["programIds"]
        report(
            f"program ids on {node} before/after a shape edit", f"{old} -> {outcome['programIds']}"
        )
        assert set(outcome["programIds"]).isdisjoint(old)
        _left_binding(world.nodes[node], sampled[node])


# --- 11. delete: unloaded everywhere, then the finalizer goes ---------------------------------


def test_delete_unloads_on_every_node_then_releases_the_finalizer(
    world: World, web: dict[str, Any]
) -> None:
    ns, probe_id = web["ns"], web["id"]
    obj = world.probe(ns, "web-file-opens")
    assert "tracekeeper.dev/unload" in obj["metadata"]["finalizers"]
    before = {n.name: loaded_outcome(n, probe_id) for n in world.nodes.values()}
    started = time.monotonic()
    res = world.cluster.kubectl("delete", "tp", "web-file-opens", "-n", ns, "--timeout=60s")
    assert res.returncode == 0, res.stderr
    report("delete -> finalizer released", f"{time.monotonic() - started:.2f}s")
    assert world.probe(ns, "web-file-opens") is None
    for node in world.nodes.values():
        assert node.agent.outcome(probe_id) is None
        _left_binding(node, before[node.name])  # type: ignore[arg-type]
    wait_until(
        "a ProbeUnloaded Event",
        lambda: [e for e in world.events(ns, "web-file-opens") if e["reason"] == "ProbeUnloaded"],
        timeout=30,
    )
