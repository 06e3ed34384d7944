"""The churn soak: pod create/delete events over many namespaces and nodes against the real
apiserver, the operator and real agents, with TraceFilter edits interleaved; then every
node's kernel maps are compared with the desired state (reliability tier, issue 18).

Each namespace has two probes of one shape (counts of openat by pod): `picked` follows the
TraceFilter `picked` (edited between `group in [a]` and `group in [a, c]`), `group-b` selects
`group=b` itself. An anchor pod per group a and b on every node stays throughout, so every
probe stays on every node and its program ids must never change (no spec changes). The
other pods are created and deleted at random, bound to random nodes, without processes (the
maps are what is checked, not counts).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracekeeper_sim.kernel_maps import NodeMaps, node_maps, prog_map_ids
from tracekeeper_sim.world import (
    GROUP_PATH,
    FakePod,
    SimNode,
    World,
    condition,
    wait_bpf_gone,
    wait_until,
)

SPEC_BASE: dict[str, Any] = {
    "tracepoint": "syscalls:sys_enter_openat",
    "output": {"kind": "count", "by": ["pod"]},
}
GROUPS = ("a", "b", "c")
FILTER_VALUES = (["a"], ["a", "c"])


@dataclass
class ChurnSize:
    nodes: int
    namespaces: int
    events: int
    max_pods: int
    """Churned pods alive at once at most (anchors not included)."""
    filter_every: int
    """A TraceFilter edit after this many pod events."""


CI_SIZE = ChurnSize(nodes=3, namespaces=4, events=400, max_pods=40, filter_every=50)
FULL_SIZE = ChurnSize(nodes=4, namespaces=10, events=10_000, max_pods=150, filter_every=200)


@dataclass
class ChurnReport:
    pod_events: int = 0
    filter_edits: int = 0
    seconds: float = 0.0
    converged_after: float | None = None
    """Seconds from the last event until every node's maps were as desired (None: never)."""
    mismatches: list[str] = field(default_factory=list)
    programs_changed: list[str] = field(default_factory=list)
    operator_cpu_ms_per_event: float = 0.0
    rss_before: dict[str, int] = field(default_factory=dict)
    rss_after: dict[str, int] = field(default_factory=dict)
    """Process -> VmRSS in KiB, before the churn and after it converged."""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _filter_obj(values: list[str]) -> dict[str, Any]:
    selector = {"matchExpressions": [{"key": "group", "operator": "In", "values": values}]}
    return {
        "apiVersion": "tracekeeper.dev/v1alpha1",
        "kind": "TraceFilter",
        "metadata": {"name": "picked"},
        "spec": {"podSelector": selector},
    }


def _probe_obj(name: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "tracekeeper.dev/v1alpha1",
        "kind": "TraceProbe",
        "metadata": {"name": name},
        "spec": {**SPEC_BASE, **extra},
    }


PROBES: dict[str, dict[str, Any]] = {
    "picked": {"filterRef": "picked"},
    "group-b": {"filter": {"podSelector": {"matchLabels": {"group": "b"}}}},
}


