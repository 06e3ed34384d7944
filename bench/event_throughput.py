"""Events end to end: produced in kernel vs delivered to an HTTP client of the NDJSON stream.

The real agent (cli.running_agent, its aiohttp app served on loopback) runs an events probe
on tracepoint syscalls:sys_enter_getppid for one pod; a client in its own process
(bench/ndjson_client.py) reads GET /v1/events and counts lines. bench/tk_loop.c calls
getppid() in the pod's container cgroup at rising rates (1 ms ticks) for a few seconds
each, then unthrottled. After each step the benchmark waits until every event is
accounted for, then checks, per step:

    produced (matched - sampled_out, kernel) = delivered (client lines)
                                             + rate_limited + ring_full (kernel)
                                             + backlog (agent, subscriber queue full)

A last step runs with an in-kernel rate limit, and a profiled step (cProfile of the event
loop thread and of the ring buffer poller thread) shows where the agent spends its time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import logging
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Table, cgroup_sandbox, met, profile_table, rate, require_root, run_loop
from tracekeeper_agent.bpf.loader import BccLoader
from tracekeeper_agent.host.event_records import EventBatch
from tracekeeper_agent.ports import (
    CountSample,
    HistogramSample,
    IdentityMap,
    KernelCounters,
    LoadedProgram,
    ObjectUsage,
    ProgramMaps,
    ProgramPlan,
    RawEvent,
)
from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_sim.served_agent import TOKEN, FakePod, ServedAgent, kubepods_qos, served_agent

PROBE_ID = "bench/events"
GOAL_RATE = 500_000
READ_GOAL = 1_000_000
RATES = (100_000, 250_000, 500_000, 750_000, 1_000_000)
UNTHROTTLED_CALLS = 4_000_000
RATE_LIMIT = 50_000
PUSHES = 20
PUSH_INTERVAL = 0.05
SETTLE_TIMEOUT = 30.0
log = logging.getLogger("bench.event_throughput")


# --- profiling the poller thread ---------------------------------------------------------------


class ProfiledProgram:
    """A loaded program whose poll_events (the poller thread: ring buffer read, decode) runs
    under a cProfile of its own while `profiling` is set."""

    def __init__(self, inner: LoadedProgram, profile: cProfile.Profile, on: threading.Event):
        self._inner = inner
        self._profile = profile
        self._on = on
        self._enabled = False
        self.adopted = inner.adopted

    @property
    def program_ids(self) -> tuple[int, ...]:
        return self._inner.program_ids

    def update_maps(self, maps: ProgramMaps) -> None:
        self._inner.update_maps(maps)

    def invalidate(self) -> None:
        self._inner.invalidate()

    def clear_binding(self, bit: int) -> None:
        self._inner.clear_binding(bit)

    def read_counts(self, bit: int) -> list[CountSample]:
        return self._inner.read_counts(bit)

    def read_histograms(self, bit: int) -> list[HistogramSample]:
        return self._inner.read_histograms(bit)

    def read_counters(self, bit: int) -> KernelCounters:
        return self._inner.read_counters(bit)

    def live_keys(self, bit: int) -> int:
        return self._inner.live_keys(bit)

    def kernel_objects(self) -> list[ObjectUsage]:
        return self._inner.kernel_objects()

    def poll_batch(self, timeout_ms: int, max_records: int) -> EventBatch:
        # Called on the poller thread only: its profile covers the whole thread (read,
        # decode, encode, hand-over) from the first read after `on` until it is cleared.
        if self._on.is_set() != self._enabled:
            self._enabled = self._on.is_set()
            if self._enabled:
                self._profile.enable()
            else:
                self._profile.disable()
        return self._inner.poll_batch(timeout_ms, max_records)

    def poll_events(self, timeout_ms: int) -> list[RawEvent]:
        if not self._on.is_set():
            return self._inner.poll_events(timeout_ms)
        self._profile.enable()
        try:
            return self._inner.poll_events(timeout_ms)
        finally:
            self._profile.disable()

    def close(self) -> None:
        self._inner.close()


class ProfilingLoader:
    """BccLoader whose programs can be profiled (bench.event_throughput only)."""

    def __init__(self) -> None:
        self.profile = cProfile.Profile()
        self.on = threading.Event()
        self._loader = BccLoader()

    def load(self, plan: ProgramPlan) -> ProfiledProgram:
        return ProfiledProgram(self._loader.load(plan), self.profile, self.on)

    @property
    def identities(self) -> IdentityMap:
        return self._loader.identities

    def drop_leftovers(self) -> int:
        return self._loader.drop_leftovers()

    def close(self) -> None:
        self._loader.close()


# --- one step -------------------------------------------------------------------------------------


@dataclass
class Step:
    label: str
    gen_seconds: float
    produced: int
    delivered: int
    """Lines received, summed over the step's clients (or records read, without a client)."""
    per_client: list[int]
    hub_delivered: int
    rate_limited: int
    ring_full: int
    backlog: int
    deliver_seconds: float
    settled: bool
    cpu: dict[str, float]

    @property
    def unaccounted(self) -> int:
        """Per client: produced = delivered + kernel drops + that client's backlog; summed."""
        clients = max(1, len(self.per_client))
        kernel = self.rate_limited + self.ring_full
        return clients * self.produced - self.delivered - clients * kernel - self.backlog

    @property
    def lost(self) -> int:
        return self.rate_limited + self.ring_full + self.backlog

    @property
    def rate(self) -> float:
        """Delivered per second, per client."""
        return self.delivered / max(1, len(self.per_client)) / self.deliver_seconds


