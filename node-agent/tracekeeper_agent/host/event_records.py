"""Event records in bulk: the struct layout, the BPF ring buffer record walker, and batches.

Pure (numpy, no bcc): the walker runs over any buffer laid out like the kernel's ring
buffer mapping, so it is unit-tested on crafted bytes; `bpf.ringbuf` gives it the mmap.

The kernel's protocol (kernel/bpf/ringbuf.c, libbpf's ringbuf_process_ring): records sit
between consumer_pos and producer_pos, each an 8-byte header (u32 length with
BUSY_BIT = not committed yet and DISCARD_BIT = skip it, u32 page offset) and the sample,
rounded up to 8 bytes. The data area is mapped twice in a row, so a record never wraps in
the mapping. A busy record ends the batch (nothing after it may be read yet); a discarded
one is stepped over. The consumer advances consumer_pos once per batch, after copying.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from tracekeeper_agent.ports import EventField, RawEvent

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_BYTES = 8
TASK_COMM_LEN = 16
"""The kernel's comm length (linux/sched.h): rendered into every program's #defines."""

Records = npt.NDArray[np.void]
"""A structured array: bindings, ts, cgroup, pid, tid, comm (u8[16]), then f_<name> per
field."""

EVENT_HEADER: tuple[tuple[str, str, Any], ...] = (
    ("bindings", "u64 bindings;", "<u8"),
    ("ts", "u64 ts;", "<u8"),
    ("cgroup", "u64 cgroup;", "<u8"),
    ("pid", "u32 pid;", "<u4"),
    ("tid", "u32 tid;", "<u4"),
    ("comm", "char comm[TK_COMM_LEN];", (np.uint8, (TASK_COMM_LEN,))),
)
"""The members every struct tk_event starts with (name, C declaration, numpy format), in
order: the program builder renders the C struct from it, record_layout the dtype. Every
member is naturally aligned at its place. `bindings`: the mask of the probes (bindings of
a shared program) the record is for."""


def roundup(length: int) -> int:
    """Bytes a record of `length` sample bytes takes in the ring (header, 8-byte aligned)."""
    return (length + HEADER_BYTES + 7) & ~7


@dataclass(frozen=True)
class RecordLayout:
    """struct tk_event (programs.builder renders it from EVENT_HEADER) as a numpy dtype, by C
    layout rules: the header members, then the fields (integers 8 bytes, 8-aligned; strings
    char[N]), the size rounded up to 8."""

    fields: tuple[EventField, ...]
    dtype: np.dtype[np.void]

    @property
    def size(self) -> int:
        return int(self.dtype.itemsize)

    def ring_dtype(self) -> np.dtype[np.void]:
        """The same fields at their place in the ring: after the header, one record per
        roundup(size) bytes."""
        fields = self.dtype.fields
        assert fields is not None
        return np.dtype(
            {
                "names": list(fields),
                "formats": [fields[n][0] for n in fields],
                "offsets": [HEADER_BYTES + fields[n][1] for n in fields],
                "itemsize": roundup(self.size),
            }
        )


def record_layout(fields: Sequence[EventField]) -> RecordLayout:
    names: list[str] = []
    formats: list[Any] = []
    offsets: list[int] = []
    at = 0
    for name, _decl, fmt0 in EVENT_HEADER:
        names.append(name)
        formats.append(fmt0)
        offsets.append(at)
        at += np.dtype(fmt0).itemsize
    for f in fields:
        if f.kind == "str":
            fmt: Any = (np.uint8, (f.size,))
        else:
            if f.size not in (1, 2, 4, 8):
                raise ValueError(f"event field {f.name}: integers are 1, 2, 4 or 8 bytes")
            fmt = f"<{'i' if f.kind == 'int' else 'u'}{f.size}"
            at = (at + f.size - 1) // f.size * f.size
        names.append(f"f_{f.name}")
        formats.append(fmt)
        offsets.append(at)
        at += f.size
    size = (at + 7) & ~7
    dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": size})
    return RecordLayout(tuple(fields), dtype)


@dataclass(frozen=True)
class Run:
    """Consecutive committed records of one length: `count` records from byte `offset` of
    the buffer, one every roundup(length) bytes."""

    offset: int
    length: int
    count: int


@dataclass(frozen=True)
class Walk:
    runs: tuple[Run, ...]
    consumer_pos: int
    """Where the consumer may advance to: past every record walked (and discarded)."""
    discarded: int
    busy: bool
    """Stopped at a record not committed yet."""

    @property
    def records(self) -> int:
        return sum(r.count for r in self.runs)


