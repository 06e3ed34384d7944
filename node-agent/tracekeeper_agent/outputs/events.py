"""Events: ring buffer records polled on threads, enriched and fanned out on the event loop.

One poller thread per events probe blocks in `poll_events` (BCC's ring_buffer_poll) and
hands each batch to the asyncio loop. There, records get their pod and container and go to
every subscriber's bounded queue and to the optional JSON-lines file. Memory is bounded
everywhere: a poller waits while too many of its batches are unprocessed (the ring then
fills and the kernel counts ring_full), and a subscriber whose queue is full loses the
event, counted as a backlog drop. Per program, exactly:

    matched - sampled_out = rate_limited + ring_full + received
    received = delivered + backlog          (for each subscriber, while subscribed)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tracekeeper_agent.active import ActiveProbe
from tracekeeper_agent.ports import Attributor, RawEvent
from tracekeeper_api.protocol import EventDrops

log = logging.getLogger(__name__)

Event = dict[str, Any]

DEFAULT_QUEUE_SIZE = 4096
DEFAULT_POLL_TIMEOUT_MS = 100
DEFAULT_INFLIGHT_BATCHES = 8

# Keys every event has; a captured tracepoint field with one of these names is written as
# field_<name> so that it never hides what the agent knows about the task.
BASE_KEYS = frozenset(
    {"time", "probe", "namespace", "pod", "container", "pid", "tid", "comm", "cgroupId"}
)


def rfc3339(wall_ns: int) -> str:
    """UTC time with nanoseconds: 2024-05-01T12:00:00.123456789Z."""
    seconds, nanos = divmod(wall_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


def monotonic_to_wall_offset() -> int:
    """Records carry bpf_ktime_get_ns() (CLOCK_MONOTONIC); add this to get wall time.
    Taken per batch, so that clock steps (NTP) are followed."""
    return time.time_ns() - time.monotonic_ns()


def enrich(probe_id: str, raw: RawEvent, attributor: Attributor, wall_offset_ns: int) -> Event:
    """The JSON object of one event: who (pod, container, task) and the captured fields."""
    ident = attributor.identify(raw.cgroup_id)
    event: Event = {
        "time": rfc3339(raw.ts_ns + wall_offset_ns),
        "probe": probe_id,
        "namespace": ident.namespace if ident else "",
        "pod": ident.pod if ident else "",
        "container": ident.container if ident else "",
        "pid": raw.pid,
        "tid": raw.tid,
        "comm": raw.comm,
        "cgroupId": raw.cgroup_id,
    }
    for name, value in raw.fields.items():
        event[f"field_{name}" if name in BASE_KEYS else name] = value
    return event


def encode(event: Event) -> str:
    """One JSON line (with its newline)."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n"


@dataclass
class EventCounts:
    """User-space counts of one loaded program's events (mutated on the loop only)."""

    received: int = 0
    """Read from the ring buffer."""
    delivered: int = 0
    """Put into a subscriber's queue, summed over subscribers."""
    backlog: int = 0
    """Lost because a subscriber's queue was full, summed over subscribers."""


_CLOSED: Any = object()


class Subscription:
    """A bounded queue of events of one probe (or all). Iterate it; close it when done.

    It receives events from the moment `EventHub.subscribe` returns. Events are shared
    between subscribers: treat them as read-only."""

    def __init__(self, hub: EventHub, probe_id: str | None, maxsize: int) -> None:
        self.probe_id = probe_id
        self.dropped = 0
        self._hub = hub
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self._closed = False

    def offer(self, event: Event) -> bool:
        """Queue an event without waiting; False (and counted) when the queue is full."""
        if self._closed:
            return False
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            return False
        return True

    def room(self) -> int:
        """How many more events the queue takes now (none once closed)."""
        return 0 if self._closed else self._queue.maxsize - self._queue.qsize()

    def refuse(self, count: int) -> None:
        """Count events dropped without being offered (no room for them)."""
        if not self._closed:
            self.dropped += count

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        event = await self.next()
        if event is None:
            raise StopAsyncIteration
        return event

    async def next(self) -> Event | None:
        """The next event; None when closed and drained."""
        if self._closed and self._queue.empty():
            return None
        event = await self._queue.get()
        return None if event is _CLOSED else event

    def drain(self) -> list[Event]:
        """Whatever is queued now, without waiting (for writing in batches)."""
        out: list[Event] = []
        while not self._queue.empty():
            event = self._queue.get_nowait()
            if event is not _CLOSED:
                out.append(event)
        return out

    def close(self) -> None:
        """Stop receiving; queued events can still be read, then iteration ends."""
        if self._closed:
            return
        self._closed = True
        self._hub._unsubscribe(self)
        # Wake a reader blocked on an empty queue; a full one has items to read first.
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_CLOSED)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.close()


