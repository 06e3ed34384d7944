"""Plain fakes of the agent's kernel seams, shared by the agent's unit tests."""

from __future__ import annotations

import queue
import threading
from collections.abc import Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from tracekeeper_agent.host.event_records import EventBatch, batch_of
from tracekeeper_agent.ports import (
    ClaimCounters,
    CountSample,
    FilterEntries,
    HistogramSample,
    KernelCounters,
    LoadFailure,
    ObjectUsage,
    ProgramMaps,
    ProgramPlan,
    RawEvent,
)
from tracekeeper_agent.programs.builder import plan_inputs
from tracekeeper_agent.targets.cgroups import CgroupOwner
from tracekeeper_agent.targets.pod_paths import pod_cgroup_paths
from tracekeeper_api.protocol import NodeState, ProbeAssignment

UID_A = "11111111-aaaa-4000-8000-000000000001"
UID_B = "22222222-bbbb-4000-8000-000000000002"
CID_A = "a" * 64


class FakeIdentities:
    """The node-wide identity table and the pending table as dicts; `mkdir` plays the
    kernel's claims program, `released` records what the agent asked to release."""

    def __init__(self) -> None:
        self.table: dict[int, int] = {}
        self.claimed: dict[int, int] = {}
        self.pending: dict[str, int] = {}
        self.released: list[set[int]] = []
        self.syncs = 0

    def sync(self, table: Mapping[int, int]) -> None:
        self.table = {**self.claimed, **table}
        self.syncs += 1

    def sync_pending(self, paths: Mapping[str, int]) -> None:
        self.pending = dict(paths)

    def release(self, slots: Collection[int]) -> None:
        self.released.append(set(slots))
        self.claimed = {k: s for k, s in self.claimed.items() if s not in slots}
        self.table = {k: s for k, s in self.table.items() if k in self.claimed or s not in slots}

    def mkdir(self, path: str, cgroup_id: int) -> bool:
        """The claims program's part of mkdir(2): True when the path was pending."""
        slot = self.pending.get(path)
        if slot is None:
            return False
        self.claimed[cgroup_id] = self.table[cgroup_id] = slot
        return True

    def claim_counters(self) -> ClaimCounters:
        return ClaimCounters(claimed=len(self.claimed))

    def held(self, keys: Collection[int]) -> frozenset[int]:
        return frozenset(k for k in keys if k in self.table)

    @property
    def program_ids(self) -> tuple[int, ...]:
        return (7, 8)


