"""The operator -> agent wire protocol: desired node state and per-probe outcomes.

Level-triggered: the operator always sends a node's full desired state
(`PUT /v1/state`); the agent answers with what it has in the kernel. Pod UIDs and
container IDs travel; PIDs and cgroup ids are node-local facts the agent resolves.

Each pod travels once per node, in the state's pod table (`pods`); probes refer to it by
uid with their container selection (`targets.podRefs`). `pack_node_state` builds that
form from probes with inline targets, `NodeState.resolved()` turns it back into them (the
shape the agent works with), so 256 probes over pods with 64 containers each cost one
copy of those pods, not 256.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Literal, Self

from pydantic import Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from tracekeeper_api.base import WireModel
from tracekeeper_api.filters import Pid
from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.status import MAX_MESSAGE
from tracekeeper_api.strings import CgroupPath, ProcessName

MAX_PROBES_PER_NODE = 256
MAX_PODS_PER_PROBE = 2048
MAX_CONTAINERS_PER_POD = 64
MAX_PODS_PER_NODE = 2048
MAX_STATE_BYTES = 3 * 1024 * 1024
"""The operator keeps each node's serialized state under this (the agent accepts 4 MiB)."""

ProbeState = Literal["Loaded", "Failed", "Unsupported", "KernelHeadersMissing", "Suspended"]


class ContainerTarget(WireModel):
    """A container of a targeted pod. Without containerId it has not started yet."""

    name: str = Field(min_length=1, max_length=253)
    container_id: str | None = Field(default=None, max_length=256)
    """As in pod status: runtime://id (containerd://, cri-o://, docker://)."""


class PodTarget(WireModel):
    """A pod bound to this node whose processes the probe traces."""

    uid: str = Field(min_length=1, max_length=64, pattern=r"^[0-9a-fA-F-]+$")
    namespace: str = Field(min_length=1, max_length=63)
    name: str = Field(min_length=1, max_length=253)
    all_containers: bool = True
    """True: a pod-level entry covers every container, including ones not started yet and
    restarted ones. False: only the listed containers are traced."""
    containers: list[ContainerTarget] = Field(
        default_factory=list, max_length=MAX_CONTAINERS_PER_POD
    )


class PodEntry(WireModel):
    """A pod of the node state's pod table: sent once, referred to by probes."""

    uid: str = Field(min_length=1, max_length=64, pattern=r"^[0-9a-fA-F-]+$")
    namespace: str = Field(min_length=1, max_length=63)
    name: str = Field(min_length=1, max_length=253)
    containers: list[ContainerTarget] = Field(
        default_factory=list, max_length=MAX_CONTAINERS_PER_POD
    )


class PodRef(WireModel):
    """A probe's reference to a pod of the pod table."""

    uid: str = Field(min_length=1, max_length=64, pattern=r"^[0-9a-fA-F-]+$")
    containers: list[str] | None = Field(default=None, max_length=MAX_CONTAINERS_PER_POD)
    """None: the whole pod (a pod-level entry, later containers included). Otherwise only
    these containers of the table's entry, by name."""


class ProbeTargets(WireModel):
    """Whom one probe traces on one node."""

    pods: list[PodTarget] = Field(default_factory=list, max_length=MAX_PODS_PER_PROBE)
    """Pods inline (the resolved form; the operator sends pod_refs instead)."""
    pod_refs: list[PodRef] = Field(default_factory=list, max_length=MAX_PODS_PER_PROBE)
    """Pods of the node state's pod table."""
    process_names: list[ProcessName] = Field(default_factory=list, max_length=16)
    """If set, only processes with these names (AND with the other targets)."""
    pids: list[Pid] = Field(default_factory=list, max_length=64)
    follow_children: bool = False
    cgroup_paths: list[CgroupPath] = Field(default_factory=list, max_length=16)
    host_wide: bool = False


