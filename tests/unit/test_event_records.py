"""The ring buffer record walker on crafted ring bytes, and the batch NDJSON encoder against
the per-event path (events.enrich + events.encode)."""

from __future__ import annotations

import json
import random

import numpy as np
import numpy.typing as npt

from tests.unit.output_fakes import FakeAttributor
from tracekeeper_agent.host.event_records import (
    BUSY_BIT,
    DISCARD_BIT,
    EventBatch,
    Walk,
    batch_of,
    decode,
    record_layout,
    ring_bytes,
    roundup,
    walk,
)
from tracekeeper_agent.outputs.event_encoding import BatchEncoder
from tracekeeper_agent.outputs.events import encode, enrich
from tracekeeper_agent.ports import EventField, PodIdentity, RawEvent

SIZE = 4096  # data area of the crafted rings
BASE = 64  # where the data area starts in the mapping (the producer page, shortened)
FIELDS = (
    EventField("filename", "str", 256),
    EventField("dfd", "int", 8),
    EventField("flags", "uint", 8),
)
LAYOUT = record_layout(FIELDS)


def sample(n: int) -> bytes:
    return batch_of([event(n)], FIELDS).records.tobytes()


def event(n: int) -> RawEvent:
    return RawEvent(
        ts_ns=1_000 + n,
        pid=100 + n,
        tid=200 + n,
        cgroup_id=1001,
        comm=f"c{n}",
        fields={"filename": f"/f/{n}", "dfd": -100 + n, "flags": n},
    )


def mapping(data: bytes) -> npt.NDArray[np.uint32]:
    """The producer mapping: a header area, then the data area twice (as the kernel maps it)."""
    return np.frombuffer(bytes(BASE) + data + data, dtype=np.uint32)


def read(
    records: list[tuple[int, bytes]], *, start: int = 0, most: int = 1000
) -> tuple[Walk, EventBatch]:
    data = ring_bytes(records, SIZE, start=start)
    buf = mapping(data)
    prod = start + sum(roundup(len(s)) for _, s in records)
    w = walk(buf, BASE, SIZE - 1, start, prod, most)
    return w, EventBatch(decode(buf.tobytes(), w, LAYOUT), LAYOUT)


def test_layout_follows_c_struct_rules() -> None:
    # bindings, ts, cgroup, pid, tid, then char comm[16] ends at 48; a char[3] then a u64:
    # padded to 8-byte alignment.
    layout = record_layout((EventField("s", "str", 3), EventField("n", "uint", 8)))
    fields = layout.dtype.fields
    assert fields is not None
    assert (fields["f_s"][1], fields["f_n"][1], layout.size) == (48, 56, 64)
    assert record_layout(()).size == 48


def test_walk_decodes_a_run_and_advances_past_it() -> None:
    w, batch = read([(0, sample(n)) for n in range(5)])
    assert (w.records, len(w.runs), w.discarded, w.busy) == (5, 1, 0, False)
    assert w.consumer_pos == 5 * roundup(LAYOUT.size)
    assert batch.to_raw() == [event(n) for n in range(5)]