class FakeProgram:
    """A shape program: records the maps written; outputs set by tests (bit 0's, or per
    bit in `by_bit`)."""

    def __init__(self, loader: FakeLoader, plan: ProgramPlan, ids: tuple[int, ...]) -> None:
        self.loader = loader
        self.plan = plan
        self.adopted = False
        self._ids = ids
        self.filters: list[ProgramMaps] = []
        self.closed = False
        self.counts: list[CountSample] = []
        self.counters = KernelCounters()
        self.by_bit: dict[int, KernelCounters] = {}
        self.cleared: list[int] = []
        self.events: queue.Queue[RawEvent] = queue.Queue()
        self.fail_update: Exception | None = None
        self.invalidations = 0
        """Verdict cache invalidations, update_maps' included (each bumps the generation)."""
        self.updated = threading.Event()
        """Set by every map update (clear it, then wait for the next one)."""
        self.objects = [ObjectUsage("prog", ids[0] if ids else 0, 4096)]
        """What kernel_objects reports (tests set run times and shared maps)."""

    @property
    def program_ids(self) -> tuple[int, ...]:
        return self._ids

    def update_maps(self, maps: ProgramMaps) -> None:
        assert not self.closed, "update_maps on a closed program"
        if self.fail_update is not None:
            raise self.fail_update
        self.filters.append(maps)
        self.loader.log.append(("update", self.plan.shape, self._ids))
        self.invalidations += 1
        self.updated.set()

    def invalidate(self) -> None:
        assert not self.closed
        self.invalidations += 1

    def clear_binding(self, bit: int) -> None:
        assert not self.closed
        self.cleared.append(bit)

    def read_counts(self, bit: int) -> list[CountSample]:
        assert not self.closed
        return list(self.counts) if bit == 0 else []

    def read_histograms(self, bit: int) -> list[HistogramSample]:
        return []

    def read_counters(self, bit: int) -> KernelCounters:
        return self.by_bit.get(bit, self.counters if bit == 0 else KernelCounters())

    def live_keys(self, bit: int) -> int:
        return len(self.counts) if bit == 0 else 0

    def kernel_objects(self) -> list[ObjectUsage]:
        assert not self.closed
        return list(self.objects)

    def poll_events(self, timeout_ms: int) -> list[RawEvent]:
        assert not self.closed, "poll_events on a closed program"
        try:
            first = self.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            return []
        batch = [first]
        while not self.events.empty():
            batch.append(self.events.get_nowait())
        return batch

    def poll_batch(self, timeout_ms: int, max_records: int) -> EventBatch:
        return batch_of(self.poll_events(timeout_ms))

    def close(self) -> None:
        assert not self.closed, "closed twice"
        self.closed = True
        self.loader.log.append(("close", self.plan.shape, self._ids))

    @property
    def maps(self) -> ProgramMaps:
        return self.filters[-1] if self.filters else ProgramMaps()

    def entries_of(self, bit: int) -> FilterEntries:
        """What binding `bit` is set on, read back from the maps written (cgroup ids
        through the identity table)."""
        m, mask = self.maps, 1 << bit
        slots = {s for s, v in m.slot_masks.items() if v & mask}
        return FilterEntries(
            cgroups=frozenset(c for c, s in self.loader.identities.table.items() if s in slots),
            pids=frozenset(p for p, v in m.pids.items() if v & mask),
            comms=frozenset(c for c, v in m.comms.items() if v & mask),
        )

    @property
    def entries(self) -> FilterEntries:
        return self.entries_of(0)


class FakeLoader:
    """Counts loads, gives each program fresh ids, fails on request (by the plan's shape,
    which fake_build_plan names after the probe), can block a load."""

    def __init__(self) -> None:
        self.programs: list[FakeProgram] = []
        self.log: list[tuple[str, str, tuple[int, ...]]] = []
        self.failures: dict[str, LoadFailure | Exception] = {}
        self.adopting: set[str] = set()
        """Shapes whose load takes a previous agent's pinned program (no compile)."""
        self.gate: threading.Event | None = None
        self.loading = threading.Event()
        self.identities = FakeIdentities()
        self._next_id = 100
        self._lock = threading.Lock()
        self.concurrent = 0
        self.max_concurrent = 0

    def load(self, plan: ProgramPlan) -> FakeProgram:
        with self._lock:
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            self.loading.set()
            if self.gate is not None:
                assert self.gate.wait(timeout=30), "gate never opened"
            failure = self.failures.get(plan.shape)
            if failure is not None:
                self.log.append(("fail", plan.shape, ()))
                raise failure
            with self._lock:
                ids = (self._next_id, self._next_id + 1)
                self._next_id += 2
            program = FakeProgram(self, plan, ids)
            program.adopted = plan.shape in self.adopting
            self.programs.append(program)
            self.log.append(("load", plan.shape, ids))
            return program
        finally:
            with self._lock:
                self.concurrent -= 1

    def drop_leftovers(self) -> int:
        return 0  # nothing outlives a fake

    def close(self) -> None:
        pass

    @property
    def loads(self) -> int:
        return sum(1 for op, _, _ in self.log if op == "load")

    @property
    def closes(self) -> int:
        return sum(1 for op, _, _ in self.log if op == "close")

    def live(self, probe_id: str) -> list[FakeProgram]:
        """Live programs first loaded for `probe_id` (fake plans are named after it)."""
        return [p for p in self.programs if p.plan.shape == probe_id and not p.closed]

    def only(self, probe_id: str) -> FakeProgram:
        live = self.live(probe_id)
        assert len(live) == 1, f"{probe_id}: {len(live)} live programs"
        return live[0]