class ProbeAssignment(WireModel):
    """One probe the node should run, with its targets on this node."""

    id: str = Field(min_length=3, max_length=320, pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$")
    """namespace/name of the TraceProbe."""
    spec_hash: str = Field(min_length=8, max_length=64)
    spec: TraceProbeSpec
    targets: ProbeTargets = Field(default_factory=ProbeTargets)
    allow_program: bool = False
    """The operator permits raw program source for this probe (privileged namespace)."""

    @property
    def namespace(self) -> str:
        return self.id.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.id.split("/", 1)[1]


class NodeState(WireModel):
    """The full desired state of one node's agent."""

    node: str = Field(min_length=1, max_length=253)
    revision: int = Field(ge=0)
    """Increases with every change the operator makes; an older revision is refused."""
    probes: list[ProbeAssignment] = Field(default_factory=list, max_length=MAX_PROBES_PER_NODE)
    pods: list[PodEntry] = Field(default_factory=list, max_length=MAX_PODS_PER_NODE)
    """The pod table: every pod some probe's targets.podRefs name, once."""

    @model_validator(mode="after")
    def _unique_ids(self) -> Self:
        ids = [p.id for p in self.probes]
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"probe ids must be unique, repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _refs_resolve(self) -> Self:
        table = _pod_table(self.pods)
        errors: list[InitErrorDetails] = []

        def error(loc: tuple[str | int, ...], text: str, value: object) -> None:
            kind = PydanticCustomError("pod_ref", text)
            errors.append(InitErrorDetails(type=kind, loc=loc, input=value))

        seen: set[str] = set()
        for i, pod in enumerate(self.pods):
            if pod.uid in seen:
                error(("pods", i, "uid"), f"pod {pod.uid} is in the pod table twice", pod.uid)
            seen.add(pod.uid)
        for i, probe in enumerate(self.probes):
            for j, ref in enumerate(probe.targets.pod_refs):
                where = ("probes", i, "targets", "podRefs", j)
                entry = table.get(ref.uid)
                if entry is None:
                    error((*where, "uid"), f"pod {ref.uid} is not in the pod table", ref.uid)
                elif ref.containers is not None:
                    names = {c.name for c in entry.containers}
                    if missing := [n for n in ref.containers if n not in names]:
                        error(
                            (*where, "containers"),
                            f"{', '.join(missing)}: not a container of pod "
                            f"{entry.namespace}/{entry.name} in the pod table",
                            ref.containers,
                        )
        if errors:
            # Raised as a ValidationError so that each error keeps its field's location.
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    def resolved(self) -> NodeState:
        """The same state with every probe's podRefs replaced by inline pods (and an empty
        pod table): what the agent applies."""
        if not self.pods:
            return self
        table = _pod_table(self.pods)
        probes = [
            p.model_copy(update={"targets": resolve_targets(p.targets, table)}) for p in self.probes
        ]
        return self.model_copy(update={"probes": probes, "pods": []})


def _pod_table(pods: list[PodEntry]) -> dict[str, PodEntry]:
    return {entry.uid: entry for entry in pods}


def resolve_targets(targets: ProbeTargets, table: dict[str, PodEntry]) -> ProbeTargets:
    """`targets` with its podRefs made inline pods (references checked by NodeState)."""
    if not targets.pod_refs:
        return targets
    pods = list(targets.pods)
    for ref in targets.pod_refs:
        entry = table[ref.uid]
        wanted = None if ref.containers is None else set(ref.containers)
        pods.append(
            PodTarget(
                uid=entry.uid,
                namespace=entry.namespace,
                name=entry.name,
                all_containers=wanted is None,
                containers=[c for c in entry.containers if wanted is None or c.name in wanted],
            )
        )
    return targets.model_copy(update={"pods": pods, "pod_refs": []})


def packed_targets(targets: ProbeTargets) -> tuple[ProbeTargets, list[PodEntry]]:
    """`targets` with its inline pods made podRefs, and the pod table entries they need."""
    refs = [
        PodRef(
            uid=pod.uid,
            containers=None if pod.all_containers else [c.name for c in pod.containers],
        )
        for pod in targets.pods
    ]
    entries = [
        PodEntry(uid=pod.uid, namespace=pod.namespace, name=pod.name, containers=pod.containers)
        for pod in targets.pods
    ]
    return targets.model_copy(update={"pods": [], "pod_refs": [*targets.pod_refs, *refs]}), entries


def pack_node_state(node: str, revision: int, probes: Iterable[ProbeAssignment]) -> NodeState:
    """A node state with each pod once in the pod table. A pod targeted by several probes
    gets the union of the containers they list (a whole-pod target lists them all)."""
    packed: list[ProbeAssignment] = []
    table: dict[str, PodEntry] = {}
    for probe in probes:
        targets, entries = packed_targets(probe.targets)
        packed.append(probe.model_copy(update={"targets": targets}))
        for entry in entries:
            known = table.get(entry.uid)
            if known is None:
                table[entry.uid] = entry
                continue
            names = {c.name for c in known.containers}
            extra = [c for c in entry.containers if c.name not in names]
            if extra:
                containers = [*known.containers, *extra]
                table[entry.uid] = known.model_copy(update={"containers": containers})
    return NodeState(node=node, revision=revision, probes=packed, pods=list(table.values()))


class EventDrops(WireModel):
    """Events that did not reach the stream, by where they were lost."""

    rate_limited: int = 0
    ring_full: int = 0
    backlog: int = 0
    """Dropped in user space because a consumer was too slow."""


class ProbeCost(WireModel):
    """What one probe costs on one node, from the kernel's own accounting. A shared
    program's run time and memory are split equally among the bindings it serves, and a
    map several programs hold (the node-wide identity table) among all their bindings."""

    run_time_ns: int = 0
    """Kernel run time of the probe's program attributed to it since this agent loaded it
    (0 when the node's run-time statistics are off)."""
    runs: int = 0
    """Runs of the program attributed to it, split like its run time."""
    ns_per_run: float | None = None
    """The program's cost per run (per traced call) over the agent's last window."""
    kernel_memory_bytes: int = 0
    """Its share of the memory its programs and maps hold (bpftool's bytes_memlock)."""
    matched_per_second: float | None = None
    events_per_second: float | None = None


class ProbeOutcome(WireModel):
    """What the agent has for one probe."""

    id: str
    spec_hash: str
    state: ProbeState
    reason: str = Field(max_length=64)
    """CamelCase, one of tracekeeper_api.reasons.OutcomeReason: Loaded, CompileFailed,
    AttachFailed, Unsupported, KernelHeadersMissing, InvalidSpec, NotPermitted, Suspended,
    Failed (a string on the wire: an agent of another version may know more)."""
    message: str = Field(default="", max_length=MAX_MESSAGE)
    program_ids: list[int] = Field(default_factory=list)
    """The kernel's BPF program ids (bpftool prog show); unchanged across filter updates."""
    filter_entries: int = 0
    pods: int = 0
    containers: int = 0
    drops: EventDrops = Field(default_factory=EventDrops)
    shape: str = Field(default="", max_length=MAX_MESSAGE)
    """The program serving the probe, by its shape (attach point, output, keys, fields):
    probes of one shape share one program (and its program_ids)."""
    shared_by: int = 0
    """Probes (bindings) the program serves, this one included; 0 when none is loaded."""
    cost: ProbeCost | None = None
    """None when not loaded (or from an agent that predates it)."""


class StaleRevisionBody(WireModel):
    """The agent's 409 answer to a PUT /v1/state older than the revision it applied: the
    operator moves its revision clock past `appliedRevision`."""

    error: str = ""
    applied_revision: int = 0


class KernelInfo(WireModel):
    """What a node's kernel can do, as its agent found it (sent with every report, so a new
    node image or newly installed headers reach the operator with the next contact). The
    fields after `headers` are None from agents that predate them: not known, not absent."""

    release: str = Field(default="", max_length=128)
    kprobes: bool = False
    uprobes: bool = False
    btf: bool = False
    headers: bool = False
    headers_release: str | None = Field(default=None, max_length=128)
    tracepoints: bool | None = None
    ring_buffer: bool | None = None
    batch_map_ops: bool | None = None
    cgroup_v2: bool | None = None
    run_time_stats: bool | None = None
    """BPF run-time statistics on (what a probe's cost in run time is read from)."""
    missing: dict[str, str] = Field(default_factory=dict, max_length=16)
    """feature -> why the agent believes it is missing (e.g. CONFIG_KPROBES is not set)."""


class CgroupClaims(WireModel):
    """The kernel's recognition of pod cgroups at mkdir: the paths targeted pods will get,
    waiting in a bounded table, and what the claims program did with them."""

    pending_pods: int = 0
    """Targeted pods without a cgroup yet whose paths are all in the table."""
    pending_paths: int = 0
    capacity: int = 0
    """Paths the table holds at most."""
    left_out_pods: int = 0
    """Pending pods not in the table now (full, or a path too long): their first calls are
    caught by the inotify fallback only. Never silent: also a metric."""
    claimed: int = 0
    """Cgroups given their pod's identity in the mkdir call, since the agent started."""
    identity_full: int = 0
    """Claims the identity table had no room for."""
    covered_before_processes: int = 0
    """New pods (their cgroup made after a probe targeting them) the agent covered itself,
    after their mkdir, before any process ran in them: nothing missed."""
    covered_after_processes: int = 0
    """New pods covered only once processes ran in them: their first calls were missed."""
    program_ids: list[int] = Field(default_factory=list, max_length=8)
    """The claims program's BPF ids, cgroup_mkdir's then cgroup_rmdir's: one per node."""


class Persistence(WireModel):
    """Whether the agent's state directory holds the accepted state: what a restart of the
    agent would resume from. A failed save (disk full, read-only) does not stop tracing;
    it is said here and retried on the agent's 2 s poll."""

    revision: int = 0
    """The revision on disk (0: none)."""
    error: str | None = Field(default=None, max_length=1024)
    """Why the accepted revision is not on disk, while it is not."""


class NodeReport(WireModel):
    """The agent's answer to PUT /v1/state and GET /v1/state."""

    node: str
    revision: int
    boot_id: str
    """Random per agent start: a change tells the operator the agent restarted."""
    kernel: KernelInfo = Field(default_factory=KernelInfo)
    probes: list[ProbeOutcome] = Field(default_factory=list)
    cgroup_claims: CgroupClaims = Field(default_factory=CgroupClaims)
    persisted: Persistence = Field(default_factory=Persistence)


def spec_hash(spec: TraceProbeSpec) -> str:
    """Hash of what the program is built from. Whom it traces (filter, targets) is left out:
    those change map entries, never the program."""
    relevant = spec.to_wire()
    for key in ("filter", "filterRef", "nodeSelector", "suspend", "duration"):
        relevant.pop(key, None)
    canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
