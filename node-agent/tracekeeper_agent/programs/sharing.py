"""Shared programs: which bit of a shape's program each probe holds, and what the
program's maps hold for its bindings. Probes of one shape (tracekeeper_api.shapes: what
changes the C text) share one program; who is traced, sampling and the rate limit are map
contents, per binding. Pure: no kernel access.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from tracekeeper_agent.ports import BindingConfig, FilterEntries, ProgramMaps
from tracekeeper_agent.programs.constants import MAX_BINDINGS, Flag
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


class IdentitySlots:
    """cgroup id -> pod slot (>= 1), node-wide: one entry per targeted cgroup, however many
    probes target it. Slots of cgroups no binding needs any more are freed (and reused)."""

    def __init__(self) -> None:
        self._slots: dict[int, int] = {}
        self._free: list[int] = []
        self._next = 1

    def assign(self, cgroup_ids: Iterable[int]) -> dict[int, int]:
        """Exactly these cgroups have slots now (kept slots unchanged); returns the table."""
        wanted = set(cgroup_ids)
        for cgid in [c for c in self._slots if c not in wanted]:
            self._free.append(self._slots.pop(cgid))
        self._free.sort(reverse=True)
        for cgid in sorted(wanted - self._slots.keys()):
            if self._free:
                self._slots[cgid] = self._free.pop()
            else:
                self._slots[cgid] = self._next
                self._next += 1
        return dict(self._slots)

    def table(self) -> dict[int, int]:
        return dict(self._slots)

    def slot(self, cgroup_id: int) -> int | None:
        return self._slots.get(cgroup_id)


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


def program_maps(bindings: Iterable[Binding], slots: Mapping[int, int]) -> ProgramMaps:
    """What the program's maps hold for `bindings`; `slots`: the identity table (every
    cgroup of the bindings' entries has one). A binding's bit is set only on its own
    targets: a cgroup's slot, a pid, a comm it names, the host mask if it is host-wide."""
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
        for cgid in b.entries.cgroups:
            slot = slots[cgid]
            slot_masks[slot] = slot_masks.get(slot, 0) | bit
        for pid in b.entries.pids:
            pids[pid] = pids.get(pid, 0) | bit
        if b.entries.cgroups:
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