def unshared_inputs(assignment: ProbeAssignment) -> Hashable:
    """Plan inputs that give every probe a program of its own, rebuilt when its spec hash
    changes (the lifecycle tests): its id, spec hash and shape."""
    return (assignment.id, assignment.spec_hash, plan_inputs(assignment))


def fake_build_plan(assignment: ProbeAssignment) -> ProgramPlan:
    """A plan named after the probe it was built for (the first of its shape)."""
    source = f"/* {assignment.id} */ program {assignment.spec_hash}"
    return ProgramPlan(
        shape=assignment.id,
        source=source,
        attachments=(),
        output_kind=assignment.spec.output.kind,
        by=tuple(assignment.spec.output.by),
        source_hash=f"h-{assignment.spec_hash}",
    )


@dataclass
class FakeCgroups:
    """A CgroupLookup over dicts; tests add and remove cgroups as kubelet would."""

    pods: dict[str, int] = field(default_factory=dict)
    containers: dict[tuple[str, str], int] = field(default_factory=dict)
    paths: dict[str, int] = field(default_factory=dict)
    born: dict[str, float] = field(default_factory=dict)
    """Pod uid -> when its cgroup was made (monotonic), for pods made while the agent runs."""
    running: set[str] = field(default_factory=set)
    """Pods with a process in their cgroups."""

    def pod_cgroup_id(self, pod_uid: str) -> int | None:
        return self.pods.get(pod_uid)

    def pod_born_at(self, pod_uid: str) -> float | None:
        return self.born.get(pod_uid)

    def pod_has_processes(self, pod_uid: str) -> bool:
        return pod_uid in self.running

    def container_cgroup_id(self, pod_uid: str, container_id: str) -> int | None:
        return self.containers.get((pod_uid, container_id.rpartition("://")[2]))

    def pod_container_ids(self, pod_uid: str) -> frozenset[str]:
        return frozenset(cid for uid, cid in self.containers if uid == pod_uid)

    def path_cgroup_id(self, path: str) -> int | None:
        return self.paths.get(path)

    def pod_cgroup_paths(self, pod_uid: str) -> tuple[str, ...]:
        return pod_cgroup_paths(pod_uid, [PurePosixPath("kubepods.slice")])

    def owner(self, cgroup_id: int) -> CgroupOwner | None:
        for uid, cgid in self.pods.items():
            if cgid == cgroup_id:
                return CgroupOwner(uid, None)
        for (uid, cid), cgid in self.containers.items():
            if cgid == cgroup_id:
                return CgroupOwner(uid, cid)
        return None


@dataclass
class FakeProcesses:
    children: dict[int, list[int]] = field(default_factory=dict)

    def descendants(self, pids: Iterable[int]) -> frozenset[int]:
        out: set[int] = set()
        frontier = list(pids)
        while frontier:
            for child in self.children.get(frontier.pop(), []):
                out.add(child)
                frontier.append(child)
        return frozenset(out)


def pod(uid: str = UID_A, name: str = "web-0", **extra: Any) -> dict[str, Any]:
    return {"uid": uid, "namespace": "team-a", "name": name, **extra}


def probe(
    name: str = "opens",
    *,
    spec_hash: str = "0000000000000001",
    targets: dict[str, Any] | None = None,
    suspend: bool = False,
    output: dict[str, Any] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"tracepoint": "syscalls:sys_enter_openat"}
    if suspend:
        spec["suspend"] = True
    if output is not None:
        spec["output"] = output
    return {
        "id": f"team-a/{name}",
        "specHash": spec_hash,
        "spec": spec,
        "targets": targets if targets is not None else {"pods": [pod()]},
    }


def node_state(revision: int, *probes: dict[str, Any], node: str = "node-1") -> NodeState:
    return NodeState.model_validate({"node": node, "revision": revision, "probes": list(probes)})
