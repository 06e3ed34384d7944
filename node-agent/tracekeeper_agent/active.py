"""What is loaded now, where the reconciler and the outputs meet.

The reconciler publishes its bindings (one ActiveProbe per loaded probe: a bit of a shared
program) to the ProgramBoard; the exporters and the event hub read from it, and take its
lock to read a program's maps, which the reconciler holds to close one. Neither side
imports the other: the board, below both, is all they share.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tracekeeper_agent.ports import (
    CountSample,
    HistogramSample,
    KernelCounters,
    LoadedProgram,
    ProgramPlan,
)
from tracekeeper_api.protocol import ProbeAssignment

log = logging.getLogger(__name__)


@dataclass
class EventCounts:
    """User-space counts of one binding's events (mutated on the loop only, by the hub)."""

    received: int = 0
    """Read from the ring buffer (records whose mask holds the binding's bit)."""
    delivered: int = 0
    """Put into a subscriber's queue, summed over subscribers."""
    backlog: int = 0
    """Lost because a subscriber's queue was full, summed over subscribers."""


@dataclass(eq=False)
class ActiveProbe:
    """A loaded probe: binding `bit` of a (possibly shared) program. A new one is published
    whenever the probe moves to another program or bit."""

    assignment: ProbeAssignment
    plan: ProgramPlan
    program: LoadedProgram
    bit: int = 0
    shared_by: int = 1
    """Bindings of the program (this one included), as of the last publish."""
    filter_entries: int = 0
    """Entries resolved for this probe (cgroups, pids, comms), as of the last map write."""
    counts: EventCounts = field(default_factory=EventCounts)

    @property
    def id(self) -> str:
        return self.assignment.id

    @property
    def namespace(self) -> str:
        return self.assignment.namespace

    @property
    def name(self) -> str:
        return self.assignment.name

    # The binding's share of the program's outputs (callers hold the board's lock).

    def read_counts(self) -> list[CountSample]:
        return self.program.read_counts(self.bit)

    def read_histograms(self) -> list[HistogramSample]:
        return self.program.read_histograms(self.bit)

    def read_counters(self) -> KernelCounters:
        return self.program.read_counters(self.bit)

    def live_keys(self) -> int:
        return self.program.live_keys(self.bit)


class ProgramReaders(Protocol):
    """Readers of loaded programs in other threads (the EventHub's ring buffer pollers)."""

    async def sync(self, probes: Sequence[ActiveProbe]) -> None:
        """Read exactly `probes` from now on; return once programs not in it are no longer
        read (they may be closed right after)."""


class ProgramBoard:
    """The published bindings, their readers, and the programs lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        """Held while a program is closed; readers of kernel maps in other threads (the
        metrics scrape, /v1/values) hold it too, so that they never read a freed program."""
        self._probes: tuple[ActiveProbe, ...] = ()
        self._readers: list[ProgramReaders] = []

    def probes(self) -> list[ActiveProbe]:
        """The loaded probes now (a snapshot: iterated from other threads)."""
        return list(self._probes)

    def find(self, probe_id: str) -> ActiveProbe | None:
        return next((p for p in self._probes if p.id == probe_id), None)

    def add_reader(self, reader: ProgramReaders) -> None:
        self._readers.append(reader)

    async def publish(self, probes: Sequence[ActiveProbe]) -> None:
        """Make `probes` the loaded ones; returns once every reader follows them."""
        self._probes = tuple(probes)
        for reader in self._readers:
            try:
                await reader.sync(self._probes)
            except Exception:
                log.exception("syncing the readers of loaded programs failed")
