"""The agent's seams: the kernel, and who a cgroup belongs to.

The reconciler, exporters and HTTP API talk to loaded programs only through these
Protocols and plain data types, so their logic is unit-testable with fakes; the real
implementation lives in `tracekeeper_agent.bpf` (the only package importing bcc).
Targets and outputs meet at `Attributor` (cgroup id -> pod names), builders and targets at
`TargetRoot` (a container's root filesystem).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from tracekeeper_api.protocol import ProbeState
from tracekeeper_api.reasons import OutcomeReason

if TYPE_CHECKING:
    from tracekeeper_agent.host.event_records import EventBatch

AttachKind = Literal[
    "tracepoint", "raw_tracepoint", "uprobe", "uretprobe", "usdt", "kprobe", "kretprobe", "auto"
]


@dataclass(frozen=True)
class Attachment:
    """One attach call the loader makes. `auto`: BCC attaches it from the function name
    (TRACEPOINT_PROBE / RAW_TRACEPOINT_PROBE in the source)."""

    kind: AttachKind
    fn_name: str
    target: str = ""
    """tracepoint category:name, raw tracepoint name, kernel function, or symbol."""
    binary: str = ""
    """uprobes: the path BCC opens, `/proc/self/fd/N` of the checked fd the plan holds
    (host paths in tests)."""
    binary_id: tuple[int, int] | None = None
    """uprobes: (st_dev, st_ino) of that file: what identifies the attachment."""
    display: str = ""
    """uprobes: the binary as the probe names it, for messages (never a host path)."""
    offset: int = 0
    """usdt: the site's file offset in `binary` (a uprobe at an address, not a symbol)."""
    ref_ctr_offset: int = 0
    """usdt: file offset of the probe's semaphore, 0 for none: the kernel increments it in
    every process mapping the file while the uprobe is attached."""


@dataclass(frozen=True)
class EventField:
    """A value an event record carries, in the order of the C struct."""

    name: str
    kind: Literal["int", "uint", "str"]
    size: int
    """Bytes in the record: 1/2/4/8 for integers, the buffer size for strings."""


