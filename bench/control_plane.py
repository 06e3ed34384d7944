"""Control-plane latency against the real apiserver, operator and agents.

The e2e world (tests/e2e/agents.py): kube-apiserver + etcd (LocalCluster), the CRDs, M
simulated nodes (a Node object, an agent Pod object and a real `tracekeeper-agent serve`
process each, all loading BPF programs into this kernel), the operator as its own process,
and "kubelet" pods: Pod objects whose status gets container IDs, with real cgroups.

1. apply-to-Ready: one pod per node (running a real process), in a handful of namespaces;
   N TraceProbes (count by pod of one of six cheap syscall tracepoints) applied at once with one
   `kubectl apply` of a multi-document file. Half select a pair of pods (2 nodes), half one
   pod (1 node), so each probe is compiled on 1-2 nodes, as the operator only sends a probe
   to nodes hosting its selected pods. The TraceProbe list is read every 100 ms; per probe,
   the first read that shows Ready=True, measured from the start of the apply.
2. pod-created-to-map-entry under churn: a few more probes select role=churn, loaded on
   every node (one resident churn pod per node). Then a burst of pods with that label is
   created round-robin over the nodes (Pod POST, cgroups, status with container IDs),
   each deleted a few seconds after its creation. Per pod, the time until its pod cgroup
   id is a key of its node's identity table (tk_identity, shared by every program there:
   written once a binding needs the pod), read directly from the kernel
   (bpf_map_lookup_elem on the map found through the program ids the agent reports in
   GET /v1/state), polled every 5 ms; after the delete, the time until it is gone from
   all. The operator's push counter before and after the burst shows the coalescing.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import Table, met, percentile, require_root
from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_sim import kernel_maps
from tracekeeper_sim.local_cluster import LocalCluster, build_binaries
from tracekeeper_sim.world import (
    GROUP_PATH,
    FakePod,
    SimNode,
    World,
    condition,
    samples,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
NAMESPACES = 4
# All simulated nodes share this one kernel, which attaches at most 64 BPF programs to one
# tracepoint (BPF_TRACE_MAX_PROGS; more fail with E2BIG, reported as AttachFailed): the
# probes are spread over cheap syscalls so that no tracepoint carries more than 64.
TRACEPOINTS = tuple(
    f"syscalls:sys_enter_{name}"
    for name in ("getppid", "getpid", "getuid", "geteuid", "getgid", "getegid")
)
CHURN_TRACEPOINTS = ("syscalls:sys_enter_gettid", "syscalls:sys_enter_getpgrp")
POLL_READY = 0.1
POLL_MAP = 0.005


def say(text: str) -> None:
    print(f"[control_plane] {text}", flush=True)


def probe_doc(namespace: str, name: str, tracepoint: str, labels: dict[str, str]) -> str:
    return json.dumps(
        {
            "apiVersion": "tracekeeper.dev/v1alpha1",
            "kind": "TraceProbe",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "tracepoint": tracepoint,
                "filter": {"podSelector": {"matchLabels": labels}},
                "output": {"kind": "count", "by": ["pod"]},
            },
        }
    )


def ready_probes(world: World) -> dict[str, dict[str, Any]]:
    """Every TraceProbe by namespace/name."""
    items: list[dict[str, Any]] = world.kube.get(f"{GROUP_PATH}/traceprobes")["items"]
    return {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p for p in items}


def is_ready(obj: dict[str, Any]) -> bool:
    c = condition(obj, "Ready")
    return c is not None and c["status"] == "True"


def agent_rss_mib(world: World) -> list[float]:
    out = []
    for node in world.nodes.values():
        popen = node.agent.popen
        if popen is None:
            continue
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{popen.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.append(int(line.split()[1]) / 1024)
    return out


# --- the kernel's view of a filter map ------------------------------------------------------


class FilterMap:
    """A node's identity table (tk_identity, cgroup id -> pod slot), opened by id (libbpf),
    looked up by cgroup id."""

    _lib = ctypes.CDLL("libbpf.so.1", use_errno=True)

    def __init__(self, map_id: int) -> None:
        self.fd = int(self._lib.bpf_map_get_fd_by_id(ctypes.c_uint32(map_id)))
        if self.fd < 0:
            raise OSError(-self.fd, f"bpf_map_get_fd_by_id({map_id})")
        self._value = ctypes.create_string_buffer(1 << 16)

    def has(self, cgroup_id: int) -> bool:
        key = ctypes.c_uint64(cgroup_id)
        return int(self._lib.bpf_map_lookup_elem(self.fd, ctypes.byref(key), self._value)) == 0

    def close(self) -> None:
        os.close(self.fd)


def filter_map_of(node: SimNode, probe_id: str) -> FilterMap:
    """The identity table the program reported for `probe_id` reads (the node's)."""
    outcome = node.agent.outcome(probe_id)
    assert outcome is not None and outcome["programIds"], f"{node.name}: {probe_id}: {outcome}"
    for prog_id in outcome["programIds"]:
        with contextlib.suppress(LookupError):  # whichever of its programs reads it
            return FilterMap(kernel_maps.map_named(prog_id, kernel_maps.IDENTITY_MAP))
    raise AssertionError(f"{node.name}: {probe_id}: no {kernel_maps.IDENTITY_MAP} map")


# --- 1. apply-to-Ready --------------------------------------------------------------------


@dataclass
class ApplyResult:
    probes: int
    nodes: int
    assignments: int
    apply_seconds: float
    latencies: list[float]
    """From the start of the apply."""
    from_listed: list[float]
    """From the first list read that showed the probe (it exists) to the first showing Ready."""
    from_created: list[float]
    """From kubectl's own POST of the probe (answered 201, read from its -v=6 log) to Ready."""
    not_ready: dict[str, str]
    compiles: dict[str, int] = field(default_factory=dict)
    """Per node: programs compiled during the round (one per shape, not one per probe)."""


def compiles(nodes: Sequence[SimNode]) -> dict[str, int]:
    """Programs each agent compiled so far (its compile histogram's count)."""
    out = {}
    for node in nodes:
        found = [
            v
            for labels, v in samples(
                node.agent.metrics(), "tracekeeper_agent_compile_seconds_count"
            )
        ]
        out[node.name] = int(sum(found))
    return out


def apply_to_ready(
    world: World,
    namespaces: Sequence[str],
    nodes: Sequence[SimNode],
    probes: int,
    timeout: float,
    *,
    prefix: str = "tp",
    create_pods: bool = True,
) -> ApplyResult:
    """`create_pods`: the first round; a later one (another prefix) applies probes of the
    shapes the first loaded (the same tracepoints and outputs): no compile."""
    m = len(nodes)
    before = compiles(nodes)
    for i, node in enumerate(nodes):
        if not create_pods:
            break
        ns = namespaces[(i // 2) % len(namespaces)]
        world.create_pod(ns, f"app-{i:02d}", node, {"pair": f"p{i // 2}", "slot": f"s{i}"})
    docs = []
    assignments = 0
    for j in range(probes):
        if j % 2 == 0:
            pair = (j // 2) % (m // 2) if m >= 2 else 0
            ns, labels = namespaces[pair % len(namespaces)], {"pair": f"p{pair}"}
            assignments += 2 if m >= 2 else 1
        else:
            slot = (j // 2) % m
            ns, labels = namespaces[(slot // 2) % len(namespaces)], {"slot": f"s{slot}"}
            assignments += 1
        docs.append(probe_doc(ns, f"{prefix}-{j:03d}", TRACEPOINTS[j % len(TRACEPOINTS)], labels))
    names = {
        json.loads(d)["metadata"]["namespace"] + "/" + json.loads(d)["metadata"]["name"]
        for d in docs
    }
    say(f"applying {probes} TraceProbes ({assignments} probe x node assignments)")
    applied: list[float] = []
    posted: list[float] = []

    def apply() -> None:  # in a thread: the list is polled while kubectl creates the objects
        res = world.cluster.kubectl(
            "apply", "-v=6", "-f", "-", input="\n---\n".join(docs), check=True
        )
        applied.append(time.monotonic() - started)
        posted.extend(t - started for t in creates_in(res.stderr, wall0, started))

    started = time.monotonic()
    wall0 = time.time() - (time.monotonic() - started)
    applier = threading.Thread(target=apply, daemon=True)
    applier.start()
    seen: dict[str, float] = {}
    created: dict[str, float] = {}
    last: dict[str, dict[str, Any]] = {}
    deadline = started + timeout
    while len(seen) < len(names) and time.monotonic() < deadline:
        now = time.monotonic()
        last = ready_probes(world)
        for key, obj in last.items():
            if key in names:
                created.setdefault(key, now - started)
                if key not in seen and is_ready(obj):
                    seen[key] = now - started
        time.sleep(max(0.0, POLL_READY - (time.monotonic() - now)))
    applier.join()
    apply_seconds = applied[0] if applied else float("nan")
    not_ready = {}
    for key in names - seen.keys():
        c = condition(last.get(key), "Ready")
        not_ready[key] = c.get("reason", "?") if c else "no condition"
    from_list = sorted(seen[k] - created[k] for k in seen)
    order = [
        json.loads(d)["metadata"]["namespace"] + "/" + json.loads(d)["metadata"]["name"]
        for d in docs
    ]
    # kubectl creates the documents in file order: the k-th 201 is the k-th document's.
    created_at = dict(zip(order, posted, strict=False)) if len(posted) == len(order) else {}
    from_created = sorted(seen[k] - created_at[k] for k in seen if k in created_at)
    after = compiles(nodes)
    return ApplyResult(
        probes,
        m,
        assignments,
        apply_seconds,
        sorted(seen.values()),
        from_list,
        from_created,
        not_ready,
        {n: after[n] - before[n] for n in after},
    )


_KLOG_TIME = re.compile(r"^[IWEF]\d{4} (\d\d):(\d\d):(\d\d)\.(\d{6})")


def creates_in(log: str, wall0: float, mono0: float) -> list[float]:
    """Monotonic times of the TraceProbe POSTs kubectl's -v=6 log shows answered 201, in
    order. klog stamps local time of day: anchored on the day of `wall0` (the monotonic
    clock read `mono0` then), a time before it by hours is the next day's."""
    start = datetime.fromtimestamp(wall0)
    midnight = start.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    out = []
    for line in log.splitlines():
        if "POST" not in line or "/traceprobes" not in line or "201" not in line:
            continue
        stamp = _KLOG_TIME.match(line)
        if stamp is None:
            continue
        h, mi, sec, us = (int(g) for g in stamp.groups())
        wall = midnight + h * 3600 + mi * 60 + sec + us / 1e6
        if wall < wall0 - 3600:
            wall += 86400
        out.append(mono0 + wall - wall0)
    return out


# --- 2. pod churn -------------------------------------------------------------------------


@dataclass
class Tracked:
    pod: FakePod
    maps: list[FilterMap]
    cgroup_id: int
    created: float
    """Before the Pod POST."""
    status_done: float
    """After the kubelet status (container IDs) was written."""
    in_maps: float | None = None
    deleted: float | None = None
    gone: float | None = None


@dataclass
class ChurnResult:
    pods: int
    nodes: int
    seconds: float
    life: float
    tracked: list[Tracked]
    pushes: dict[str, float]
    reconciles: float
    renders: float
    settle_seconds: float
    lag: float
    notes: list[str] = field(default_factory=list)


def poll_maps(pending: list[Tracked], lock: threading.Lock, stop: threading.Event) -> None:
    while not stop.is_set():
        with lock:
            todo = [t for t in pending if t.in_maps is None or (t.deleted and t.gone is None)]
        for t in todo:
            now = time.monotonic()
            if t.in_maps is None:
                if all(m.has(t.cgroup_id) for m in t.maps):
                    t.in_maps = now
            elif t.deleted is not None and not any(m.has(t.cgroup_id) for m in t.maps):
                t.gone = now
        stop.wait(POLL_MAP)


def pod_churn(
    world: World, nodes: Sequence[SimNode], pods: int, seconds: float, life: float
) -> ChurnResult:
    ns = world.namespace("cpchurn")
    for i, node in enumerate(nodes):
        world.create_pod(ns, f"resident-{i:02d}", node, {"role": "churn"}, run=False)
    docs = [
        probe_doc(ns, f"churn-{k}", tp, {"role": "churn"}) for k, tp in enumerate(CHURN_TRACEPOINTS)
    ]
    world.cluster.kubectl("apply", "-f", "-", input="\n---\n".join(docs), check=True)
    probe_ids = [f"{ns}/churn-{k}" for k in range(len(CHURN_TRACEPOINTS))]
    say(f"waiting for {len(probe_ids)} churn probes on {len(nodes)} nodes")
    wait_until(
        "churn probes Ready",
        lambda: all(is_ready(world.probe(ns, p.split("/")[1]) or {}) for p in probe_ids),
        timeout=240,
    )
    maps = {n.name: [filter_map_of(n, p) for p in probe_ids] for n in nodes}
    time.sleep(2.0)  # let resyncs and status writes of the load settle
    pushes_before = {
        o: world.operator_metric("tracekeeper_operator_pushes_total", outcome=o)
        for o in ("ok", "error", "stale")
    }
    reconciles_before = world.operator_metric("tracekeeper_operator_reconciles_total")
    renders_before = world.operator_metric("tracekeeper_operator_renders_total")

    tracked: list[Tracked] = []
    lock = threading.Lock()
    stop = threading.Event()
    poller = threading.Thread(target=poll_maps, args=(tracked, lock, stop), daemon=True)
    poller.start()
    interval = seconds / pods
    start = time.monotonic()
    # (due, kind, index): creates every `interval`, each delete `life` after its create.
    schedule = sorted(
        [(k * interval, 0, k) for k in range(pods)]
        + [(k * interval + life, 1, k) for k in range(pods)]
    )
    lag = 0.0
    by_index: dict[int, Tracked] = {}
    say(
        f"burst: {pods} pods over {seconds:.0f} s on {len(nodes)} nodes, each deleted after "
        f"{life:.0f} s"
    )
    try:
        for due, kind, k in schedule:
            wait = start + due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            lag = max(lag, -wait)
            if kind == 0:
                node = nodes[k % len(nodes)]
                created = time.monotonic()
                pod = world.create_pod(ns, f"burst-{k:03d}", node, {"role": "churn"}, run=False)
                t = Tracked(
                    pod, maps[node.name], os.stat(pod.directory).st_ino, created, time.monotonic()
                )
                by_index[k] = t
                with lock:
                    tracked.append(t)
            else:
                t = by_index[k]
                t.deleted = time.monotonic()
                world.delete_pod(t.pod)
        end = time.monotonic()
        deadline = end + 60
        while time.monotonic() < deadline and any(
            t.in_maps is None or t.gone is None for t in tracked
        ):
            time.sleep(0.05)
        settle = time.monotonic() - end
    finally:
        stop.set()
        poller.join()
        for node_maps in maps.values():
            for fm in node_maps:
                fm.close()
    time.sleep(1.0)  # the last coalesced push's metric
    pushes = {
        o: world.operator_metric("tracekeeper_operator_pushes_total", outcome=o) - b
        for o, b in pushes_before.items()
    }
    return ChurnResult(
        pods,
        len(nodes),
        seconds,
        life,
        tracked,
        pushes,
        world.operator_metric("tracekeeper_operator_reconciles_total") - reconciles_before,
        world.operator_metric("tracekeeper_operator_renders_total") - renders_before,
        settle,
        lag,
    )


# --- tables -------------------------------------------------------------------------------


def stats_row(label: str, values: Sequence[float], size: str, note: str) -> list[str]:
    if not values:
        return [label, size, "0", "-", "-", "-", "none", "-", note]
    return [
        label,
        size,
        str(len(values)),
        f"{percentile(values, 50) * 1e3:,.0f}",
        f"{percentile(values, 99) * 1e3:,.0f}",
        f"{max(values) * 1e3:,.0f}",
        "none",
        "-",
        note,
    ]


WARM_GOAL_SECONDS = 2.0
"""apply -> Ready p99 when the probes' shapes are loaded on their nodes already."""
COLUMNS = ["measure", "size", "samples", "p50 ms", "p99 ms", "max ms", "goal", "met?", "notes"]


def tables(
    apply: ApplyResult, warm: ApplyResult, churn: ChurnResult, rss: list[float]
) -> list[Table]:
    sizes = Table("control plane: what ran", ["item", "value"])
    sizes.add("simulated nodes (real agent processes)", apply.nodes)
    sizes.add("apply-to-Ready: TraceProbes applied at once", apply.probes)
    sizes.add("apply-to-Ready: probe x node assignments", apply.assignments)
    per_node = sorted(apply.compiles.values())
    sizes.add(
        "apply-to-Ready: compiles per node, cold (min / max / sum)",
        f"{per_node[0]} / {per_node[-1]} / {sum(per_node)}" if per_node else "-",
    )
    warm_per_node = sorted(warm.compiles.values())
    sizes.add(
        "apply-to-Ready: compiles per node, shapes loaded (min / max / sum)",
        f"{warm_per_node[0]} / {warm_per_node[-1]} / {sum(warm_per_node)}"
        if warm_per_node
        else "-",
    )
    sizes.add("apply-to-Ready: workload pods (1 per node, real process)", apply.nodes)
    sizes.add("apply-to-Ready: tracepoints (probes spread round-robin)", len(TRACEPOINTS))
    sizes.add("churn: probes selecting the churn pods (on every node)", len(CHURN_TRACEPOINTS))
    sizes.add("churn: pods created (and deleted)", churn.pods)
    sizes.add(
        "agent RSS at the end, MiB (min / max / sum)",
        f"{min(rss):.0f} / {max(rss):.0f} / {sum(rss):,.0f}" if rss else "-",
    )

    ready = Table(
        "apply-to-Ready (kubectl apply start -> Ready=True seen, polled every 100 ms)", COLUMNS
    )
    size = f"{apply.probes} probes / {apply.nodes} nodes"
    reasons = Counter(apply.not_ready.values())
    ready.add(
        *stats_row(
            "apply -> Ready",
            apply.latencies,
            size,
            f"{len(apply.latencies)}/{apply.probes} Ready"
            + (f"; not Ready at the deadline: {dict(reasons)}" if reasons else ""),
        )
    )
    warm_reasons = Counter(warm.not_ready.values())
    ready.add(
        *stats_row(
            "apply -> Ready, shapes loaded",
            warm.latencies,
            f"{warm.probes} probes / {warm.nodes} nodes",
            f"{len(warm.latencies)}/{warm.probes} Ready"
            + (f"; not Ready at the deadline: {dict(warm_reasons)}" if warm_reasons else "")
            + f"; from the start of one kubectl apply of all {warm.probes}, which creates them"
            f" one by one ({warm.apply_seconds * 1e3:,.0f} ms)",
        )
    )
    warm_row = stats_row(
        "created -> Ready, shapes loaded",
        warm.from_created,
        f"{warm.probes} probes / {warm.nodes} nodes",
        "per probe, from kubectl's POST of it (answered 201, its -v=6 log) to Ready seen"
        + (
            f"; {len(warm.from_created)} of {warm.probes} POSTs found"
            if len(warm.from_created) != len(warm.latencies)
            else ""
        ),
    )
    p99 = percentile(warm.from_created, 99) if warm.from_created else float("inf")
    warm_row[COLUMNS.index("goal")] = f"p99 <= {WARM_GOAL_SECONDS:.0f} s"
    warm_row[COLUMNS.index("met?")] = met(p99 <= WARM_GOAL_SECONDS)
    ready.add(*warm_row)
    ready.add(
        *stats_row(
            "first listed -> Ready, shapes loaded",
            warm.from_listed,
            f"{warm.probes} probes / {warm.nodes} nodes",
            "per probe, from the first list read that showed it",
        )
    )
    ready.add(
        *stats_row(
            "created -> Ready",
            apply.from_created,
            size,
            "per probe, from kubectl's POST of it",
        )
    )
    ready.add(
        *stats_row(
            "first listed -> Ready",
            apply.from_listed,
            size,
            "per probe, from the first list read that showed it",
        )
    )
    ready.notes += [
        f"the list is read every {POLL_READY * 1e3:.0f} ms while kubectl runs; kubectl apply of "
        f"the {apply.probes}-document file itself took {apply.apply_seconds * 1e3:,.0f} ms "
        "(one GET and one POST per object, against an apiserver sharing 2 cores with "
        f"{apply.nodes} agents compiling); first probe Ready at "
        + (f"{apply.latencies[0] * 1e3:,.0f} ms" if apply.latencies else "-"),
        f"cold: {sum(apply.compiles.values())} program compiles for {apply.assignments} probe x "
        f"node assignments (one per shape per node: probes of one shape share a program; "
        f"~1 s of CPU each, one at a time per agent) across {apply.nodes} agents on 2 shared "
        "cores: the cold tail is the compile queue",
        f"shapes loaded: {warm.probes} more probes of the same shapes (other names, same pods): "
        f"{sum(warm.compiles.values())} compiles, map writes only",
    ]

    t = churn.tracked
    add = [x.in_maps - x.created for x in t if x.in_maps is not None]
    add_status = [x.in_maps - x.status_done for x in t if x.in_maps is not None]
    create_cost = [x.status_done - x.created for x in t]
    gone = [x.gone - x.deleted for x in t if x.gone is not None and x.deleted is not None]
    csize = f"{churn.pods} pods / {churn.nodes} nodes / {churn.seconds:.0f} s"
    lat = Table(
        f"pod-created-to-map-entry under churn (direct bpf_map_lookup_elem on each churn "
        f"node's identity table, every {POLL_MAP * 1e3:.0f} ms)",
        COLUMNS,
    )
    lat.add(*stats_row("Pod POST -> in all churn maps", add, csize, f"{len(add)}/{len(t)} seen"))
    lat.add(
        *stats_row(
            "status written -> in all churn maps",
            add_status,
            csize,
            "after the kubelet's status with container IDs",
        )
    )
    lat.add(
        *stats_row(
            "(Pod POST + mkdir + status write)",
            create_cost,
            csize,
            "the simulated kubelet's own time",
        )
    )
    lat.add(
        *stats_row(
            "Pod DELETE -> gone from all maps",
            gone,
            csize,
            f"{len(gone)}/{len(t)} seen; pods deleted {churn.life:.0f} s after create",
        )
    )
    lat.notes += [
        f"each pod deleted {churn.life:.0f} s after its creation, so creates and deletes "
        f"interleave; the driver fell behind its schedule by at most {churn.lag * 1e3:,.0f} ms; "
        f"all settled {churn.settle_seconds:.1f} s after the last delete",
        "a delete is a forced Pod DELETE, then the kubelet's rmdir of the pod cgroups: the "
        "agent's cgroup watcher may drop the entry before the operator's push does",
        "churn pods run no process (the map entry depends on the pod cgroup only); the "
        f"{apply.probes} apply-to-Ready probes stay loaded during the burst",
    ]

    events = churn.pods * 3
    pushes = sum(churn.pushes.values())
    push = Table("operator pushes during the burst (coalescing)", ["item", "value"])
    push.add("pod changes (create + status + delete per pod)", events)
    push.add("watch events that asked for a render (reconciles)", f"{churn.reconciles:.0f}")
    push.add("render passes", f"{churn.renders:.0f}")
    push.add(
        "PUT /v1/state pushes (ok / error / stale)",
        " / ".join(f"{churn.pushes[o]:.0f}" for o in ("ok", "error", "stale")),
    )
    push.add("pushes per node (average over nodes)", f"{pushes / churn.nodes:.1f}")
    push.add("pushes per node per pod placed on it", f"{pushes / churn.pods:.2f}")
    push.notes += [
        "tracekeeper_operator_pushes_total is not labelled by node: per node is the total "
        "divided by the node count (pods were placed round-robin, so evenly)",
        "without coalescing, each pod change would push its node's state at least once "
        f"({events} pushes)",
    ]
    return [sizes, ready, lat, push]


# --- main ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[Table]:
    say("building or reusing kube-apiserver, etcd and kubectl")
    bin_dir = build_binaries(echo=False)
    workdir = Path(tempfile.mkdtemp(prefix="tk-bench-cp-"))
    try:
        with LocalCluster(bin_dir, workdir / "cluster") as cluster:
            cluster.apply_crds(ROOT / "crds")
            world = World(cluster, workdir, detect_root())
            try:
                started = time.monotonic()
                names = [f"cp-node-{i:02d}" for i in range(args.nodes)]
                for name in names:  # from this thread: agents die with the thread (PDEATHSIG)
                    world.add_node(name)
                nodes = [world.nodes[n] for n in names]
                say(f"{args.nodes} agents up in {time.monotonic() - started:.0f} s")
                world.start_operator()
                namespaces = [world.namespace(f"cp{i}") for i in range(NAMESPACES)]
                apply = apply_to_ready(world, namespaces, nodes, args.probes, args.timeout)
                say(f"{len(apply.latencies)}/{apply.probes} Ready")
                warm = apply_to_ready(
                    world,
                    namespaces,
                    nodes,
                    args.probes,
                    args.timeout,
                    prefix="warm",
                    create_pods=False,
                )
                say(f"{len(warm.latencies)}/{warm.probes} Ready with their shapes loaded")
                churn = pod_churn(world, nodes, args.churn_pods, args.churn_seconds, args.life)
                rss = agent_rss_mib(world)
            finally:
                say("stopping operator, agents, pods, cgroups, control plane")
                world.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return tables(apply, warm, churn, rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=180.0, help="apply-to-Ready deadline")
    parser.add_argument("--churn-pods", type=int, default=50)
    parser.add_argument("--churn-seconds", type=float, default=10.0)
    parser.add_argument("--life", type=float, default=5.0, help="seconds before a pod's delete")
    args = parser.parse_args()
    require_root()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM too
    for table in run(args):
        table.print()


if __name__ == "__main__":
    main()
