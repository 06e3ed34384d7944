"""Events: ring buffer records read in batches on threads, encoded once, fanned out as chunks.

One poller thread per events probe reads its ring (`poll_batch`: the mmap'd ring, no
Python call per record), and, when a subscriber has room or the JSON-lines file takes
it, encodes the whole batch to NDJSON bytes (event_encoding: identity once per cgroup,
time once per second). The file gets the chunk from that thread; the asyncio loop gets it
with one call_soon_threadsafe and only queues the same bytes object to every subscriber
(bounded in bytes), so a flood never holds the loop that serves the API. Memory is bounded
everywhere: a poller waits while too many of its chunks are not queued yet (the ring then
fills and the kernel counts ring_full), and a subscriber whose queue is full loses the
chunk whole, counted as a backlog drop. Per program, exactly:

    matched - sampled_out = rate_limited + ring_full + received
    received = delivered + backlog          (for each subscriber, while subscribed)
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tracekeeper_agent.active import ActiveProbe
from tracekeeper_agent.host.event_records import EventBatch, Records
from tracekeeper_agent.outputs.event_encoding import BASE_KEYS, BatchEncoder
from tracekeeper_agent.ports import Attributor, EventField, RawEvent
from tracekeeper_api.protocol import EventDrops

log = logging.getLogger(__name__)

Event = dict[str, Any]

DEFAULT_QUEUE_BYTES = 16 << 20
"""Per subscriber: NDJSON bytes queued and not yet written (about 80k events)."""
DEFAULT_POLL_TIMEOUT_MS = 100
DEFAULT_INFLIGHT_BATCHES = 8
DEFAULT_BATCH_INTERVAL = 0.002
"""A poller reads its ring at most once per interval (unless the last read was full)."""
DEFAULT_MAX_BATCH = 4096
"""Records per read at most: one chunk (about 0.7 MB of NDJSON). Also bounds how long one
encoding step holds the GIL (the longest C call, the final translate, ~0.5 ms)."""
SWITCH_INTERVAL = 0.0005
"""While pollers run, the interpreter's GIL switch interval (default 5 ms): how long the
event loop thread may wait for the GIL a busy poller holds, per handoff."""


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


class Subscription:
    """NDJSON chunks of one probe's events (or all probes'), bounded in bytes. Iterate it
    (each item: the bytes of one or more whole lines); close it when done.

    It receives events from the moment `EventHub.subscribe` returns. A chunk that does not
    fit is lost whole and its events counted in `dropped` (backlog): a slow subscriber
    never slows the reader or the other subscribers."""

    def __init__(self, hub: EventHub, probe_id: str | None, max_bytes: int) -> None:
        self.probe_id = probe_id
        self.max_bytes = max_bytes
        self.dropped = 0
        self.events = 0
        """Events queued so far (delivered to this subscriber)."""
        self._hub = hub
        self._chunks: deque[bytes] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()
        self._closed = False

    def offer(self, chunk: bytes, events: int) -> bool:
        """Queue a chunk of `events` lines without waiting; False (and counted) when it does
        not fit. An empty queue takes any chunk, so that one larger than the bound still
        gets through to a reader that keeps up."""
        if self._closed:
            return False
        if self._chunks and self._bytes + len(chunk) > self.max_bytes:
            self.dropped += events
            return False
        self._chunks.append(chunk)
        self._bytes += len(chunk)
        self.events += events
        self._ready.set()
        return True

    def has_room(self) -> bool:
        return not self._closed and (not self._chunks or self._bytes < self.max_bytes)

    def refuse(self, events: int) -> None:
        """Count events dropped without being offered (no room for them)."""
        if not self._closed:
            self.dropped += events

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.next()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def next(self) -> bytes | None:
        """Everything queued, once there is something; None when closed and drained."""
        while not self._chunks:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self.drain()

    def drain(self) -> bytes:
        """Whatever is queued now, without waiting."""
        out = b"".join(self._chunks)
        self._chunks.clear()
        self._bytes = 0
        return out

    def close(self) -> None:
        """Stop receiving; queued chunks can still be read, then iteration ends."""
        if self._closed:
            return
        self._closed = True
        self._hub._unsubscribe(self)
        self._ready.set()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.close()


class _Poller:
    """One thread per events probe: reads its ring in batches, encodes each batch once (off
    the event loop), hands the chunk to the loop, which only queues it per subscriber."""

    def __init__(self, hub: EventHub, probe: ActiveProbe, loop: asyncio.AbstractEventLoop) -> None:
        self.probe = probe
        self.counts = EventCounts()
        self.failure: str | None = None
        self._hub = hub
        self._loop = loop
        self._stop = threading.Event()
        self._encoders: dict[tuple[EventField, ...], BatchEncoder] = {}
        # Bounds the chunks handed over but not yet queued by the loop.
        self._inflight = threading.Semaphore(hub.inflight_batches)
        self.thread = threading.Thread(target=self._run, name=f"tk-events:{probe.id}", daemon=True)

    def start(self) -> None:
        # A poller busy encoding holds the GIL; the loop thread (the API) gets it back
        # after at most a switch interval. Process-wide, lowered only.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        program = self.probe.program
        timeout_ms = self._hub.poll_timeout_ms
        pace = self._hub.batch_interval
        most = self._hub.max_batch
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                batch = program.poll_batch(timeout_ms, most)
                if len(batch) and not self._hand_over(batch):
                    return
                # A batch per interval at most, unless the last one was full: many records
                # per batch under load (the cost is per batch), few wakeups.
                if len(batch) < most:
                    rest = pace - (time.monotonic() - started)
                    if rest > 0 and self._stop.wait(rest):
                        break
            # What reached the ring before the stop is delivered, not silently left behind.
            while len(batch := program.poll_batch(0, most)):
                if not self._hand_over(batch):
                    return
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("events: polling %s failed; poller stopped", self.probe.id)

    def _attribute(self, batch: EventBatch) -> list[tuple[str, Records]]:
        """Which probe each record is for. Today a program is one probe's: all of them.
        (A program shared by probes would split the batch here, by its binding mask.)"""
        return [(self.probe.id, batch.records)]

    def _hand_over(self, batch: EventBatch) -> bool:
        hub = self._hub
        for probe_id, records in self._attribute(batch):
            # Wait (the ring buffer absorbs the pause, or the kernel counts ring_full)
            # rather than queue without bound when the loop falls behind.
            while not self._inflight.acquire(timeout=0.1):
                if self._loop.is_closed():
                    return False
            chunk: bytes | None = None
            # Nothing is encoded for nobody: only when a subscriber has room or a file
            # takes it (the loop still counts every record).
            if hub.wants(probe_id):
                encoder = self._encoders.get(batch.layout.fields)
                if encoder is None:
                    encoder = BatchEncoder(probe_id, batch.layout, hub.attributor)
                    self._encoders[batch.layout.fields] = encoder
                chunk = encoder.encode(records, monotonic_to_wall_offset())
                hub.write(chunk)
            try:
                self._loop.call_soon_threadsafe(hub._dispatch, self, probe_id, len(records), chunk)
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
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        poll_timeout_ms: int = DEFAULT_POLL_TIMEOUT_MS,
        inflight_batches: int = DEFAULT_INFLIGHT_BATCHES,
        batch_interval: float = DEFAULT_BATCH_INTERVAL,
        max_batch: int = DEFAULT_MAX_BATCH,
        sink: BinaryIO | None = None,
    ) -> None:
        self.queue_bytes = queue_bytes
        self.poll_timeout_ms = poll_timeout_ms
        self.inflight_batches = inflight_batches
        self.batch_interval = batch_interval
        self.max_batch = max_batch
        self.attributor = attributor
        self._sink = sink
        self._sink_lock = threading.Lock()  # pollers of several probes write it
        self._sink_failed = False
        self._pollers: dict[str, _Poller] = {}
        self._subs: tuple[Subscription, ...] = ()
        """Replaced, never mutated: poller threads read it without a lock."""
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
        with self._sink_lock:
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
        sub = Subscription(self, probe_id, self.queue_bytes)
        self._subs = (*self._subs, sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        self._subs = tuple(s for s in self._subs if s is not sub)

    # --- on a poller thread ----------------------------------------------------------------

    def wants(self, probe_id: str) -> bool:
        """Whether a batch of the probe is worth encoding now: the file takes every event,
        a subscriber one that fits (the loop decides for good; this is a snapshot)."""
        if self._sink is not None and not self._sink_failed:
            return True
        return any(s.has_room() for s in self._subs if s.probe_id in (None, probe_id))

    def write(self, chunk: bytes) -> None:
        """Append a chunk to the events file (from the poller thread: never on the loop)."""
        with self._sink_lock:
            if self._sink is None or self._sink_failed:
                return
            try:
                self._sink.write(chunk)
                self._sink.flush()
            except OSError:
                log.exception("events: writing the events file failed")  # once
                self._sink_failed = True

    # --- on the loop -------------------------------------------------------------------------

    def _dispatch(self, poller: _Poller, probe_id: str, events: int, chunk: bytes | None) -> None:
        """Queue one chunk of `events` lines for every subscriber of the probe; without a
        chunk (nobody had room when it was read), every subscriber's backlog takes them."""
        poller.processed()
        counts = poller.counts
        counts.received += events
        for sub in self._subs:
            if sub.probe_id is not None and sub.probe_id != probe_id:
                continue
            if chunk is not None and sub.offer(chunk, events):
                counts.delivered += events
            else:
                if chunk is None:
                    sub.refuse(events)
                counts.backlog += events


def open_events_file(path: str | Path) -> BinaryIO:
    """The --events-file sink: JSON lines appended (an agent restart keeps what was there)."""
    return open(path, "ab")  # closed by EventHub.close
