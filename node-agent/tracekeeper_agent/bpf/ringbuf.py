"""A BPF ring buffer consumer over the map's own mmap: batches, no Python call per record.

BCC loads the program and owns the map; this replaces only its consumer (ring_buffer_poll
and a ctypes callback per record). The mapping is libbpf's: the consumer page read-write
at offset 0, the producer page and the data area (mapped twice by the kernel, so no record
wraps) read-only at offset page_size. event_records.walk finds the committed records,
decode copies them, then consumer_pos advances once for the whole batch. epoll on the map
fd sleeps until the kernel signals data (BPF_RB_* wakeup policy, adaptive by default).

Ordering: x86-64 loads are not reordered with other loads, so reading producer_pos, then
headers, then data, in that program order, is the acquire sequence libbpf writes with
smp_load_acquire; the consumer_pos store (ctypes, one aligned 8-byte store) comes after
the copies.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import re
import select
from pathlib import Path

import numpy as np

from tracekeeper_agent.host.event_records import EventBatch, RecordLayout, decode, walk


def map_max_entries(map_fd: int) -> int:
    """The ring's data size, as the kernel has it (/proc/self/fdinfo of the map fd)."""
    text = Path(f"/proc/self/fdinfo/{map_fd}").read_text()
    m = re.search(r"^max_entries:\s*(\d+)", text, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"fd {map_fd} is not a BPF map (no max_entries in its fdinfo)")
    return int(m.group(1))


class RingReader:
    """Batches of records from one BPF_MAP_TYPE_RINGBUF map. One thread at a time."""

    def __init__(self, map_fd: int, layout: RecordLayout) -> None:
        self.layout = layout
        page = mmap.PAGESIZE
        size = map_max_entries(map_fd)
        if size & (size - 1):
            raise RuntimeError(f"ring buffer of {size} bytes: not a power of two")
        self._base = page
        self._mask = size - 1
        self._consumer = mmap.mmap(
            map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
        )
        self._producer = mmap.mmap(
            map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
        )
        self._consumer_pos = ctypes.c_uint64.from_buffer(self._consumer)
        self._words = np.frombuffer(self._producer, dtype=np.uint32)
        self._producer_word = np.frombuffer(self._producer, dtype=np.uint64, count=1)
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)
        self._closed = False

    def _producer_pos(self) -> int:
        return int(self._producer_word[0])  # one 8-byte load: never torn

    def poll(self, timeout_ms: int, max_records: int) -> EventBatch:
        """What is committed now, or what arrives within timeout_ms (empty if nothing)."""
        cons = int(self._consumer_pos.value)
        prod = self._producer_pos()
        if prod == cons and timeout_ms > 0:
            self._epoll.poll(timeout_ms / 1000)
            prod = self._producer_pos()
        w = walk(self._words, self._base, self._mask, cons, prod, max_records)
        records = decode(self._producer, w, self.layout)
        if w.consumer_pos != cons:
            self._consumer_pos.value = w.consumer_pos
        return EventBatch(records, self.layout, discarded=w.discarded)

    def discard(self) -> None:
        """Skip every record committed so far (written for bindings that are gone)."""
        self._consumer_pos.value = self._producer_pos()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._epoll.close()
        # The views export the mappings' buffers: drop them before unmapping. Should one
        # still be referenced somewhere, the mapping goes with the last reference instead.
        del self._consumer_pos, self._words, self._producer_word
        for m in (self._consumer, self._producer):
            with contextlib.suppress(BufferError):
                m.close()