def walk(
    buf: npt.NDArray[np.uint32],
    base: int,
    mask: int,
    consumer_pos: int,
    producer_pos: int,
    max_records: int,
) -> Walk:
    """The records from consumer_pos up to producer_pos (at most max_records committed ones).

    `buf` is the mapping as u32 words; the data area starts at byte `base` and is mapped
    twice (size = mask + 1, a power of two). Headers of a run are checked in one
    vectorized comparison: each record of it has exactly the first one's header (so none
    is busy or discarded), and the run ends at the first that differs."""
    runs: list[Run] = []
    pos, n, discarded, busy = consumer_pos, 0, 0, False
    while pos < producer_pos and n < max_records:
        off = base + (pos & mask)
        header = int(buf[off >> 2])
        if header & BUSY_BIT:
            busy = True
            break
        length = header & ~(BUSY_BIT | DISCARD_BIT)
        stride = roundup(length)
        if header & DISCARD_BIT:
            pos += stride
            discarded += 1
            continue
        room = min((producer_pos - pos) // stride, max_records - n)
        words = stride >> 2
        first = off >> 2
        headers = buf[first : first + room * words : words]
        differ = np.flatnonzero(headers != header)
        count = int(differ[0]) if differ.size else room
        runs.append(Run(off, length, count))
        n += count
        pos += count * stride
    return Walk(tuple(runs), pos, discarded, busy)


def decode(buf: Any, w: Walk, layout: RecordLayout) -> Records:
    """Copy the walk's records out of the ring (before the consumer advances past them)."""
    ring = layout.ring_dtype()
    parts = []
    for run in w.runs:
        if run.length != layout.size:
            raise ValueError(
                f"ring record of {run.length} bytes where struct tk_event has {layout.size}"
            )
        view = np.frombuffer(buf, dtype=ring, count=run.count, offset=run.offset)
        parts.append(view.astype(layout.dtype))  # a packed copy of the fields
        del view
    if not parts:
        return np.zeros(0, dtype=layout.dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass(frozen=True)
class EventBatch:
    """Records read from one program's ring in one go."""

    records: Records
    layout: RecordLayout
    discarded: int = 0

    def __len__(self) -> int:
        return len(self.records)

    def of_binding(self, bit: int) -> Records:
        """The records one binding of the program kept (its bit in the mask)."""
        mine = (self.records["bindings"] >> np.uint64(bit)) & np.uint64(1)
        kept: Records = self.records[mine.astype(bool)]
        return kept

    def to_raw(self) -> list[RawEvent]:
        """Per event, as the per-record path decodes them (for tests and comparisons)."""
        out = []
        for r in self.records:
            fields: dict[str, int | str] = {}
            for f in self.layout.fields:
                value = r[f"f_{f.name}"]
                fields[f.name] = _text(value) if f.kind == "str" else int(value)
            out.append(
                RawEvent(
                    ts_ns=int(r["ts"]),
                    pid=int(r["pid"]),
                    tid=int(r["tid"]),
                    cgroup_id=int(r["cgroup"]),
                    comm=_text(r["comm"]),
                    fields=fields,
                    bindings=int(r["bindings"]),
                )
            )
        return out


def _text(raw: Any) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


def fields_of(events: Sequence[RawEvent]) -> tuple[EventField, ...]:
    """A layout for RawEvents made in user space (fakes): strings of 256 bytes, 8-byte ints."""
    out: dict[str, EventField] = {}
    for ev in events:
        for name, value in ev.fields.items():
            if name not in out:
                if isinstance(value, str):
                    out[name] = EventField(name, "str", 256)
                else:
                    out[name] = EventField(name, "int", 8)
    return tuple(out.values())


def batch_of(events: Sequence[RawEvent], fields: Sequence[EventField] | None = None) -> EventBatch:
    """The records the kernel would have written for these events."""
    layout = record_layout(fields_of(events) if fields is None else fields)
    records = np.zeros(len(events), dtype=layout.dtype)
    for i, ev in enumerate(events):
        r = records[i]
        r["ts"], r["cgroup"], r["pid"], r["tid"] = ev.ts_ns, ev.cgroup_id, ev.pid, ev.tid
        r["bindings"] = ev.bindings
        r["comm"] = _padded(ev.comm, TASK_COMM_LEN)
        for f in layout.fields:
            value = ev.fields.get(f.name, "" if f.kind == "str" else 0)
            r[f"f_{f.name}"] = _padded(str(value), f.size) if f.kind == "str" else value
    return EventBatch(records, layout)


def _padded(text: str, size: int) -> npt.NDArray[np.uint8]:
    raw = text.encode()[: size - 1]
    out = np.zeros(size, dtype=np.uint8)
    out[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return out


def ring_bytes(records: Sequence[tuple[int, bytes]], size: int, *, start: int = 0) -> bytes:
    """A ring's data area (for tests): records as (header flags, sample) from position
    `start` (wrapping at `size`)."""
    data = bytearray(size)
    pos = start
    for flags, sample in records:
        stride = roundup(len(sample))
        rec = struct.pack("<II", len(sample) | flags, 0) + sample
        rec += bytes(stride - len(rec))
        for i, b in enumerate(rec):
            data[(pos + i) % size] = b
        pos += stride
    return bytes(data)
