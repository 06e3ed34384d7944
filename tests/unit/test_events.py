"""The event pipeline: poller threads, enrichment, fan-out, backlog accounting, the file sink
and the NDJSON stream."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.unit.output_fakes import FakeAttributor, FakeProgram, make_probe, raw_event, until
from tracekeeper_agent.outputs.events import (
    EventHub,
    Subscription,
    enrich,
    open_events_file,
    rfc3339,
)
from tracekeeper_agent.ports import PodIdentity, RawEvent
from tracekeeper_agent.service.event_stream import ndjson_handler

PODS = FakeAttributor({1001: PodIdentity("team-a", "web-0", "app")})


def parse(chunk: bytes | None) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (chunk or b"").splitlines()]


async def read_events(sub: Subscription, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < n:
        chunk = await sub.next()
        assert chunk is not None, f"stream ended after {len(out)} of {n} events"
        out += parse(chunk)
    return out


def test_enrich_adds_pod_container_and_fields() -> None:
    raw = RawEvent(
        ts_ns=5_000_000_123,
        pid=7,
        tid=8,
        cgroup_id=1001,
        comm="nginx",
        fields={"filename": "/etc/hosts", "pid": 99},
    )
    event = enrich("team-a/opens", raw, PODS, wall_offset_ns=1_700_000_000_000_000_000)
    assert event == {
        "time": "2023-11-14T22:13:25.000000123Z",
        "probe": "team-a/opens",
        "namespace": "team-a",
        "pod": "web-0",
        "container": "app",
        "pid": 7,
        "tid": 8,
        "comm": "nginx",
        "cgroupId": 1001,
        "filename": "/etc/hosts",
        "field_pid": 99,  # a captured field never hides the task's pid
    }
    unknown = enrich("team-a/opens", RawEvent(0, 1, 1, 5, "sh", {}), PODS, 0)
    assert (unknown["namespace"], unknown["pod"], unknown["container"]) == ("", "", "")


def test_rfc3339() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00.000000000Z"


async def test_fan_out_to_two_subscribers() -> None:
    program = FakeProgram()
    hub = EventHub(PODS)
    await hub.sync([make_probe("team-a/opens", program, kind="events")])
    try:
        one, all_probes = hub.subscribe("team-a/opens"), hub.subscribe(None)
        program.emit([raw_event(n) for n in range(50)])
        got_one = await read_events(one, 50)
        got_all = await read_events(all_probes, 50)
        assert [e["seq"] for e in got_one] == list(range(50))
        assert got_all == got_one
        assert got_one[0]["pod"] == "web-0"
        counts = hub.counts("team-a/opens")
        assert (counts.received, counts.delivered, counts.backlog) == (50, 100, 0)
    finally:
        await hub.close()
    assert await one.next() is None  # closing the hub ends every subscription


async def test_slow_subscriber_loses_whole_chunks_counted_as_backlog() -> None:
    program = FakeProgram(rate_limit=700, ring_size=500)
    probe = make_probe("team-a/opens", program, kind="events")
    hub = EventHub(PODS, queue_bytes=1)  # a queue with a chunk in it is full
    await hub.sync([probe])
    try:
        fast, slow = hub.subscribe("team-a/opens"), hub.subscribe("team-a/opens")
        seen: list[int] = []

        async def read_fast() -> None:
            async for chunk in fast:
                seen.extend(e["seq"] for e in parse(chunk))

        reader = asyncio.create_task(read_fast())
        for start in range(0, 1000, 50):
            program.emit([raw_event(n) for n in range(start, start + 50)])
            # Bursts smaller than a queue, each read before the next: only `slow` lags.
            want = min(start + 50, 700)

            def caught_up(want: int = want) -> bool:
                return not program.ring and len(seen) == want

            await until(caught_up)
        kernel = program.read_counters(0)
        # The ring was never full; the in-kernel rate limit (700) dropped the last 300.
        assert (kernel.matched, kernel.rate_limited, kernel.ring_full) == (1000, 300, 0)
        produced = kernel.matched - kernel.sampled_out
        counts = hub.counts(probe.id)
        await until(lambda: counts.received == produced - kernel.rate_limited - kernel.ring_full)
        await until(lambda: len(seen) == 700)
        assert seen == list(range(700))
        # Each burst was one chunk: the slow one kept the first, lost the 13 others whole.
        assert slow.dropped == 700 - 50
        assert counts.backlog == slow.dropped
        assert [e["seq"] for e in parse(slow.drain())] == list(range(50))
        # Per subscriber: produced = kernel drops + backlog drops + delivered.
        for sub_delivered, sub_dropped in [(len(seen), fast.dropped), (50, slow.dropped)]:
            assert produced == kernel.rate_limited + kernel.ring_full + sub_dropped + sub_delivered
        assert counts.delivered + counts.backlog == 2 * counts.received
        assert counts is probe.counts and counts.backlog == 650  # what the report shows
        reader.cancel()
    finally:
        await hub.close()


async def test_a_full_ring_is_counted_in_the_identity() -> None:
    program = FakeProgram(ring_size=10)
    probe = make_probe("team-a/opens", program, kind="events")
    program.emit([raw_event(n) for n in range(25)])  # before any poller: 15 overflow the ring
    hub = EventHub(PODS)
    sub = hub.subscribe("team-a/opens")
    await hub.sync([probe])
    try:
        counts = hub.counts(probe.id)
        await until(lambda: counts.received == 10)
        kernel = program.read_counters(0)
        assert kernel.ring_full == 15
        assert kernel.matched == kernel.ring_full + kernel.rate_limited + counts.received
        assert len(parse(sub.drain())) == counts.delivered == 10
    finally:
        await hub.close()


async def test_pollers_start_stop_and_replace_cleanly() -> None:
    first, second = FakeProgram(), FakeProgram()
    hub = EventHub(PODS, poll_timeout_ms=20)
    events = make_probe("team-a/opens", first, kind="events")
    counter = make_probe("team-a/count", FakeProgram(), kind="count")
    await hub.sync([events, counter])
    threads = hub.running()
    assert list(threads) == ["team-a/opens"]  # count probes have no poller
    old = threads["team-a/opens"]
    assert old.is_alive()
    sub = hub.subscribe("team-a/opens")

    # A changed spec: same id, new program. The old thread is joined before sync returns, so
    # the reconciler may close the old program right after.
    replaced = make_probe("team-a/opens", second, kind="events")
    first.emit([raw_event(1)])
    await hub.sync([replaced, counter])
    first.close()
    assert not old.is_alive()
    new = hub.running()["team-a/opens"]
    assert new.is_alive() and new is not old
    assert [e["seq"] for e in parse(await sub.next())] == [1]  # the old poller's last read
    second.emit([raw_event(2)])
    assert [e["seq"] for e in parse(await sub.next())] == [2]  # outlives the replacement

    # Removed: joined, and its stream ends.
    await hub.sync([counter])
    second.close()
    assert not new.is_alive()
    assert hub.running() == {}
    assert await sub.next() is None
    assert not hub.has_probe("team-a/opens")
    await hub.close()


async def test_a_failing_poll_stops_its_poller_with_the_reason() -> None:
    program = FakeProgram()
    program.fail_poll = OSError("ring buffer gone")
    hub = EventHub(PODS)
    await hub.sync([make_probe("team-a/opens", program, kind="events")])
    thread = hub.running()["team-a/opens"]
    await until(lambda: not thread.is_alive())
    assert hub.failure("team-a/opens") == "OSError: ring buffer gone"
    await hub.close()


async def test_events_file_sink(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    program = FakeProgram()
    hub = EventHub(PODS, sink=open_events_file(path))
    await hub.sync([make_probe("team-a/opens", program, kind="events")])
    program.emit([raw_event(n) for n in range(3)])
    await until(lambda: hub.counts("team-a/opens").received == 3)
    await hub.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [0, 1, 2]
    assert json.loads(lines[0])["probe"] == "team-a/opens"


async def test_ndjson_stream_over_http() -> None:
    program = FakeProgram()
    hub = EventHub(PODS)
    await hub.sync([make_probe("team-a/opens", program, kind="events")])
    app = web.Application()
    app.router.add_get("/v1/events", ndjson_handler(hub))
    async with TestClient(TestServer(app)) as client:
        missing = await client.get("/v1/events", params={"probe": "team-a/nope"})
        assert missing.status == 404
        assert "team-a/nope" in (await missing.json())["error"]

        resp = await client.get("/v1/events", params={"probe": "team-a/opens"})
        assert resp.status == 200
        assert resp.content_type == "application/x-ndjson"
        # The handler subscribed before sending the headers: nothing emitted now is missed.
        program.emit([raw_event(n) for n in range(5)])
        lines = [json.loads(await resp.content.readline()) for _ in range(5)]
        assert [e["seq"] for e in lines] == list(range(5))
        assert lines[0]["pod"] == "web-0"
        # Removing the probe ends the stream.
        await hub.sync([])
        assert await resp.content.read() == b""
        resp.release()
    await hub.close()


class CountingAttributor(FakeAttributor):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def identify(self, cgroup_id: int) -> PodIdentity | None:
        self.calls += 1
        return super().identify(cgroup_id)


async def test_events_no_queue_can_take_are_not_encoded() -> None:
    """Overload: a stalled subscriber's full queue refuses a batch before any work is spent
    on it, a batch is identified once per cgroup, and the accounting stays exact."""
    program = FakeProgram(ring_size=1000)
    probe = make_probe("team-a/opens", program, kind="events")
    attributor = CountingAttributor()
    hub = EventHub(attributor, queue_bytes=1)
    await hub.sync([probe])
    try:
        stalled = hub.subscribe("team-a/opens")
        counts = hub.counts(probe.id)
        program.emit([raw_event(n) for n in range(500)])
        await until(lambda: counts.received == 500)
        assert attributor.calls == 1  # one batch, one cgroup: identified once
        program.emit([raw_event(n) for n in range(500, 1000)])
        await until(lambda: counts.received == 1000)
        assert attributor.calls == 1  # the full queue took nothing: nothing encoded
        assert (counts.delivered, counts.backlog, stalled.dropped) == (500, 500, 500)
        assert [e["seq"] for e in parse(stalled.drain())] == list(range(500))
    finally:
        await hub.close()


async def test_a_subscription_is_bounded_in_bytes_and_loses_whole_chunks() -> None:
    hub = EventHub(PODS, queue_bytes=100)
    sub = hub.subscribe(None)
    assert sub.offer(b"x" * 300 + b"\n", 1)  # an empty queue takes any chunk
    assert not sub.has_room()
    assert not sub.offer(b"y\n", 1)  # lost whole, counted
    assert (sub.events, sub.dropped) == (1, 1)
    assert await sub.next() == b"x" * 300 + b"\n"
    assert sub.offer(b"a\n" * 10, 10) and sub.offer(b"b\n" * 10, 10)  # 40 bytes: both fit
    assert sub.drain() == b"a\n" * 10 + b"b\n" * 10  # one write for everything queued
    sub.close()
    assert await sub.next() is None
    assert not sub.offer(b"z\n", 1) and sub.dropped == 1  # closed: no longer counted
