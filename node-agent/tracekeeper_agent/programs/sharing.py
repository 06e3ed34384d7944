"""Shared programs: which bit of a shape's program each probe holds, and what the
program's maps hold for its bindings. Probes of one shape (tracekeeper_api.shapes: what
changes the C text) share one program; who is traced, sampling and the rate limit are map
contents, per binding. Pure: no kernel access.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from tracekeeper_agent.ports import BindingConfig, FilterEntries, ProgramMaps
from tracekeeper_agent.programs.claims import claimable
from tracekeeper_agent.programs.constants import (
    MAX_BINDINGS,
    MAX_IDENTITIES,
    MAX_PENDING_PATHS,
    Flag,
)
from tracekeeper_api.protocol import ProbeAssignment

# --- bits ------------------------------------------------------------------------------------


def bits_of(mask: int) -> Iterator[int]:
    """The bindings of a mask, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


@dataclass
class BitTable:
    """The bindings of one program: bit -> probe id. A bit is taken by the lowest free one
    and freed by `release`, which the caller does only once the bit's keys are deleted from
    the program's maps (so a reused bit starts with nothing of its previous probe)."""

    capacity: int = MAX_BINDINGS
    holders: dict[int, str] = field(default_factory=dict)

    def take(self, probe_id: str) -> int | None:
        """The bit now held by `probe_id` (None: the program is full)."""
        for bit in range(self.capacity):
            if bit not in self.holders:
                self.holders[bit] = probe_id
                return bit
        return None

    def release(self, bit: int) -> None:
        del self.holders[bit]

    @property
    def full(self) -> bool:
        return len(self.holders) >= self.capacity

    def __len__(self) -> int:
        return len(self.holders)


# --- the node-wide identity table -------------------------------------------------------------


SlotKey = int | str
"""What holds a pod slot: a cgroup id (container and cgroupPaths targets) or a pod uid (a
whole pod, pending or not: its slot outlives the wait for its cgroup)."""


class IdentitySlots:
    """Pod slots (>= 1), node-wide: one per targeted cgroup or whole pod, however many probes
    target it. Slots no binding needs any more are freed. A freed slot is reused only once
    every slot up to `capacity` was handed out, oldest freed first: a slot's last holder
    has then long left the kernel's tables (see `IdentityMap.release`)."""

    def __init__(self, capacity: int = MAX_IDENTITIES) -> None:
        self.capacity = capacity
        self._slots: dict[SlotKey, int] = {}
        self._free: deque[int] = deque()
        self._next = 1

    def assign(self, keys: Iterable[SlotKey]) -> dict[SlotKey, int]:
        """Exactly these keys have slots now (kept slots unchanged); returns the table."""
        wanted = set(keys)
        for key in [k for k in self._slots if k not in wanted]:
            self._free.append(self._slots.pop(key))
        for key in sorted(wanted - self._slots.keys(), key=str):
            if self._next <= self.capacity or not self._free:
                self._slots[key] = self._next
                self._next += 1
            else:
                self._slots[key] = self._free.popleft()
        return dict(self._slots)

    def table(self) -> dict[SlotKey, int]:
        return dict(self._slots)

    def slot(self, key: SlotKey) -> int | None:
        return self._slots.get(key)


def slot_keys(entries: Iterable[FilterEntries]) -> set[SlotKey]:
    """What needs a slot for these bindings' entries."""
    keys: set[SlotKey] = set()
    for e in entries:
        keys.update(e.cgroups)
        keys.update(p.uid for p in e.pods)
    return keys


@dataclass(frozen=True)
class NodeTables:
    """The node-wide tables for the bindings' entries: identity (cgroup id -> slot) and
    pending (path -> slot: the cgroups pending pods will get, for the kernel to claim)."""

    identity: dict[int, int]
    pending: dict[str, int]
    pending_pods: int = 0
    left_out_pods: int = 0
    """Pending pods whose paths are not in the pending table (full, or a path too long)."""


