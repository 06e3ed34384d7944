"""Events: ring buffer records read in batches on threads, encoded once, fanned out as chunks.

One poller thread per events program (shared by the probes of its shape) reads its ring
(`poll_batch`: the mmap'd ring, no Python call per record), and, when a subscriber has room
or the JSON-lines file takes it, encodes the whole batch to NDJSON bytes (event_encoding:
identity once per cgroup, time once per second). The file gets the chunk from that thread;
the asyncio loop gets it with one call_soon_threadsafe and only queues the same bytes object
to every subscriber (bounded in bytes), so a flood never holds the loop that serves the API.
Memory is bounded everywhere: a poller waits while too many of its chunks are not queued yet
(the ring then fills and the kernel counts ring_full), and a subscriber whose queue is full
loses the chunk whole, counted as a backlog drop. A record carries the mask of the bindings
that kept it: the poller splits each batch by binding and encodes each probe's records as
its own, so a probe's subscribers see only its events.
Per binding (probe), exactly:

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
from pathlib import Path
from typing import Any, BinaryIO

from tracekeeper_agent.active import ActiveProbe, EventCounts
from tracekeeper_agent.host.event_records import EventBatch, Records
from tracekeeper_agent.outputs.event_encoding import BASE_KEYS, BatchEncoder
from tracekeeper_agent.ports import Attributor, EventField, LoadedProgram, RawEvent

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
    """One thread per events program: reads its ring in batches, splits each batch by
    binding, encodes each probe's part once (off the event loop), hands the chunks to the
    loop, which only queues them per subscriber."""

    def __init__(
        self,
        hub: EventHub,
        program: LoadedProgram,
        probes: tuple[ActiveProbe, ...],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.program = program
        self.probes = probes
        """The program's bindings now: replaced (never mutated) by EventHub.sync."""
        self.failure: str | None = None
        self._hub = hub
        self._loop = loop
        self._stop = threading.Event()
        self._encoders: dict[tuple[str, tuple[EventField, ...]], BatchEncoder] = {}
        # Bounds the chunks handed over but not yet queued by the loop.
        self._inflight = threading.Semaphore(hub.inflight_batches)
        name = f"tk-events:{probes[0].plan.shape}" if probes else "tk-events"
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        # A poller busy encoding holds the GIL; the loop thread (the API) gets it back
        # after at most a switch interval. Process-wide, lowered only.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        program = self.program
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
            log.exception("events: polling %s failed; poller stopped", self.thread.name)

    def _attribute(self, batch: EventBatch) -> list[tuple[ActiveProbe, Records]]:
        """Which probes the records are for: each binding gets those holding its bit."""
        if len(self.probes) == 1:
            only = self.probes[0]
            mine = batch.of_binding(only.bit)
            return [(only, mine)] if len(mine) else []
        out = []
        for probe in self.probes:
            mine = batch.of_binding(probe.bit)
            if len(mine):
                out.append((probe, mine))
        return out

    def _hand_over(self, batch: EventBatch) -> bool:
        hub = self._hub
        for probe, records in self._attribute(batch):
            probe_id = probe.id
            # Wait (the ring buffer absorbs the pause, or the kernel counts ring_full)
            # rather than queue without bound when the loop falls behind.
            while not self._inflight.acquire(timeout=0.1):
                if self._loop.is_closed():
                    return False
            chunk: bytes | None = None
            # Nothing is encoded for nobody: only when a subscriber has room or a file
            # takes it (the loop still counts every record).
            if hub.wants(probe_id):
                key = (probe_id, batch.layout.fields)
                encoder = self._encoders.get(key)
                if encoder is None:
                    encoder = BatchEncoder(probe_id, batch.layout, hub.attributor)
                    self._encoders[key] = encoder
                chunk = encoder.encode(records, monotonic_to_wall_offset())
                hub.write(chunk)
            try:
                self._loop.call_soon_threadsafe(hub._dispatch, self, probe, len(records), chunk)
            except RuntimeError:  # the loop closed: the agent is exiting
                return False
        return True

    def processed(self) -> None:
        self._inflight.release()


class EventHub:
    """Pollers for the loaded events programs and the subscribers of their probes' streams.

    A reader of the ProgramBoard: the reconciler's publish awaits `hub.sync(probes)`, and
    closes a program only after it: a poller must never poll a closed program."""

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
        self._pollers: dict[int, _Poller] = {}
        """By id() of the program polled."""
        self._subs: tuple[Subscription, ...] = ()
        """Replaced, never mutated: poller threads read it without a lock."""
        self._changing = asyncio.Lock()  # a sync or close at a time: they await joins

    # --- pollers ---------------------------------------------------------------------------

    async def sync(self, probes: Sequence[ActiveProbe]) -> None:
        """Run exactly one poller per events program of `probes`, attributing records to the
        probes bound in it now; stopped pollers are joined. Subscribers of a probe that is
        gone are closed."""
        loop = asyncio.get_running_loop()
        wanted: dict[int, list[ActiveProbe]] = {}
        programs: dict[int, LoadedProgram] = {}
        for p in probes:
            if p.plan.output_kind == "events":
                wanted.setdefault(id(p.program), []).append(p)
                programs[id(p.program)] = p.program
        async with self._changing:
            stale = [poller for key, poller in self._pollers.items() if key not in wanted]
            await self._stop(stale)
            for key in [k for k in self._pollers if k not in wanted]:
                del self._pollers[key]
            for key, bound in wanted.items():
                poller = self._pollers.get(key)
                if poller is None:
                    self._pollers[key] = _Poller(self, programs[key], tuple(bound), loop)
                    self._pollers[key].start()
                else:
                    poller.probes = tuple(bound)
            ids = {p.id for p in probes if p.plan.output_kind == "events"}
            for sub in [s for s in self._subs if s.probe_id is not None and s.probe_id not in ids]:
                sub.close()

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

    def _poller_of(self, probe_id: str) -> tuple[_Poller, ActiveProbe] | None:
        for poller in self._pollers.values():
            for probe in poller.probes:
                if probe.id == probe_id:
                    return poller, probe
        return None

    def running(self) -> dict[str, threading.Thread]:
        """The poller threads by the probe ids they read for (for tests and debugging)."""
        return {p.id: poller.thread for poller in self._pollers.values() for p in poller.probes}

    def has_probe(self, probe_id: str) -> bool:
        return self._poller_of(probe_id) is not None

    def counts(self, probe_id: str) -> EventCounts:
        """Counts of the probe's current binding (zero when it has none)."""
        found = self._poller_of(probe_id)
        return found[1].counts if found is not None else EventCounts()

    def failure(self, probe_id: str) -> str | None:
        """Why the poller of the probe's program stopped on its own, if it did."""
        found = self._poller_of(probe_id)
        return found[0].failure if found is not None else None

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

    def _dispatch(
        self, poller: _Poller, probe: ActiveProbe, events: int, chunk: bytes | None
    ) -> None:
        """Queue one chunk of `events` lines for every subscriber of the probe; without a
        chunk (nobody had room when it was read), every subscriber's backlog takes them."""
        poller.processed()
        counts, probe_id = probe.counts, probe.id
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