class Client:
    """bench.ndjson_client in its own process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines = 0
        self.last_ns = 0
        self.first = ""
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, url: str) -> Client:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.ndjson_client",
            f"{url}/v1/events?probe={PROBE_ID}",
            TOKEN,
            stdout=asyncio.subprocess.PIPE,
        )
        client = cls(proc)
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        if line != "ready":
            raise RuntimeError(f"ndjson client: {line}")
        client._reader = asyncio.create_task(client._read())
        return client

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            kind, _, rest = raw.decode().strip().partition(" ")
            if kind == "lines":
                n, t = rest.split()
                self.lines, self.last_ns = int(n), int(t)
            elif kind == "first":
                self.first = rest

    async def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        await self.proc.wait()
        if self._reader is not None:
            await self._reader


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of this process's threads, by Python thread name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        name = names.get(int(tid), "other")
        name = "poller" if name.startswith("tk-events") else name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


async def step(
    served: ServedAgent,
    pod: FakePod,
    label: str,
    loop_args: list[str | int],
    *,
    clients: int = 1,
    during: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> Step:
    """Run the generator with `clients` clients reading the stream (with none, 'delivered'
    is what the agent read from the ring), and wait until every event is accounted for.
    `during` runs alongside the generator (cancelled when it ends)."""
    hub = served.agent.hub
    (active,) = served.agent.reconciler.active_probes()
    readers = [await Client.start(served.url) for _ in range(clients)]
    try:
        k0, h0 = active.read_counters(), hub.counts(PROBE_ID)
        h0_received, h0_delivered, h0_backlog = h0.received, h0.delivered, h0.backlog
        cpu0 = thread_cpu()
        t0 = time.monotonic_ns()
        side = asyncio.create_task(during()) if during is not None else None
        try:
            loop = await asyncio.to_thread(run_loop, "-c", pod.container_dir, *loop_args)
        finally:
            if side is not None:
                side.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await side
        deadline = time.monotonic() + SETTLE_TIMEOUT
        settled = False
        stable_since = 0.0
        progress, last_progress_ns = (-1, -1), loop.t_end
        while time.monotonic() < deadline:
            k, h = active.read_counters(), hub.counts(PROBE_ID)
            produced = (k.matched - k0.matched) - (k.sampled_out - k0.sampled_out)
            in_agent = (h.received - h0_received) + (k.ring_full - k0.ring_full)
            in_agent += k.rate_limited - k0.rate_limited
            delivered = h.delivered - h0_delivered
            lines = sum(c.lines for c in readers) if readers else delivered
            if (h.received, lines) != progress:
                progress, last_progress_ns = (h.received, lines), time.monotonic_ns()
            if produced == in_agent and lines == delivered:
                stable_since = stable_since or time.monotonic()
                if time.monotonic() - stable_since > 0.3:
                    settled = True
                    break
            else:
                stable_since = 0.0
            await asyncio.sleep(0.02)
        cpu1 = thread_cpu()
    finally:
        for c in readers:
            await c.stop()
    k, h = active.read_counters(), hub.counts(PROBE_ID)
    if readers:
        per_client = [c.lines for c in readers]
        last = max(c.last_ns or t0 for c in readers)
    else:
        per_client, last = [], last_progress_ns
    return Step(
        label=label,
        gen_seconds=loop.ns_total / 1e9,
        produced=(k.matched - k0.matched) - (k.sampled_out - k0.sampled_out),
        delivered=sum(per_client) if readers else h.received - h0_received,
        per_client=per_client,
        hub_delivered=h.delivered - h0_delivered,
        rate_limited=k.rate_limited - k0.rate_limited,
        ring_full=k.ring_full - k0.ring_full,
        backlog=h.backlog - h0_backlog,
        deliver_seconds=max(loop.t_end, last) / 1e9 - t0 / 1e9,
        settled=settled,
        cpu={name: cpu1.get(name, 0.0) - cpu0.get(name, 0.0) for name in cpu1},
    )


def probe(pod: FakePod, rate_limit: int | None = None) -> dict[str, object]:
    output: dict[str, object] = {"kind": "events"}
    if rate_limit:
        output["rateLimit"] = rate_limit
    return {
        "id": PROBE_ID,
        "specHash": uuid.uuid4().hex[:16],
        "spec": {"tracepoint": "syscalls:sys_enter_getppid", "output": output},
        "targets": {"pods": [pod.target()]},
    }


class Pushes:
    """PUT /v1/state of the unchanged probe (a new revision, nothing to reload): the API's
    latency, idle or while events flood the agent."""

    def __init__(self, served: ServedAgent, probes: list[dict[str, object]]) -> None:
        self.served = served
        self.probes = probes
        self.revision = 100

    async def one(self) -> float:
        self.revision += 1
        t = time.perf_counter()
        await self.served.put_state(self.revision, self.probes)
        return (time.perf_counter() - t) * 1000

    async def series(self, out: list[float], *, count: int | None = None) -> None:
        while count is None or len(out) < count:
            out.append(await self.one())
            await asyncio.sleep(PUSH_INTERVAL)


@dataclass
class Results:
    steps: list[Step]
    unsubscribed: Step
    three: Step
    overloaded: Step
    flood: Step
    profiled: Step
    reader_profile: cProfile.Profile
    loop_profile: cProfile.Profile
    idle_push_ms: list[float]
    flood_push_ms: list[float]


def lossless(s: Step) -> bool:
    return s.lost == 0 and s.unaccounted == 0 and s.settled


async def measure(pod: FakePod, seconds: float) -> Results:
    loader = ProfilingLoader()
    async with served_agent(detect_root(), loader=loader) as served:
        probes = [probe(pod)]
        await served.put_state(1, probes)
        pushes = Pushes(served, probes)
        idle_push_ms: list[float] = []
        await pushes.series(idle_push_ms, count=PUSHES)
        steps = []
        for r in RATES:
            args: list[str | int] = ["-r", r, "-t", str(seconds)]
            steps.append(await step(served, pod, f"{rate(r)}/s", args))
        top = max((r for r, s in zip(RATES, steps, strict=True) if lossless(s)), default=RATES[0])
        label = f"{rate(top)}/s, 3 clients"
        three = await step(served, pod, label, ["-r", top, "-t", str(seconds)], clients=3)
        label = f"{rate(2 * top)}/s (2x the lossless rate)"
        overloaded = await step(served, pod, label, ["-r", 2 * top, "-t", str(seconds)])
        flood_push_ms: list[float] = []
        flood = await step(
            served,
            pod,
            "unthrottled, PUT /v1/state every 50 ms",
            ["-n", UNTHROTTLED_CALLS],
            during=lambda: pushes.series(flood_push_ms),
        )
        label = "unthrottled, no client (ring -> agent only)"
        unsubscribed = await step(served, pod, label, ["-n", UNTHROTTLED_CALLS], clients=0)
        # The profiled run at the top lossless rate: cProfile of the poller thread (read,
        # decode, encode) and of the loop thread (here: queueing, HTTP writes).
        loop_profile = cProfile.Profile()
        loader.on.set()
        loop_profile.enable()
        label = f"{rate(top)}/s, profiled"
        profiled = await step(served, pod, label, ["-r", top, "-t", str(seconds)])
        loop_profile.disable()
        loader.on.clear()
        pushes.revision += 1  # a new program: fresh counters
        await served.put_state(pushes.revision, [probe(pod, RATE_LIMIT)])
        label = f"unthrottled, rateLimit {rate(RATE_LIMIT)}/s"
        steps.append(await step(served, pod, label, ["-n", UNTHROTTLED_CALLS]))
    return Results(
        steps,
        unsubscribed,
        three,
        overloaded,
        flood,
        profiled,
        loader.profile,
        loop_profile,
        idle_push_ms,
        flood_push_ms,
    )


def run(seconds: float) -> list[Table]:
    with cgroup_sandbox("tk-bench-events") as top:
        pod = FakePod.new(kubepods_qos(top), "gen")
        pod.container_dir.mkdir(parents=True)
        results = asyncio.run(measure(pod, seconds))

    table = Table(
        "events end to end: kernel -> agent -> HTTP NDJSON client (one events probe)",
        [
            "offered",
            "clients",
            "produced/s",
            "delivered/s per client",
            "produced",
            "delivered",
            "rate_limited",
            "ring_full",
            "backlog",
            "unaccounted",
            "lost",
            "agent CPU",
        ],
    )
    r = results
    exact = True
    for s in [*r.steps, r.three, r.overloaded, r.flood, r.unsubscribed]:
        exact = exact and s.unaccounted == 0 and s.settled
        cpu = sum(s.cpu.values()) / s.deliver_seconds
        table.add(
            s.label,
            str(len(s.per_client)),
            rate(s.produced / s.gen_seconds),
            " / ".join(rate(n / s.deliver_seconds) for n in s.per_client) or rate(s.rate),
            f"{s.produced:,}",
            f"{s.delivered:,}",
            f"{s.rate_limited:,}",
            f"{s.ring_full:,}",
            f"{s.backlog:,}",
            f"{s.unaccounted:,}" + ("" if s.settled else " (unsettled)"),
            f"{s.lost / s.produced:.1%}" if s.produced else "",
            f"{cpu:.0%}",
        )
    best_lossless = max((s.rate for s in r.steps if lossless(s)), default=0.0)
    table.notes += [
        "produced/s: events over the generator's run time; delivered/s: client lines over the "
        "time from the generator's start to the client's last byte",
        "unaccounted = produced - delivered - rate_limited - ring_full - backlog (per client, "
        "summed), after waiting for the pipeline to drain",
        "agent CPU: CPU time of the agent's threads (all of this process) / that same time; "
        "the machine has 2 cores, shared with the generator and the clients",
        "backlog: events of chunks a client's queue (16 MiB) could not take; a chunk nobody "
        "can take is not encoded",
    ]
    summary = Table("events: the goals", ["goal", "measured", "met?"])
    summary.add(
        f">= {rate(GOAL_RATE)}/s delivered with no loss, one client",
        f"{rate(best_lossless)}/s",
        met(best_lossless >= GOAL_RATE),
    )
    u = r.unsubscribed
    summary.add(
        f">= {rate(READ_GOAL)}/s read and decoded, no subscriber",
        f"{rate(u.rate)}/s read ({u.ring_full / max(1, u.produced):.0%} ring_full)",
        met(u.rate >= READ_GOAL),
    )
    o = r.overloaded
    summary.add(
        "at 2x the lossless rate: delivered >= 90% of the lossless rate",
        f"{rate(o.rate)}/s at {o.label.split(' ')[0]} ({o.rate / max(1.0, best_lossless):.0%})",
        met(o.rate >= 0.9 * best_lossless),
    )
    t = r.three
    single = next((s.rate for s in r.steps if s.label == t.label.split(",")[0]), best_lossless)
    worst = min(t.per_client) / t.deliver_seconds if t.per_client else 0.0
    summary.add(
        "3 clients: each >= 1/3 of the single-client rate",
        f"each >= {rate(worst)}/s vs {rate(single)}/s single ({worst / max(1.0, single):.0%})",
        met(worst >= single / 3),
    )
    idle = statistics.median(r.idle_push_ms)
    flood = statistics.median(r.flood_push_ms) if r.flood_push_ms else float("nan")
    summary.add(
        "PUT /v1/state latency during the flood <= 2x idle (median)",
        f"{flood:.1f} ms vs {idle:.1f} ms idle ({len(r.flood_push_ms)} pushes, "
        f"max {max(r.flood_push_ms, default=0):.1f} ms)",
        met(flood <= 2 * idle),
    )
    summary.add("every drop accounted, every row", "yes" if exact else "NO", met(exact))

    p = r.profiled
    threads = ", ".join(f"{name} {sec:.2f} s" for name, sec in sorted(p.cpu.items()) if sec > 0)
    reader = profile_table(
        f"profile: agent poller thread (ring read, decode, encode, hand-over), {p.label} "
        f"({p.produced - p.ring_full:,} events read, {p.delivered:,} delivered)",
        r.reader_profile,
        top=15,
        per=("event", max(1, p.produced - p.ring_full)),
    )
    reader.notes.append(
        f"thread CPU in the profiled run ({p.deliver_seconds:.2f} s): {threads}; "
        f"delivered {rate(p.rate)}/s under cProfile"
    )
    loop_table = profile_table(
        f"profile: agent event loop thread, same run ({p.delivered:,} events delivered)",
        r.loop_profile,
        top=10,
        per=("event", max(1, p.delivered)),
    )
    return [table, summary, reader, loop_table]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="per offered rate")
    args = parser.parse_args()
    require_root()
    logging.basicConfig(level=logging.WARNING)
    for table in run(args.seconds):
        table.print()


if __name__ == "__main__":
    main()