class Churn:
    def __init__(self, world: World, size: ChurnSize, seed: int) -> None:
        self.world = world
        self.size = size
        self.rng = random.Random(seed)
        self.namespaces: list[str] = []
        self.filter_values: dict[str, list[str]] = {}
        self.group: dict[str, str] = {}
        """pod uid -> its group label."""
        self.churned: list[FakePod] = []
        self._serial = 0
        self.programs: dict[str, dict[str, tuple[int, ...]]] = {}
        """node -> probe id -> program ids, once every probe is Loaded."""
        self.held_programs: set[int] = set()
        self.held_maps: set[int] = set()
        """Every BPF program and map the agents held after the setup (claims included)."""

    # --- setup ----------------------------------------------------------------------------

    def setup(self) -> None:
        w = self.world
        nodes = [w.add_node(f"churn-{i}") for i in range(self.size.nodes)]
        self.namespaces = [w.namespace("churn") for _ in range(self.size.namespaces)]
        for ns in self.namespaces:
            for node in nodes:
                for g in ("a", "b"):
                    self._create(ns, node, g, anchor=True)
            self.filter_values[ns] = FILTER_VALUES[0]
            w.kube.create(
                f"{GROUP_PATH}/namespaces/{ns}/tracefilters", _filter_obj(FILTER_VALUES[0])
            )
            for name, extra in PROBES.items():
                w.kube.create(f"{GROUP_PATH}/namespaces/{ns}/traceprobes", _probe_obj(name, extra))
        for ns in self.namespaces:
            for name in PROBES:
                self._wait_ready(ns, name)
        self.converge(timeout=60)
        self.programs = {n: self._program_ids(node) for n, node in w.nodes.items()}
        for node in w.nodes.values():
            self.held_programs.update(node.agent.report()["cgroupClaims"]["programIds"])
        self.held_programs.update(
            i for probes in self.programs.values() for ids in probes.values() for i in ids
        )
        self.held_maps = {m for p in self.held_programs for m in prog_map_ids(p)}

    def _wait_ready(self, ns: str, name: str) -> None:
        wait_until(f"{ns}/{name} Ready", lambda: _ready(self.world.probe(ns, name)), timeout=180)

    def _create(self, ns: str, node: SimNode, group: str, *, anchor: bool = False) -> FakePod:
        self._serial += 1
        name = f"{'anchor' if anchor else 'pod'}-{group}-{self._serial}"
        pod = self.world.create_pod(ns, name, node, {"group": group}, run=False)
        self.group[pod.uid] = group
        if not anchor:
            self.churned.append(pod)
        return pod

    # --- the churn ------------------------------------------------------------------------

    def run(self, report: ChurnReport) -> None:
        w = self.world
        nodes = list(w.nodes.values())
        started = time.monotonic()
        for i in range(self.size.events):
            live = len(self.churned)
            create = live == 0 or (live < self.size.max_pods and self.rng.random() < 0.5)
            if create:
                ns = self.rng.choice(self.namespaces)
                self._create(ns, self.rng.choice(nodes), self.rng.choice(GROUPS))
            else:
                pod = self.churned.pop(self.rng.randrange(live))
                w.delete_pod(pod)
                del self.group[pod.uid]
            report.pod_events += 1
            if (i + 1) % self.size.filter_every == 0:
                ns = self.rng.choice(self.namespaces)
                values = (
                    FILTER_VALUES[1]
                    if self.filter_values[ns] == FILTER_VALUES[0]
                    else FILTER_VALUES[0]
                )
                w.kube.merge(
                    f"{GROUP_PATH}/namespaces/{ns}/tracefilters/picked",
                    {"spec": {"podSelector": _filter_obj(values)["spec"]["podSelector"]}},
                )
                self.filter_values[ns] = values
                report.filter_edits += 1
        report.seconds = time.monotonic() - started

    # --- what the kernel must hold ------------------------------------------------------------

    def desired(self, node: SimNode) -> dict[int, int]:
        """cgroup id of each targeted pod on `node` -> how many bindings target it."""
        out: dict[int, int] = {}
        for pod in self.world.pods:
            if pod.node is not node or pod.uid not in self.group:
                continue
            g = self.group[pod.uid]
            n = int(g in self.filter_values[pod.namespace]) + int(g == "b")
            if n:
                out[os.stat(pod.directory).st_ino] = n
        return out

    def _program_ids(self, node: SimNode) -> dict[str, tuple[int, ...]]:
        ours = set(self.namespaces)
        return {
            p["id"]: tuple(p["programIds"])
            for p in node.agent.report()["probes"]
            if p["id"].split("/")[0] in ours
        }

    def kernel_maps(self, node: SimNode) -> NodeMaps:
        claims = node.agent.report()["cgroupClaims"]["programIds"]
        return node_maps(claims[0], self._program_ids(node).values())

    def mismatches(self, node: SimNode) -> list[str]:
        desired = self.desired(node)
        held = self.kernel_maps(node)
        found: list[str] = []
        if set(held.identity) != set(desired):
            extra = sorted(set(held.identity) - set(desired))
            missing = sorted(set(desired) - set(held.identity))
            found.append(f"{node.name}: identity extra {extra[:5]} missing {missing[:5]}")
        for cg, n in desired.items():
            got = sum(held.bindings_of(cg).values())
            if got != n:
                found.append(f"{node.name}: cgroup {cg}: {got} bindings, want {n}")
        held_bits = sum(m.bit_count() for p in held.programs for m in p.masks.values())
        if held_bits != sum(desired.values()):
            found.append(f"{node.name}: {held_bits} binding bits set, want {sum(desired.values())}")
        return found

    def all_mismatches(self) -> list[str]:
        return [m for node in self.world.nodes.values() for m in self.mismatches(node)]

    def converge(self, timeout: float) -> float | None:
        """Seconds until no node has a mismatch (None: still some after `timeout`)."""
        started = time.monotonic()
        while True:
            if not self.all_mismatches():
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                return None
            time.sleep(0.25)

    def changed_programs(self) -> list[str]:
        now = {n: self._program_ids(node) for n, node in self.world.nodes.items()}
        return [
            f"{n}/{probe}: {ids} -> {now[n].get(probe)}"
            for n, probes in self.programs.items()
            for probe, ids in probes.items()
            if now[n].get(probe) != ids
        ]

    def leftovers(self, timeout: float = 30.0) -> set[str]:
        """The agents' programs and maps the kernel still lists (after the world closed)."""
        return wait_bpf_gone(self.held_programs, self.held_maps, timeout)


def _ready(obj: dict[str, Any] | None) -> bool:
    ready = condition(obj, "Ready")
    return ready is not None and ready["status"] == "True"


def processes(world: World) -> dict[str, int]:
    """Process name -> pid of the operator and every agent of the world."""
    assert world.operator is not None
    procs = {"operator": world.operator.pid}
    for name, node in world.nodes.items():
        assert node.agent.popen is not None
        procs[f"agent {name}"] = node.agent.popen.pid
    return procs


def soak(churn: Churn) -> ChurnReport:
    """Set up, churn, wait for the maps to converge; the report says what was found."""
    world = churn.world
    churn.setup()
    report = ChurnReport()
    procs = processes(world)
    report.rss_before = {p: rss_kib(pid) for p, pid in procs.items()}
    cpu_before = cpu_seconds(procs["operator"])
    churn.run(report)
    report.converged_after = churn.converge(timeout=120)
    report.operator_cpu_ms_per_event = (
        (cpu_seconds(procs["operator"]) - cpu_before) * 1000 / max(report.pod_events, 1)
    )
    report.mismatches = churn.all_mismatches()
    report.programs_changed = churn.changed_programs()
    report.rss_after = {p: rss_kib(pid) for p, pid in procs.items()}
    return report


def describe(report: ChurnReport) -> str:
    return json.dumps(report.__dict__, indent=1, default=str)
