"""Faults on the control plane (issue 18's chaos, the cluster's part), in the e2e world (a
real apiserver and etcd, the operator and two agents as processes, real BPF programs): the
operator SIGKILLed mid-reconcile, mid-delete and with a push in flight, an agent's state
directory full as the probes' statuses show it, the apiserver and etcd SIGKILLed and
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

from reliability.agent_chaos import (
    GONE_SECONDS,
    Figures,
    check,
    check_holds,
    fill,
    held_bpf_ids,
    small_filesystem,
)
from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.protocol import spec_hash
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


NODES = ("chaos-node", "chaos-node-2")
"""The scenarios' pods run on the first; the push in flight is to both."""


@contextlib.contextmanager
def control_world(cluster: LocalCluster, workdir: Path) -> Iterator[World]:
    """Two simulated nodes (agent processes) and the operator on `cluster`, CRDs applied."""
    cluster.apply_crds(CRDS)
    workdir.mkdir(parents=True, exist_ok=True)
    world = World(cluster, workdir, detect_root())
    try:
        for name in NODES:
            world.add_node(name)
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


def truthful(world: World, ns: str, name: str, pods: int, nodes: int = 1) -> dict[str, Any] | None:
    """The probe's status says what the nodes run: Ready, the generation observed, `nodes`
    nodes targeted and loaded, `pods` pods."""
    obj = world.probe(ns, name)
    ready = condition(obj, "Ready")
    if not obj or ready is None or ready["status"] != "True":
        return None
    status = obj["status"]
    ok = (
        status.get("observedGeneration") == obj["metadata"]["generation"]
        and status.get("nodes") == {"targeted": nodes, "loaded": nodes, "failed": 0}
        and status.get("targets", {}).get("pods") == pods
    )
    return obj if ok else None


def wait_truthful(world: World, ns: str, names: list[str], pods: int, nodes: int = 1) -> None:
    wait_until(f"{names} truthful (Ready, {pods} pods on {nodes} nodes)",
               lambda: all(truthful(world, ns, n, pods, nodes) for n in names),
               timeout=WAIT, describe=lambda: statuses(world, ns, names))  # fmt: skip


def statuses(world: World, ns: str, names: list[str]) -> str:
    """The probes' statuses and the operator's log, for a failure message."""
    return (
        "\n".join(f"{n}: {json.dumps((world.probe(ns, n) or {}).get('status'))}" for n in names)
        + f"\noperator log:\n{world.operator_log_tail()}"
    )


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
    """The node the single-node scenarios put their pods on (the other runs none of them)."""
    return world.nodes[NODES[0]]


@contextlib.contextmanager
def counted(figures: Figures, *nodes: SimNode) -> Iterator[set[int]]:
    """Program counts around a scenario; the programs it saw must be gone at the end."""
    figures.programs_before = len(bpf_prog_ids())
    seen: set[int] = set()
    yield seen
    left = wait_bpf_gone(seen, set(), GONE_SECONDS)
    figures.leaked = len(left)
    figures.programs_after = len(bpf_prog_ids())
    figures.agent_programs = sum(len(held_bpf_ids(agent_pid(n))[0]) for n in nodes)
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


EDIT_TRACEPOINTS = {
    # probe -> its tracepoint before the edit, after the edit, after the edit made while the
    # operator is dead; each a shape of its own (a compile), none used by other scenarios.
    "a": ("syscalls:sys_enter_getuid", "syscalls:sys_enter_geteuid", "syscalls:sys_enter_getgid"),
    "b": ("syscalls:sys_enter_getpid", "syscalls:sys_enter_gettid", "syscalls:sys_enter_gettid"),
}


def revision_on_disk(node: SimNode) -> int:
    """The revision the agent saved, before its kernel work: it received that push."""
    try:
        return int(json.loads((node.agent.state_dir / "state.json").read_text())["revision"])
    except (OSError, ValueError, KeyError):
        return 0


def wanted_hashes(world: World, ns: str, names: list[str]) -> dict[str, str]:
    """probe id -> the spec hash of the probe as the apiserver holds it now (count probes:
    no budget default enters the spec the operator sends)."""
    out = {}
    for name in names:
        obj = world.probe(ns, name)
        check(obj is not None, f"{ns}/{name} is gone")
        out[f"{ns}/{name}"] = spec_hash(TraceProbeSpec.model_validate(obj["spec"]))
    return out


def held(node: SimNode, ns: str) -> dict[str, tuple[str, str]]:
    """probe id -> (spec hash, state) of what the agent reports for namespace `ns`."""
    return {
        p["id"]: (p["specHash"], p["state"])
        for p in node.agent.report()["probes"]
        if p["id"].startswith(f"{ns}/")
    }