def test_walk_wraps_around_the_end_of_the_data_area() -> None:
    stride = roundup(LAYOUT.size)
    start = (SIZE // stride) * stride - stride  # the second record crosses the end
    start += 1 << 20  # positions grow without bound; the offset is position & mask
    data = ring_bytes([(0, sample(n)) for n in range(3)], SIZE, start=start)
    buf = mapping(data)
    w = walk(buf, BASE, SIZE - 1, start, start + 3 * stride, 100)
    assert w.records == 3 and w.consumer_pos == start + 3 * stride
    records = decode(buf.tobytes(), w, LAYOUT)
    assert [e.pid for e in EventBatch(records, LAYOUT).to_raw()] == [
        100,
        101,
        102,
    ]


def test_discarded_records_are_skipped_and_split_runs() -> None:
    w, batch = read([(0, sample(0)), (DISCARD_BIT, sample(1)), (0, sample(2)), (0, sample(3))])
    assert (w.records, len(w.runs), w.discarded, w.busy) == (3, 2, 1, False)
    assert w.consumer_pos == 4 * roundup(LAYOUT.size)
    assert [e.pid for e in batch.to_raw()] == [100, 102, 103]


def test_a_busy_record_ends_the_batch_before_it() -> None:
    stride = roundup(LAYOUT.size)
    w, batch = read([(0, sample(0)), (BUSY_BIT, sample(1)), (0, sample(2))])
    assert (w.records, w.busy, w.consumer_pos) == (1, True, stride)
    assert [e.pid for e in batch.to_raw()] == [100]
    # Busy and discarded (a reservation being discarded): still busy, still the end.
    w, _ = read([(BUSY_BIT | DISCARD_BIT, sample(0)), (0, sample(1))])
    assert (w.records, w.busy, w.consumer_pos) == (0, True, 0)


def test_partial_batches_stop_at_max_records_and_resume() -> None:
    stride = roundup(LAYOUT.size)
    records = [(0, sample(n)) for n in range(7)]
    data = ring_bytes(records, SIZE)
    buf = mapping(data)
    prod = 7 * stride
    first = walk(buf, BASE, SIZE - 1, 0, prod, 3)
    assert (first.records, first.consumer_pos) == (3, 3 * stride)
    second = walk(buf, BASE, SIZE - 1, first.consumer_pos, prod, 3)
    third = walk(buf, BASE, SIZE - 1, second.consumer_pos, prod, 3)
    assert (second.records, third.records, third.consumer_pos) == (3, 1, prod)
    # Only what the producer published is read, even if more bytes look like records.
    short = walk(buf, BASE, SIZE - 1, 0, 2 * stride, 100)
    assert short.records == 2


def test_records_of_another_length_make_their_own_run() -> None:
    other = bytes(range(24))
    buf = mapping(ring_bytes([(0, sample(0)), (0, other), (0, sample(1))], SIZE))
    w = walk(buf, BASE, SIZE - 1, 0, 2 * roundup(LAYOUT.size) + roundup(24), 100)
    assert [(r.length, r.count) for r in w.runs] == [(LAYOUT.size, 1), (24, 1), (LAYOUT.size, 1)]


PODS = FakeAttributor(
    {1001: PodIdentity("team-a", "web-0", "app"), 7: PodIdentity('we"ird', "p\\od", "")}
)


def test_batch_encoder_writes_the_same_lines_as_the_per_event_path() -> None:
    rng = random.Random(14)
    fields = (*FIELDS, EventField("pid", "uint", 8))  # a field named like a base key
    strings = ["", "nginx", 'a"b', "tab\there", "héllo", "x" * 15, "\\", "\x01", "ü" * 100]
    events = [
        RawEvent(
            ts_ns=rng.randrange(0, 2**40),
            pid=rng.choice([0, 9, 10, 99_999, 100_000, 2**32 - 1]),
            tid=rng.randrange(0, 2**32),
            cgroup_id=rng.choice([1001, 7, 5, 2**64 - 1]),
            comm=rng.choice(strings)[:15],
            fields={
                "filename": rng.choice(strings),
                "dfd": rng.choice([-100, 0, -(2**63), 2**63 - 1, 5, -1]),
                "flags": rng.choice([0, 2**64 - 1, 524_288]),
                "pid": 3,
            },
        )
        for _ in range(3000)
    ]
    batch = batch_of(events, fields)
    offset = 1_700_000_000_000_000_000
    encoder = BatchEncoder("team-a/opens", batch.layout, PODS)
    for _ in range(2):  # the second batch reuses the cached parts and the line matrix
        lines = encoder.encode(batch.records, offset).decode().splitlines(keepends=True)
        expected = [encode(enrich("team-a/opens", e, PODS, offset)) for e in batch.to_raw()]
        assert lines == expected
    assert json.loads(lines[0])["probe"] == "team-a/opens"
    # The usual batch: one cgroup, one second (both written as constant parts).
    same = [RawEvent(5_000 + i, e.pid, e.tid, 1001, e.comm, e.fields) for i, e in enumerate(events)]
    one = batch_of(same, fields)
    for records in (one.records, one.records[:7], one.records):  # shapes change and return
        got = encoder.encode(records, offset).decode().splitlines(keepends=True)
        raw = EventBatch(records, one.layout).to_raw()
        assert got == [encode(enrich("team-a/opens", e, PODS, offset)) for e in raw]


def test_batch_encoder_follows_identity_changes_of_a_cgroup() -> None:
    pods = FakeAttributor({})
    batch = batch_of([event(1)], FIELDS)
    encoder = BatchEncoder("team-a/opens", batch.layout, pods)
    assert json.loads(encoder.encode(batch.records, 0))["pod"] == ""
    pods.pods[1001] = PodIdentity("team-a", "web-0", "app")  # the pod table caught up
    assert json.loads(encoder.encode(batch.records, 0))["pod"] == "web-0"