class _Poller:
    """One thread blocking in a program's poll_events, handing batches to the loop."""

    def __init__(self, hub: EventHub, probe: ActiveProbe, loop: asyncio.AbstractEventLoop) -> None:
        self.probe = probe
        self.counts = EventCounts()
        self.failure: str | None = None
        self._hub = hub
        self._loop = loop
        self._stop = threading.Event()
        # Bounds the batches handed over but not yet processed by the loop.
        self._inflight = threading.Semaphore(hub.inflight_batches)
        self.thread = threading.Thread(target=self._run, name=f"tk-events:{probe.id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        program = self.probe.program
        timeout_ms = self._hub.poll_timeout_ms
        try:
            while not self._stop.is_set():
                batch = program.poll_events(timeout_ms)
                if batch and not self._hand_over(batch):
                    return
            # What reached the ring before the stop is delivered, not silently left behind.
            batch = program.poll_events(0)
            if batch:
                self._hand_over(batch)
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("events: polling %s failed; poller stopped", self.probe.id)

    def _hand_over(self, batch: list[RawEvent]) -> bool:
        # Wait (the ring buffer absorbs the pause, or the kernel counts ring_full) rather
        # than queue without bound when the loop falls behind.
        while not self._inflight.acquire(timeout=0.1):
            if self._loop.is_closed():
                return False
        try:
            self._loop.call_soon_threadsafe(self._hub._dispatch, self, batch)
        except RuntimeError:  # the loop closed: the agent is exiting
            return False
        return True

    def processed(self) -> None:
        self._inflight.release()


class EventHub:
    """Pollers for the loaded events probes and the subscribers of their streams.

    The reconciler calls `await hub.sync(active_probes)` after each apply and BEFORE it closes
    programs it replaced or removed: a poller must never poll a closed program."""

    def __init__(
        self,
        attributor: Attributor,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        poll_timeout_ms: int = DEFAULT_POLL_TIMEOUT_MS,
        inflight_batches: int = DEFAULT_INFLIGHT_BATCHES,
        sink: TextIO | None = None,
    ) -> None:
        self.queue_size = queue_size
        self.poll_timeout_ms = poll_timeout_ms
        self.inflight_batches = inflight_batches
        self._attributor = attributor
        self._sink = sink
        self._sink_failed = False
        self._pollers: dict[str, _Poller] = {}
        self._subs: list[Subscription] = []
        self._changing = asyncio.Lock()  # a sync or close at a time: they await joins

    # --- pollers ---------------------------------------------------------------------------

    async def sync(self, probes: Sequence[ActiveProbe]) -> None:
        """Run exactly one poller per events probe in `probes` (a replaced program gets a new
        poller); stopped pollers are joined. Subscribers of a probe that is gone are closed."""
        loop = asyncio.get_running_loop()
        wanted = {p.id: p for p in probes if p.plan.output_kind == "events"}
        async with self._changing:
            stale = [
                poller
                for pid, poller in self._pollers.items()
                if pid not in wanted or wanted[pid].program is not poller.probe.program
            ]
            await self._stop(stale)
            for poller in stale:
                del self._pollers[poller.probe.id]
                if poller.probe.id not in wanted:
                    for sub in [s for s in self._subs if s.probe_id == poller.probe.id]:
                        sub.close()
            for pid, probe in wanted.items():
                if pid not in self._pollers:
                    self._pollers[pid] = _Poller(self, probe, loop)
                    self._pollers[pid].start()

    async def close(self) -> None:
        """Stop every poller, end every subscription, close the file sink."""
        async with self._changing:
            await self._stop(list(self._pollers.values()))
            self._pollers.clear()
        for sub in list(self._subs):
            sub.close()
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    @staticmethod
    async def _stop(pollers: list[_Poller]) -> None:
        for poller in pollers:
            poller.stop()
        if pollers:
            # Joined off the loop: the threads need it to take their last batches. Those
            # batches are dispatched before this await resumes (callbacks run in order).
            def join() -> None:
                for p in pollers:
                    p.thread.join()

            await asyncio.to_thread(join)

    def running(self) -> dict[str, threading.Thread]:
        """The poller threads by probe id (for tests and debugging)."""
        return {pid: p.thread for pid, p in self._pollers.items()}

    def has_probe(self, probe_id: str) -> bool:
        return probe_id in self._pollers

    def counts(self, probe_id: str) -> EventCounts:
        """Counts of the probe's current program (zero when it has none)."""
        poller = self._pollers.get(probe_id)
        return poller.counts if poller is not None else EventCounts()

    def backlog_drops(self, probe_id: str) -> int:
        """For Reconciler(backlog_drops=...): the probe's user-space losses."""
        return self.counts(probe_id).backlog

    def drops(self, probe: ActiveProbe) -> EventDrops:
        """Every loss of the probe's current program, for its ProbeOutcome."""
        kernel = probe.program.read_counters()
        return EventDrops(
            rate_limited=kernel.rate_limited,
            ring_full=kernel.ring_full,
            backlog=self.counts(probe.id).backlog,
        )

    def failure(self, probe_id: str) -> str | None:
        """Why the probe's poller stopped on its own, if it did."""
        poller = self._pollers.get(probe_id)
        return poller.failure if poller is not None else None

    # --- subscribers -----------------------------------------------------------------------

    def subscribe(self, probe_id: str | None = None) -> Subscription:
        """Events of one probe (namespace/name), or of all probes with None."""
        sub = Subscription(self, probe_id, self.queue_size)
        self._subs.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    # --- on the loop -------------------------------------------------------------------------

    def _dispatch(self, poller: _Poller, batch: list[RawEvent]) -> None:
        poller.processed()
        counts = poller.counts
        counts.received += len(batch)
        probe_id = poller.probe.id
        subs = [s for s in self._subs if s.probe_id is None or s.probe_id == probe_id]
        if not subs and self._sink is None:
            return
        offset = monotonic_to_wall_offset()
        # Enrich only what some consumer can take now: under overload, enriching events
        # that every queue then refused was where the agent's time went (bench/README.md).
        keep = len(batch) if self._sink is not None else max(s.room() for s in subs)
        events = [enrich(probe_id, raw, self._attributor, offset) for raw in batch[:keep]]
        unoffered = len(batch) - len(events)
        for sub in subs:
            for event in events:
                if sub.offer(event):
                    counts.delivered += 1
                else:
                    counts.backlog += 1
            sub.refuse(unoffered)
            counts.backlog += unoffered
        if self._sink is not None:
            self._write(events)

    def _write(self, events: list[Event]) -> None:
        assert self._sink is not None
        try:
            self._sink.write("".join(encode(e) for e in events))
            self._sink.flush()
        except OSError:
            if not self._sink_failed:  # once, not once per batch
                log.exception("events: writing the events file failed")
            self._sink_failed = True


def open_events_file(path: str | Path) -> TextIO:
    """The --events-file sink: JSON lines appended (an agent restart keeps what was there)."""
    return open(path, "a", encoding="utf-8")  # closed by EventHub.close