def runs(node: SimNode, ns: str, wanted: dict[str, str]) -> bool:
    """The agent holds exactly these probes of `ns`, at these spec hashes, all Loaded."""
    return held(node, ns) == {pid: (h, "Loaded") for pid, h in wanted.items()}


def operator_killed_mid_push(world: World) -> Figures:
    """SIGKILL the operator while it pushes an edit to the agents (a node has saved the new
    revision, its answer not sent: the agent is compiling), edit again while it is dead,
    start it again: every agent ends at the desired state, at a revision the new operator
    sent; no status says Ready before its nodes run that spec; the unchanged probe keeps
    its program and traces on; every finalizer is released; nothing is left."""
    figures = Figures("operator SIGKILL mid-push")
    nodes = [world.nodes[n] for n in NODES]
    ns = world.namespace("chaos-push")
    for i, node in enumerate(nodes):
        world.create_pod(ns, f"web-{i}", node, {"app": "web"})
    names = ["opens", *EDIT_TRACEPOINTS]

    def objs(step: int) -> list[dict[str, Any]]:
        edited = [probe_obj(n, tps[step], "web") for n, tps in EDIT_TRACEPOINTS.items()]
        return [probe_obj("opens", TRACEPOINTS[0], "web"), *edited]

    with counted(figures, *nodes) as seen:
        apply(world, ns, *objs(0))
        wait_truthful(world, ns, names, pods=len(nodes), nodes=len(nodes))
        before = {n.name: n.agent.report()["revision"] for n in nodes}
        opens = {n.name: loaded_ids(n, ns)[f"{ns}/opens"] for n in nodes}
        for n in nodes:
            seen.update(i for ids in loaded_ids(n, ns).values() for i in ids)

        apply(world, ns, *objs(1))

        def in_flight() -> list[str]:
            """Nodes that saved a newer revision than they report (mid-push)."""
            return [
                n.name
                for n in nodes
                if revision_on_disk(n) > before[n.name] == n.agent.report()["revision"]
            ]

        # Poll tight: the window is the agent's compiles (about 1 s each here).
        deadline = time.monotonic() + WAIT
        while not (flying := in_flight()) and time.monotonic() < deadline:
            time.sleep(0.01)
        world.kill_operator()
        check(bool(flying), "no push was seen in flight: the edit reached no agent mid-push")
        at_kill = {n.name: revision_on_disk(n) for n in nodes}
        figures.notes.append(
            f"killed with the push in flight to {len(flying)} of {len(nodes)} agents"
        )
        # What the dead operator cannot know: the agents must be sent this by its successor.
        apply(world, ns, *objs(2))
        wanted = wanted_hashes(world, ns, names)

        started = time.monotonic()
        world.start_operator()
        converged: float | None = None

        def settled() -> bool:
            nonlocal converged
            for name in names:  # never Ready before the nodes run that spec
                obj = truthful(world, ns, name, pods=len(nodes), nodes=len(nodes))
                pid = f"{ns}/{name}"
                running = [held(n, ns).get(pid) == (wanted[pid], "Loaded") for n in nodes]
                check(obj is None or all(running),
                      f"{pid} Ready at generation {obj and obj['metadata']['generation']} "
                      f"before every node runs it: {statuses(world, ns, [name])}")  # fmt: skip
            if converged is None and all(runs(n, ns, wanted) for n in nodes):
                converged = time.monotonic() - started
            return converged is not None and all(
                truthful(world, ns, n, pods=len(nodes), nodes=len(nodes)) for n in names
            )

        def describe() -> str:
            agents = {n.name: (n.agent.report()["revision"], loaded_ids(n, ns)) for n in nodes}
            return f"wanted {wanted}; agents {agents}\n{statuses(world, ns, names)}"

        wait_until("every agent at the desired state, statuses truthful", settled,
                   timeout=WAIT, describe=describe)  # fmt: skip
        truthful_at = time.monotonic() - started
        assert converged is not None
        figures.resume_seconds = converged
        figures.notes.append(
            f"agents at the desired state {converged:.2f} s after the restart, every status "
            f"truthful at {truthful_at:.2f} s (resync every 1 s)"
        )
        for n in nodes:
            report = n.agent.report()
            check(
                report["revision"] > at_kill[n.name],
                f"{n.name} at revision {report['revision']}, not past {at_kill[n.name]} (the "
                "one it held at the kill): the restarted operator sent it nothing",
            )
            ids = loaded_ids(n, ns)
            check(
                ids[f"{ns}/opens"] == opens[n.name],
                f"{n.name}: the unchanged probe was reloaded: {opens[n.name]} -> {ids}",
            )
            seen.update(i for v in ids.values() for i in v)
            check_holds(agent_pid(n), report, f"{n.name} after the operator's restart")
        counted_before = hits(nodes[0], ns, "opens")
        wait_until("the unchanged probe tracing on",
                   lambda: hits(nodes[0], ns, "opens") > counted_before, timeout=WAIT)  # fmt: skip
        delete_all(world, ns, names)
    return figures


