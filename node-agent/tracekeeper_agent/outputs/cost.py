"""What each loaded probe costs on this node, from the kernel's own accounting.

Every BPF object (a program or a map) is split equally among the bindings of the programs
that hold it: a shape's program and its maps among that program's bindings, the node-wide
identity table among every binding on the node. Equal, not by hits: a program runs, and
its maps are held, for every binding alike (a miss costs the same whatever the bindings
are), and the kernel does not time the per-binding work of a hit. So the shares of a
node's probes add up to what the agent's programs cost in all.

Run time is attributed as it is spent: each reading splits the run time a program spent
since the previous reading among the bindings it has now, and adds the shares to each
probe's total. The totals only grow (Prometheus counters), whoever joins or leaves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from tracekeeper_agent.active import ActiveProbe, ProgramBoard
from tracekeeper_agent.ports import LoadedProgram, ObjectUsage
from tracekeeper_api.protocol import ProbeCost

RATE_WINDOW = 10.0
"""Seconds over which a reading's rates (ns per run, matched and events per second) are
taken: rates of a shorter window would be mostly noise."""

ObjectKey = tuple[str, int]


@dataclass(frozen=True)
class ProgramUsage:
    """One loaded program as read: what the kernel accounts to it, and its bindings."""

    objects: Sequence[ObjectUsage]
    bindings: Sequence[str]
    """Probe ids of the program's bindings."""


@dataclass
class Shares:
    """One reading split among the probes."""

    memory: dict[str, float] = field(default_factory=dict)
    run_ns: dict[str, float] = field(default_factory=dict)
    """Run time spent since the previous reading, by probe."""
    runs: dict[str, float] = field(default_factory=dict)
    seen: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Program id -> (run time ns, run count): what the next reading subtracts."""


def split_usage(programs: Sequence[ProgramUsage], seen: Mapping[int, tuple[int, int]]) -> Shares:
    """Each object's memory and (programs) its run time since `seen`, split equally among
    the bindings of every program holding it."""
    holders: dict[ObjectKey, set[str]] = {}
    usage: dict[ObjectKey, ObjectUsage] = {}
    for prog in programs:
        for obj in prog.objects:
            key: ObjectKey = (obj.kind, obj.id)
            usage[key] = obj
            holders.setdefault(key, set()).update(prog.bindings)
    shares = Shares()
    for k, obj in usage.items():
        who = holders[k]
        if not who:
            continue
        for probe in who:
            shares.memory[probe] = shares.memory.get(probe, 0.0) + obj.memlock / len(who)
        if obj.kind != "prog":
            continue
        shares.seen[obj.id] = (obj.run_time_ns, obj.run_count)
        before_ns, before_runs = seen.get(obj.id, (0, 0))
        if obj.run_count < before_runs or obj.run_time_ns < before_ns:
            before_ns = before_runs = 0  # statistics were switched off and on: counted anew
        spent_ns, runs = obj.run_time_ns - before_ns, obj.run_count - before_runs
        for probe in who:
            shares.run_ns[probe] = shares.run_ns.get(probe, 0.0) + spent_ns / len(who)
            shares.runs[probe] = shares.runs.get(probe, 0.0) + runs / len(who)
    return shares


@dataclass
class _Totals:
    run_ns: float = 0.0
    runs: float = 0.0


@dataclass(frozen=True)
class _Mark:
    """A probe's totals at the start of its current rate window."""

    at: float
    run_ns: float
    runs: float
    matched: int
    events: int


@dataclass(frozen=True)
class _Rates:
    ns_per_run: float | None = None
    matched_per_second: float | None = None
    events_per_second: float | None = None


class CostLedger:
    """Reads the board's programs and keeps each probe's attributed run time; read by the
    metrics scrape (any thread) and the state report (the loop), one reading at a time."""

    def __init__(
        self,
        board: ProgramBoard,
        *,
        clock: Callable[[], float] = time.monotonic,
        window: float = RATE_WINDOW,
    ) -> None:
        self._board = board
        self._clock = clock
        self._window = window
        self._lock = threading.Lock()
        self._seen: dict[int, tuple[int, int]] = {}
        self._totals: dict[str, _Totals] = {}
        self._marks: dict[str, _Mark] = {}
        self._rates: dict[str, _Rates] = {}

    def read(self) -> dict[str, ProbeCost]:
        """Every loaded probe's cost now, by probe id (a probe whose program cannot be read,
        closed under our feet, is left out of this reading)."""
        with self._lock:
            return self._read()

    def _read(self) -> dict[str, ProbeCost]:
        by_program: dict[int, tuple[LoadedProgram, list[ActiveProbe]]] = {}
        for probe in self._board.probes():
            by_program.setdefault(id(probe.program), (probe.program, []))[1].append(probe)
        programs: list[ProgramUsage] = []
        matched: dict[str, int] = {}
        read: list[ActiveProbe] = []
        for program, probes in by_program.values():
            try:
                with self._board.lock:  # a program is closed under this lock
                    objects = program.kernel_objects()
                    for p in probes:
                        matched[p.id] = p.read_counters().matched
            except Exception:  # closed meanwhile: the next reading has its successor
                continue
            programs.append(ProgramUsage(objects, [p.id for p in probes]))
            read.extend(probes)
        shares = split_usage(programs, self._seen)
        self._seen = shares.seen
        now = self._clock()
        costs = {}
        for probe in read:
            totals = self._totals.setdefault(probe.id, _Totals())
            totals.run_ns += shares.run_ns.get(probe.id, 0.0)
            totals.runs += shares.runs.get(probe.id, 0.0)
            rates = self._roll(probe.id, now, totals, matched[probe.id], probe.counts.received)
            costs[probe.id] = ProbeCost(
                run_time_ns=round(totals.run_ns),
                runs=round(totals.runs),
                ns_per_run=rates.ns_per_run,
                kernel_memory_bytes=round(shares.memory.get(probe.id, 0.0)),
                matched_per_second=rates.matched_per_second,
                events_per_second=rates.events_per_second,
            )
        for gone in self._totals.keys() - {p.id for p in read}:
            del self._totals[gone]
            self._marks.pop(gone, None)
            self._rates.pop(gone, None)
        return costs

    def _roll(self, probe_id: str, now: float, t: _Totals, matched: int, events: int) -> _Rates:
        mark = self._marks.get(probe_id)
        if mark is None:
            self._marks[probe_id] = _Mark(now, t.run_ns, t.runs, matched, events)
            return self._rates.setdefault(probe_id, _Rates())
        span = now - mark.at
        if span < self._window:
            return self._rates.get(probe_id, _Rates())
        runs = t.runs - mark.runs
        before = self._rates.get(probe_id, _Rates())
        rates = _Rates(
            # Statistics may have been off all window (sampled): the last figure stands.
            ns_per_run=round((t.run_ns - mark.run_ns) / runs, 1)
            if runs >= 1
            else before.ns_per_run,
            matched_per_second=round(max(matched - mark.matched, 0) / span, 3),
            events_per_second=round(max(events - mark.events, 0) / span, 3),
        )
        self._marks[probe_id] = _Mark(now, t.run_ns, t.runs, matched, events)
        self._rates[probe_id] = rates
        return rates