class HeldFiles:
    """File descriptors a plan keeps open; closed once, by release()."""

    def __init__(self, fds: list[int] | None = None) -> None:
        self._fds = list(fds or [])

    def __len__(self) -> int:
        return len(self._fds)

    def release(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(frozen=True)
class ProgramPlan:
    """Everything needed to load one shape's program: built from the spec of a probe of
    that shape, pure data (the same for every probe of the shape)."""

    shape: str
    """The shape's label (programs.sharing.Shape.label), for messages and reports."""
    source: str
    attachments: tuple[Attachment, ...]
    output_kind: Literal["count", "histogram", "events"]
    by: tuple[str, ...]
    """Aggregation keys compiled into count/histogram keys (pod/container -> cgroup id)."""
    event_fields: tuple[EventField, ...] = ()
    source_hash: str = ""
    held: HeldFiles = field(default_factory=lambda: HeldFiles(), compare=False, repr=False)
    """Checked files the attachments name through /proc/self/fd: open until the load
    attempt is over, then released (the kernel holds what it attached)."""


@dataclass(frozen=True)
class PodEntry:
    """A whole pod a binding traces: one pod slot, named by its uid whether its cgroup
    exists or not, so that the slot a pending pod gets stays its slot once the cgroup is
    made (by the kernel at mkdir, or learned through inotify)."""

    uid: str
    """Lower case, as kubelet names its cgroup."""
    cgroup_id: int | None = None
    """The pod-level cgroup (the ancestor of all its containers); None: not made yet."""
    paths: tuple[str, ...] = ()
    """Pending only: where kubelet will make it, from the v2 root (targets/pod_paths.py)."""


@dataclass(frozen=True)
class FilterEntries:
    """Whom one probe (binding) traces on this node, resolved: what its bit is set on."""

    cgroups: frozenset[int] = frozenset()
    """cgroup ids (inodes of cgroup v2 directories) of container and cgroupPaths targets."""
    pids: frozenset[int] = frozenset()
    comms: frozenset[str] = frozenset()
    pods: frozenset[PodEntry] = frozenset()
    """Whole-pod targets, pending or not."""

    @property
    def size(self) -> int:
        """Entries naming what exists now (a pending pod counts once its cgroup does)."""
        known = sum(1 for p in self.pods if p.cgroup_id is not None)
        return len(self.cgroups) + len(self.pids) + len(self.comms) + known


@dataclass(frozen=True)
class BindingConfig:
    """One binding's settings in its program's maps."""

    sampling: int = 1
    """Keep 1 in `sampling` matched hits."""
    rate_limit: int = 0
    """Events per second (0: none)."""


@dataclass(frozen=True)
class ProgramMaps:
    """What a shared program's maps hold for its bindings (programs.sharing.program_maps).
    Masks: bit b is binding b. Replacing them never reloads."""

    slot_masks: Mapping[int, int] = field(default_factory=dict)
    """Pod slot (of the node-wide identity table) -> bindings tracing that cgroup."""
    pids: Mapping[int, int] = field(default_factory=dict)
    comms: Mapping[str, int] = field(default_factory=dict)
    """comm -> bindings whose processNames name it."""
    host_mask: int = 0
    no_comm_mask: int = 0
    """Bindings without processNames (every comm counts for them)."""
    follow_mask: int = 0
    flags: int = 0
    """programs.constants.Flag: the filter kinds some binding uses."""
    bindings: Mapping[int, BindingConfig] = field(default_factory=dict)


@dataclass(frozen=True)
class SampleKey:
    """An aggregation key read back from the kernel; fields not in `by` are None."""

    cgroup_id: int | None = None
    pid: int | None = None
    comm: str | None = None


@dataclass(frozen=True)
class CountSample:
    key: SampleKey
    value: int


@dataclass(frozen=True)
class HistogramSample:
    key: SampleKey
    buckets: Mapping[int, int]
    """log2 slot -> count; slot s holds values in [2**s, 2**(s+1)) (slot 0 also holds 0)."""


@dataclass(frozen=True)
class RawEvent:
    """One record from the ring buffer, decoded."""

    ts_ns: int
    pid: int
    tid: int
    cgroup_id: int
    comm: str
    fields: Mapping[str, int | str]
    bindings: int = 1
    """The mask of the bindings (probes of the program) the record is for."""


@dataclass(frozen=True)
class KernelCounters:
    """Per-program counters kept in kernel (summed over CPUs)."""

    matched: int = 0
    """Hits that passed the filter (before sampling and rate limit)."""
    sampled_out: int = 0
    rate_limited: int = 0
    ring_full: int = 0
    lru_new_keys: int = 0
    """Keys inserted into the count/histogram map; minus the live keys = evictions."""


@dataclass(frozen=True)
class ObjectUsage:
    """What the kernel accounts to one BPF object (a program or a map) a program holds:
    fdinfo's memlock (bpftool's bytes_memlock) and, for programs while run-time statistics
    are on, the time and count of its runs since it was loaded."""

    kind: Literal["prog", "map"]
    id: int
    memlock: int
    run_time_ns: int = 0
    run_count: int = 0


class LoadFailure(Exception):
    """A probe that could not be loaded, with the outcome to report."""

    def __init__(self, state: ProbeState, reason: OutcomeReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.state: ProbeState = state
        self.reason: OutcomeReason = reason
        self.message = message


class LoadedProgram(Protocol):
    """A shape's program attached in the kernel, serving up to 64 bindings (bits)."""

    @property
    def program_ids(self) -> tuple[int, ...]: ...

    adopted: bool
    """Taken over from the pins a previous agent of the node left (not compiled)."""

    def update_maps(self, maps: ProgramMaps) -> None:
        """Make the filter and binding maps hold exactly `maps` (writes of what changed),
        then invalidate the verdict cache."""

    def invalidate(self) -> None:
        """Invalidate the verdict cache (the node-wide identity table changed)."""

    def clear_binding(self, bit: int) -> None:
        """Delete everything binding `bit` left in the maps (its keys, counters, bucket):
        after it, the bit can serve another probe."""

    def read_counts(self, bit: int) -> list[CountSample]: ...

    def read_histograms(self, bit: int) -> list[HistogramSample]: ...

    def read_counters(self, bit: int) -> KernelCounters: ...

    def live_keys(self, bit: int) -> int:
        """The binding's keys currently in the output map (count/histogram)."""

    def kernel_objects(self) -> list[ObjectUsage]:
        """The programs and maps this program holds, as the kernel accounts them (maps
        shared with other programs, the node-wide identity table, are listed by each)."""

    def poll_events(self, timeout_ms: int) -> list[RawEvent]:
        """Block up to timeout_ms for ring buffer records (call from a thread): the
        per-record path (BCC's callback), kept as the reference for poll_batch."""

    def poll_batch(self, timeout_ms: int, max_records: int) -> EventBatch:
        """Block up to timeout_ms for ring buffer records, then return what is committed
        (at most max_records) in one columnar batch (call from a thread). A program's ring
        is read by poll_events or by poll_batch, never both."""

    def close(self) -> None:
        """Detach and free the program and its maps."""


@dataclass(frozen=True)
class ClaimCounters:
    """The cgroup claims program's counters (programs.constants.ClaimCounter), summed."""

    mkdirs: int = 0
    claimed: int = 0
    identity_full: int = 0
    removed: int = 0


class IdentityMap(Protocol):
    """The node-wide identity table in the kernel (cgroup id -> pod slot), shared by every
    program the loader loads, and the pending table from which the kernel adds to it at
    mkdir (and removes from it at rmdir)."""

    def sync(self, table: Mapping[int, int]) -> None:
        """Make the agent's entries exactly `table` (writes and deletes of what changed; an
        entry the kernel removed already at rmdir is no error). Entries the kernel claimed
        at mkdir are left alone."""

    def sync_pending(self, paths: Mapping[str, int]) -> None:
        """Make the pending table hold exactly `paths` (path from the v2 root -> pod slot;
        at most MAX_PENDING_PATHS, each claimable)."""

    def release(self, slots: Collection[int]) -> None:
        """Delete every entry naming these slots that `sync` did not write: cgroups the
        kernel claimed for pods no binding targets any more (before the slots are reused)."""

    def claim_counters(self) -> ClaimCounters: ...

    def held(self, keys: Collection[int]) -> frozenset[int]:
        """Those of `keys` the kernel's table holds now, whoever wrote them."""

    @property
    def program_ids(self) -> tuple[int, ...]:
        """The claims program's BPF ids (one program per table: per node)."""


class ProgramLoader(Protocol):
    def load(self, plan: ProgramPlan) -> LoadedProgram:
        """Compile (cached) and attach; raises LoadFailure with the compiler/verifier text."""

    @property
    def identities(self) -> IdentityMap:
        """The identity table its programs read."""

    def drop_leftovers(self) -> int:
        """Detach the programs a previous agent left pinned that no load adopted; how
        many (called once the persisted state is restored)."""

    def close(self) -> None:
        """Release the identity table (once its programs are closed)."""


# --- who a cgroup belongs to, and the roots targets see -----------------------------------------


@dataclass(frozen=True)
class PodIdentity:
    namespace: str
    pod: str
    container: str = ""
    """Empty when the cgroup is the pod's own (pod-level) cgroup or not known yet."""


class Attributor(Protocol):
    def identify(self, cgroup_id: int) -> PodIdentity | None:
        """The pod/container of a cgroup id (the current task's cgroup), if a target's."""


@dataclass(frozen=True)
class TargetRoot:
    """A root filesystem whom the probe targets, open as a dirfd (the caller closes it)."""

    fd: int
    label: str
    """Names it in messages with the tenant's own words (`pod team-a/web-0`, `host`)."""