def state_not_saved_on_the_status(world: World) -> Figures:
    """The node's state directory fills (a small tmpfs mounted over it): every probe loaded
    there says so (Persisted=False, StateNotSaved, the agent's text; a Warning Event),
    still Ready and tracing; once there is room again it clears (StateSaved) within the
    agent's 2 s poll and one resync."""
    figures = Figures("agent state directory full, on the status")
    node = only_node(world)
    ns = world.namespace("chaos-disk")
    world.create_pod(ns, "web-0", node, {"app": "web"})
    names = ["opens", "ppid"]

    def persisted(name: str) -> tuple[str, str, str] | None:
        c = condition(world.probe(ns, name), "Persisted")
        return None if c is None else (c["status"], c["reason"], c.get("message", ""))

    def event_reasons(name: str) -> list[str]:
        """Its State* Events, sorted (listed by generated name, not by time)."""
        return sorted(
            e["reason"] for e in world.events(ns, name) if e["reason"].startswith("State")
        )

    with counted(figures, node) as seen:
        apply(world, ns, probe_obj("opens", TRACEPOINTS[0], "web"),
              probe_obj("ppid", TRACEPOINTS[1], "web"))  # fmt: skip
        wait_truthful(world, ns, names, pods=1)
        seen.update(i for ids in loaded_ids(node, ns).values() for i in ids)
        check(all(persisted(n) == ("True", "StateSaved", "") for n in names),
              f"saved, yet {[persisted(n) for n in names]}")  # fmt: skip
        with small_filesystem(node.agent.state_dir):
            filler = fill(node.agent.state_dir)
            world.create_pod(ns, "web-1", node, {"app": "web"})  # a push it cannot save

            def said() -> bool:
                return all(
                    (p := persisted(n)) is not None
                    and p[:2] == ("False", "StateNotSaved")
                    and f"{node.name}: " in p[2]
                    and "No space left on device" in p[2]
                    for n in names
                ) and all(truthful(world, ns, n, pods=2) for n in names)

            wait_until("StateNotSaved on every probe of the node, still Ready", said,
                       timeout=WAIT, describe=lambda: statuses(world, ns, names))  # fmt: skip
            wait_until("a StateNotSaved Event on each",
                       lambda: all(event_reasons(n) == ["StateNotSaved"] for n in names),
                       timeout=WAIT)  # fmt: skip
            counted_before = hits(node, ns, "opens")
            wait_until("tracing on while full",
                       lambda: hits(node, ns, "opens") > counted_before, timeout=WAIT)  # fmt: skip
            filler.unlink()
            freed = time.monotonic()
            wait_until("Persisted again once there is room",
                       lambda: all(persisted(n) == ("True", "StateSaved", "") for n in names),
                       timeout=WAIT, describe=lambda: statuses(world, ns, names))  # fmt: skip
            figures.resume_seconds = time.monotonic() - freed
            wait_until("a StateSaved Event on each",
                       lambda: all(event_reasons(n) == ["StateNotSaved", "StateSaved"]
                                   for n in names), timeout=WAIT)  # fmt: skip
            wait_until("the state file at the revision the agent runs", lambda: on_disk(node),
                       timeout=WAIT)  # fmt: skip
        figures.notes.append(
            "resume: room back (the filler removed) to Persisted=True on every probe of the "
            "node (the agent's 2 s poll saves, the operator's 1 s resync reads it)"
        )
        # The directory under the tmpfs holds an older file: the delete's push replaces it.
        delete_all(world, ns, names)
        wait_until("the node's own state directory at the revision the agent runs",
                   lambda: on_disk(node), timeout=WAIT)  # fmt: skip
    return figures


def on_disk(node: SimNode) -> bool:
    """The agent's state file holds the revision it runs, and its report says it is saved."""
    report = node.agent.report()
    return revision_on_disk(node) == report["revision"] and "error" not in report["persisted"]


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
    operator_killed_mid_push,
    state_not_saved_on_the_status,
    apiserver_restarted,
    etcd_restarted,
)
