"""Faults on the control plane (issue 18's chaos, the cluster's part), in the e2e world (a
real apiserver and etcd, the operator and an agent as processes, real BPF programs): the
operator SIGKILLed mid-reconcile and mid-delete, the apiserver and etcd SIGKILLed and
started again. Each scenario checks that tracing resumes (or never stopped), that no
program is duplicated or orphaned, that no finalizer stays, and that the statuses tell the
truth; it returns its figures (tests/e2e/test_chaos.py asserts, `reliability.chaos` prints).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from reliability.agent_chaos import GONE_SECONDS, Figures, check, check_holds, held_bpf_ids
from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_sim.local_cluster import LocalCluster
from tracekeeper_sim.world import (
    GROUP_PATH,
    SimNode,
    World,
    bpf_prog_ids,
    condition,
    wait_bpf_gone,
    wait_until,
)

TRACEPOINTS = (
    "syscalls:sys_enter_openat",
    "syscalls:sys_enter_getppid",
    "syscalls:sys_enter_getpgid",
    "syscalls:sys_enter_getsid",
)
WAIT = 90.0
CRDS = Path(__file__).resolve().parents[1] / "crds"


@contextlib.contextmanager
def control_world(cluster: LocalCluster, workdir: Path) -> Iterator[World]:
    """One simulated node (agent process) and the operator on `cluster`, CRDs applied."""
    cluster.apply_crds(CRDS)
    workdir.mkdir(parents=True, exist_ok=True)
    world = World(cluster, workdir, detect_root())
    try:
        world.add_node("chaos-node")
        world.start_operator()
        yield world
    finally:
        world.close()


def probe_obj(name: str, tracepoint: str, app: str) -> dict[str, Any]:
    return {
        "apiVersion": "tracekeeper.dev/v1alpha1",
        "kind": "TraceProbe",
        "metadata": {"name": name},
        "spec": {
            "tracepoint": tracepoint,
            "filter": {"podSelector": {"matchLabels": {"app": app}}},
            "output": {"by": ["pod"]},
        },
    }


def apply(world: World, ns: str, *objs: dict[str, Any]) -> None:
    doc = {"apiVersion": "v1", "kind": "List", "items": list(objs)}
    res = world.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc))
    check(res.returncode == 0, f"kubectl apply: {res.stderr}")


def truthful(world: World, ns: str, name: str, pods: int) -> dict[str, Any] | None:
    """The probe's status says what the node runs: Ready, the generation observed, one node
    targeted and loaded, `pods` pods."""
    obj = world.probe(ns, name)
    ready = condition(obj, "Ready")
    if not obj or ready is None or ready["status"] != "True":
        return None
    status = obj["status"]
    ok = (
        status.get("observedGeneration") == obj["metadata"]["generation"]
        and status.get("nodes") == {"targeted": 1, "loaded": 1, "failed": 0}
        and status.get("targets", {}).get("pods") == pods
    )
    return obj if ok else None


def wait_truthful(world: World, ns: str, names: list[str], pods: int) -> None:
    def describe() -> str:
        return (
            "\n".join(f"{n}: {json.dumps((world.probe(ns, n) or {}).get('status'))}" for n in names)
            + f"\noperator log:\n{world.operator_log_tail()}"
        )

    wait_until(f"{names} truthful (Ready, {pods} pods)",
               lambda: all(truthful(world, ns, n, pods) for n in names),
               timeout=WAIT, describe=describe)  # fmt: skip


def gone(world: World, ns: str, names: list[str]) -> bool:
    """Deleted: the objects are gone, so their finalizers were released."""
    return all(world.probe(ns, n) is None for n in names)


def agent_pid(node: SimNode) -> int:
    assert node.agent.popen is not None
    return node.agent.popen.pid


def loaded_ids(node: SimNode, ns: str) -> dict[str, list[int]]:
    return {
        p["id"]: p["programIds"]
        for p in node.agent.report()["probes"]
        if p["id"].startswith(f"{ns}/") and p["state"] == "Loaded"
    }


def only_node(world: World) -> SimNode:
    (node,) = world.nodes.values()
    return node


@contextlib.contextmanager
def counted(figures: Figures, node: SimNode) -> Iterator[set[int]]:
    """Program counts around a scenario; the programs it saw must be gone at the end."""
    figures.programs_before = len(bpf_prog_ids())
    seen: set[int] = set()
    yield seen
    left = wait_bpf_gone(seen, set(), GONE_SECONDS)
    figures.leaked = len(left)
    figures.programs_after = len(bpf_prog_ids())
    figures.agent_programs = len(held_bpf_ids(agent_pid(node))[0])
    check(not left, f"{figures.scenario}: programs left after the delete: {sorted(left)}")


def operator_killed_mid_reconcile(world: World) -> Figures:
    """SIGKILL the operator while it reconciles new probes, then while it deletes two: the
    restarted one loads each once, reports them truthfully, releases every finalizer."""
    figures = Figures("operator SIGKILL mid-reconcile")
    node = only_node(world)
    ns = world.namespace("chaos-op")
    world.create_pod(ns, "web-0", node, {"app": "web"})
    names = [f"p{i}" for i in range(len(TRACEPOINTS))]
    with counted(figures, node) as seen:
        apply(
            world, ns, *(probe_obj(n, tp, "web") for n, tp in zip(names, TRACEPOINTS, strict=True))
        )

        def reconciling() -> bool:
            return any((world.probe(ns, n) or {}).get("metadata", {}).get("finalizers")
                       for n in names)  # fmt: skip

        wait_until("the operator reconciling", reconciling, timeout=WAIT)
        world.kill_operator()
        at_kill = len(loaded_ids(node, ns))
        figures.notes.append(f"killed with {at_kill} of {len(names)} probes on the node")
        started = time.monotonic()
        world.start_operator()
        wait_truthful(world, ns, names, pods=1)
        figures.resume_seconds = time.monotonic() - started
        ids = loaded_ids(node, ns)
        seen.update(i for v in ids.values() for i in v)
        check(sorted(ids) == [f"{ns}/{n}" for n in names], f"loaded on the node: {ids}")
        check_holds(agent_pid(node), node.agent.report(), "after the operator's restart")

        # Killed again while the finalizers of two deleted probes are pending.
        for name in names[:2]:
            world.kube.delete(f"{GROUP_PATH}/namespaces/{ns}/traceprobes/{name}")
        world.kill_operator()
        world.start_operator()
        wait_until("the deleted probes' finalizers released",
                   lambda: gone(world, ns, names[:2]), timeout=WAIT)  # fmt: skip
        left = node.agent.report()
        check(sorted(loaded_ids(node, ns)) == [f"{ns}/{n}" for n in names[2:]],
              f"deleted probes still loaded: revision {left['revision']}, "
              f"{[(p['id'], p['state']) for p in left['probes']]}")  # fmt: skip
        wait_truthful(world, ns, names[2:], pods=1)
        delete_all(world, ns, names[2:])
    return figures


def delete_all(world: World, ns: str, names: list[str]) -> None:
    for name in names:
        world.kube.delete(f"{GROUP_PATH}/namespaces/{ns}/traceprobes/{name}")
    wait_until(f"{names} deleted", lambda: gone(world, ns, names), timeout=WAIT)


def hits(node: SimNode, ns: str, name: str) -> float:
    from tracekeeper_sim.world import hits_by_pod

    return sum(hits_by_pod(node.agent.metrics(), ns, name).values())


def component_restarted(component: str) -> Callable[[World], Figures]:
    def scenario(world: World) -> Figures:
        """`component` SIGKILLed and started again after 2 s: the node traces on meanwhile,
        the program is not reloaded, and the operator sees a pod made afterwards."""
        figures = Figures(f"{component} SIGKILL and restart")
        node = only_node(world)
        ns = world.namespace("chaos-cp")
        world.create_pod(ns, "api-0", node, {"app": "api"})
        with counted(figures, node) as seen:
            apply(world, ns, probe_obj("opens", TRACEPOINTS[0], "api"))
            wait_truthful(world, ns, ["opens"], pods=1)
            before = loaded_ids(node, ns)
            seen.update(i for v in before.values() for i in v)
            wait_until("hits counted", lambda: hits(node, ns, "opens") > 0, timeout=WAIT)
            counted_before = hits(node, ns, "opens")
            world.cluster.restart(component, down_for=2.0)
            check(hits(node, ns, "opens") > counted_before, "tracing stopped with the cluster")
            started = time.monotonic()
            world.create_pod(ns, "api-1", node, {"app": "api"})

            def both() -> bool:
                outcome = node.agent.outcome(f"{ns}/opens")
                return outcome is not None and outcome["pods"] == 2

            wait_until("a pod made after the restart reaching the node", both, timeout=WAIT,
                       describe=world.operator_log_tail)  # fmt: skip
            figures.resume_seconds = time.monotonic() - started
            wait_truthful(world, ns, ["opens"], pods=2)
            check(loaded_ids(node, ns) == before, f"reloaded: {before} -> {loaded_ids(node, ns)}")
            check_holds(agent_pid(node), node.agent.report(), f"after the {component} restart")
            delete_all(world, ns, ["opens"])
        figures.notes.append(f"{component}: resume = its restart to a new pod in the node's map")
        return figures

    scenario.__name__ = f"{component.replace('-', '_')}_restarted"
    return scenario


apiserver_restarted = component_restarted("kube-apiserver")
etcd_restarted = component_restarted("etcd")

ALL: tuple[Callable[[World], Figures], ...] = (
    operator_killed_mid_reconcile,
    apiserver_restarted,
    etcd_restarted,
)
