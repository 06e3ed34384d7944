"""Plain fakes of the kernel seam for the output tests: a program whose maps are dicts and
whose ring buffer is a bounded deque behind an in-"kernel" rate limit, and an Attributor."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from tracekeeper_agent.active import ActiveProbe, ProgramBoard
from tracekeeper_agent.host.event_records import EventBatch, batch_of
from tracekeeper_agent.ports import (
    CountSample,
    HistogramSample,
    KernelCounters,
    ObjectUsage,
    PodIdentity,
    ProgramMaps,
    ProgramPlan,
    RawEvent,
)
from tracekeeper_api.protocol import ProbeAssignment


@dataclass
class FakeAttributor:
    pods: dict[int, PodIdentity] = field(default_factory=dict)

    def identify(self, cgroup_id: int) -> PodIdentity | None:
        return self.pods.get(cgroup_id)


class FakeProgram:
    """Implements LoadedProgram for one binding (bit 0). `emit` plays the kernel side of an
    events program: rate limit first, then a ring buffer of `ring_size` records."""

    adopted = False

    def __init__(
        self,
        *,
        counts: Sequence[CountSample] = (),
        histograms: Sequence[HistogramSample] = (),
        counters: KernelCounters | None = None,
        live: int = 0,
        ring_size: int = 1 << 20,
        rate_limit: int | None = None,
    ) -> None:
        self.counts = list(counts)
        self.histograms = list(histograms)
        self.counters = counters or KernelCounters()
        self.live = live
        self.ring: deque[RawEvent] = deque()
        self.ring_size = ring_size
        self.rate_limit = rate_limit
        self.admitted = 0
        self.fail_poll: Exception | None = None
        self.polls = 0
        self.closed = False
        self.objects = [ObjectUsage("prog", 42, 4096)]
        """What kernel_objects reports (tests set run times and maps)."""
        self._cond = threading.Condition()

    @property
    def program_ids(self) -> tuple[int, ...]:
        return (42,)

    def update_maps(self, maps: ProgramMaps) -> None:
        pass

    def invalidate(self) -> None:
        pass

    def clear_binding(self, bit: int) -> None:
        pass

    def read_counts(self, bit: int) -> list[CountSample]:
        return list(self.counts) if bit == 0 else []

    def read_histograms(self, bit: int) -> list[HistogramSample]:
        return list(self.histograms) if bit == 0 else []

    def read_counters(self, bit: int) -> KernelCounters:
        with self._cond:
            return self.counters if bit == 0 else KernelCounters()

    def live_keys(self, bit: int) -> int:
        return self.live if bit == 0 else 0

    def kernel_objects(self) -> list[ObjectUsage]:
        return list(self.objects)

    def emit(self, events: Sequence[RawEvent]) -> None:
        with self._cond:
            c = self.counters
            for ev in events:
                c = replace(c, matched=c.matched + 1)
                if self.rate_limit is not None and self.admitted >= self.rate_limit:
                    c = replace(c, rate_limited=c.rate_limited + 1)
                    continue
                self.admitted += 1
                if len(self.ring) >= self.ring_size:
                    c = replace(c, ring_full=c.ring_full + 1)
                    continue
                self.ring.append(ev)
            self.counters = c
            self._cond.notify_all()

    def poll_events(self, timeout_ms: int) -> list[RawEvent]:
        assert not self.closed, "poll_events on a closed program"
        with self._cond:
            self.polls += 1
            if self.fail_poll is not None:
                raise self.fail_poll
            if not self.ring and timeout_ms > 0:
                self._cond.wait(timeout_ms / 1000)
            batch = list(self.ring)
            self.ring.clear()
            return batch

    def poll_batch(self, timeout_ms: int, max_records: int) -> EventBatch:
        assert not self.closed, "poll_batch on a closed program"
        with self._cond:
            self.polls += 1
            if self.fail_poll is not None:
                raise self.fail_poll
            if not self.ring and timeout_ms > 0:
                self._cond.wait(timeout_ms / 1000)
            batch = [self.ring.popleft() for _ in range(min(max_records, len(self.ring)))]
            return batch_of(batch)

    def close(self) -> None:
        self.closed = True


def make_probe(
    probe_id: str,
    program: FakeProgram,
    *,
    kind: Literal["count", "histogram", "events"] = "count",
    by: Sequence[str] = ("pod",),
    spec: Mapping[str, object] | None = None,
) -> ActiveProbe:
    if spec is None:
        output: dict[str, object] = {"kind": kind, "by": list(by)}
        if kind == "histogram":
            spec = {"syscall": {"name": "read", "latency": True}, "output": output}
        else:
            spec = {"tracepoint": "syscalls:sys_enter_openat", "output": output}
    assignment = ProbeAssignment.model_validate(
        {"id": probe_id, "specHash": "0123456789abcdef", "spec": spec}
    )
    plan = ProgramPlan(
        shape=probe_id,
        source="",
        attachments=(),
        output_kind=kind,
        by=tuple(by),
    )
    return ActiveProbe(assignment=assignment, plan=plan, program=program)


def raw_event(n: int, *, cgroup_id: int = 1001, **fields: int | str) -> RawEvent:
    return RawEvent(
        ts_ns=1_000_000_000 + n,
        pid=100 + n,
        tid=100 + n,
        cgroup_id=cgroup_id,
        comm="nginx",
        fields={"seq": n, **fields},
    )


async def until(condition: Callable[[], bool], *, within: float = 10.0) -> None:
    """Wait for a condition with a deadline (no fixed sleeps: polls, yielding to the loop)."""
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.005)


class ListBoard(ProgramBoard):
    """A ProgramBoard showing whatever a list holds now (tests change the list between
    scrapes)."""

    def __init__(self, probes: Callable[[], Sequence[ActiveProbe]]) -> None:
        super().__init__()
        self._source = probes

    def probes(self) -> list[ActiveProbe]:
        return list(self._source())