def node_tables(
    entries: Iterable[FilterEntries],
    slots: Mapping[SlotKey, int],
    *,
    capacity: int = MAX_PENDING_PATHS,
) -> NodeTables:
    """`slots`: every key of the entries has one. A pending pod is in the pending table with
    all its paths or not at all (its QoS class, hence which path, is not known); pods are
    taken in uid order, so that which ones are left out does not change from one write to
    the next."""
    identity: dict[int, int] = {}
    pending_pods: dict[str, tuple[str, ...]] = {}
    for e in entries:
        for cgid in e.cgroups:
            identity[cgid] = slots[cgid]
        for pod in e.pods:
            if pod.cgroup_id is not None:
                identity[pod.cgroup_id] = slots[pod.uid]
            else:
                pending_pods[pod.uid] = pod.paths
    pending: dict[str, int] = {}
    written = left_out = 0
    for uid in sorted(pending_pods):
        paths = pending_pods[uid]
        fits = len(pending) + len(paths) <= capacity
        if not paths or not fits or not all(claimable(p) for p in paths):
            left_out += 1
            continue
        pending.update(dict.fromkeys(paths, slots[uid]))
        written += 1
    return NodeTables(identity, pending, written, left_out)


# --- a program's maps for its bindings --------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    """One probe in a program: its bit, its resolved targets and its per-binding settings."""

    bit: int
    entries: FilterEntries
    host_wide: bool = False
    follow_children: bool = False
    sampling: int = 1
    rate_limit: int = 0


def binding_of(bit: int, assignment: ProbeAssignment, entries: FilterEntries) -> Binding:
    spec, targets = assignment.spec, assignment.targets
    return Binding(
        bit=bit,
        entries=entries,
        host_wide=targets.host_wide,
        follow_children=targets.follow_children and bool(targets.pids),
        sampling=spec.sampling or 1,
        rate_limit=spec.output.rate_limit or 0,
    )


def program_maps(bindings: Iterable[Binding], slots: Mapping[Any, int]) -> ProgramMaps:
    """What the program's maps hold for `bindings`; `slots` (SlotKey -> slot; a dict of
    cgroup ids alone is one too): every cgroup and pod of the bindings' entries has one.
    A binding's bit is set only on its own targets: a cgroup's or pod's slot, a pid, a comm
    it names, the host mask if it is host-wide."""
    slot_masks: dict[int, int] = {}
    pids: dict[int, int] = {}
    comms: dict[str, int] = {}
    host = no_comm = follow = 0
    flags = Flag(0)
    configs: dict[int, BindingConfig] = {}
    for b in bindings:
        bit = 1 << b.bit
        configs[b.bit] = BindingConfig(sampling=b.sampling, rate_limit=b.rate_limit)
        if b.host_wide:
            host |= bit
        keys: list[SlotKey] = [*b.entries.cgroups, *(p.uid for p in b.entries.pods)]
        for key in keys:
            slot = slots[key]
            slot_masks[slot] = slot_masks.get(slot, 0) | bit
        for pid in b.entries.pids:
            pids[pid] = pids.get(pid, 0) | bit
        if b.entries.cgroups or b.entries.pods:
            flags |= Flag.CGROUP
        if b.entries.pids:
            flags |= Flag.PID
        if b.follow_children:
            follow |= bit
            flags |= Flag.FOLLOW
        if b.entries.comms:  # processNames: only these comms count for the binding
            for comm in b.entries.comms:
                comms[comm] = comms.get(comm, 0) | bit
            flags |= Flag.COMM
        else:
            no_comm |= bit
    return ProgramMaps(
        slot_masks=slot_masks,
        pids=pids,
        comms=comms,
        host_mask=host,
        no_comm_mask=no_comm,
        follow_mask=follow,
        flags=int(flags),
        bindings=configs,
    )
