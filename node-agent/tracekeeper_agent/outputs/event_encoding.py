"""A batch of event records -> NDJSON bytes, column by column (numpy), not event by event.

Each line is what events.enrich + events.encode make of one record (same keys, same
order, same values), built in a byte matrix: one row per event, one column block per
part of the line (constant keys, the time, pre-encoded per-cgroup identity, digits of the
integers, string bytes), unused bytes 0. Removing the zeros (JSON text never holds a NUL:
strings end at their first one) leaves the lines. Per batch: the time prefix of each
distinct second is formatted once, each distinct cgroup is identified and encoded once,
and a string that needs escaping (quote, backslash, control or non-ASCII bytes) is
encoded by msgspec, row by row, only where it occurs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from tracekeeper_agent.host.event_records import RecordLayout, Records
from tracekeeper_agent.ports import Attributor, PodIdentity

# Keys every event has (events.BASE_KEYS): a captured field with one of these names is
# written as field_<name>.
BASE_KEYS = frozenset(
    {"time", "probe", "namespace", "pod", "container", "pid", "tid", "comm", "cgroupId"}
)
MAX_CACHED_CGROUPS = 4096

_json = msgspec.json.Encoder().encode
"""For strings: msgspec over orjson, on a measurement (docs/DESIGN.md): orjson's bytes
results are slow to keep in bulk (~3 us each with 100k alive, ~0.2 us dropped at once)."""

U8 = npt.NDArray[np.uint8]

_DIGITS5: U8 = (
    (np.arange(100_000)[:, None] // np.array([10_000, 1_000, 100, 10, 1])) % 10 + 48
).astype(np.uint8)
"""Row i: the five ASCII digits of i, zero-padded."""
_PADDED8 = np.zeros((100_000, 8), dtype=np.uint8)
_PADDED8[:, :5] = _DIGITS5
_PADDED = _PADDED8.view(np.uint64).ravel()
"""i -> its five digits as the first bytes of a u64 (gathering u64s beats gathering rows;
the three 0 bytes after them vanish with the other padding)."""
_BARE8 = _PADDED8.copy()
_LEAD = 5 - np.searchsorted([10, 100, 1_000, 10_000], np.arange(100_000), side="right") - 1
_BARE8[:, :5][np.arange(5) < _LEAD[:, None]] = 0
_BARE = _BARE8.view(np.uint64).ravel()
"""i -> its digits without leading zeros (0 -> "0")."""
_POWERS = np.array([10**k for k in range(1, 20)], dtype=np.uint64)


def digits(values: npt.NDArray[Any], width: int) -> U8:
    """Decimal digits of unsigned values below 10**width, leading zeros blanked (0): per
    group of five digits one u64 of the tables above, so 8 columns per group."""
    v = values.astype(np.uint64)
    groups = (width + 4) // 5
    count = np.searchsorted(_POWERS[: width - 1], v, side="right") + 1
    top = groups - (count + 4) // 5  # the group of the leading digit
    out = np.empty((len(v), groups), dtype=np.uint64)
    for g in range(groups - 1, -1, -1):
        chunk = (v % np.uint64(100_000)).astype(np.intp)
        out[:, g] = np.where(g == top, _BARE[chunk], np.where(g < top, 0, _PADDED[chunk]))
        v = v // np.uint64(100_000)
    return out.view(np.uint8)


def signed_digits(values: npt.NDArray[np.int64], width: int) -> U8:
    """As digits, with a '-' before the first digit of negative values (one more column)."""
    u = values.astype(np.int64).view(np.uint64)
    negative = values < 0
    magnitude = np.where(negative, ~u + np.uint64(1), u)
    d = digits(magnitude, width)
    out = np.zeros((len(values), d.shape[1] + 1), dtype=np.uint8)
    out[:, 1:] = d
    rows = np.flatnonzero(negative)
    if rows.size:
        first = np.argmax(out[rows] != 0, axis=1)
        out[rows, first - 1] = ord("-")
    return out


def string_bytes(raw: U8) -> U8:
    """The JSON string content of NUL-terminated char arrays (without the quotes)."""
    s = raw.copy()
    s[np.logical_or.accumulate(s == 0, axis=1)] = 0
    special = ((s < 0x20) & (s != 0)) | (s == 0x22) | (s == 0x5C) | (s >= 0x80)
    rows = np.flatnonzero(special.any(axis=1))
    if not rows.size:
        return s
    escaped = {
        int(r): _json(bytes(s[r]).split(b"\0", 1)[0].decode(errors="replace"))[1:-1] for r in rows
    }
    width = max(s.shape[1], *(len(e) for e in escaped.values()))
    if width > s.shape[1]:
        s = np.pad(s, ((0, 0), (0, width - s.shape[1])))
    for r, e in escaped.items():
        s[r] = 0
        s[r, : len(e)] = np.frombuffer(e, dtype=np.uint8)
    return s


def _const(text: bytes) -> U8:
    return np.frombuffer(text, dtype=np.uint8)


def _table(rows: Iterable[bytes]) -> U8:
    """Byte strings as rows of a zero-padded matrix."""
    items = list(rows)
    out = np.zeros((len(items), max(len(b) for b in items)), dtype=np.uint8)
    for i, b in enumerate(items):
        out[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    return out


class BatchEncoder:
    """NDJSON of one probe's records. Used by one thread at a time."""

    def __init__(self, probe_id: str, layout: RecordLayout, attributor: Attributor) -> None:
        self.probe_id = probe_id
        self.layout = layout
        self._attributor = attributor
        self._probe_json = _json(probe_id)
        self._keys = [
            _json(f"field_{f.name}" if f.name in BASE_KEYS else f.name) for f in layout.fields
        ]
        self._cgroups: dict[tuple[int, PodIdentity | None], tuple[bytes, bytes]] = {}
        self._shape: tuple[bytes | int, ...] = ()
        self._lines: U8 = np.zeros((0, 0), dtype=np.uint8)

    def _cgroup_parts(self, cgroup_id: int) -> tuple[bytes, bytes]:
        """(from the time's Z to "pid":, from "cgroupId": to its value) for one cgroup,
        encoded once while its identity stays the same."""
        ident = self._attributor.identify(cgroup_id)
        key = (cgroup_id, ident)
        parts = self._cgroups.get(key)
        if parts is None:
            if len(self._cgroups) >= MAX_CACHED_CGROUPS:
                self._cgroups.clear()
            ns, pod, ctr = (ident.namespace, ident.pod, ident.container) if ident else ("", "", "")
            head = b'Z","probe":%s,"namespace":%s,"pod":%s,"container":%s,"pid":' % (
                self._probe_json,
                _json(ns),
                _json(pod),
                _json(ctr),
            )
            parts = self._cgroups[key] = (head, b',"cgroupId":%d' % cgroup_id)
        return parts

    def encode(self, records: Records, wall_offset_ns: int) -> bytes:
        n = len(records)
        if n == 0:
            return b""
        # Each part: constant bytes, or an (n, width) matrix of this batch.
        parts: list[bytes | U8] = []

        # time: one strftime per distinct second of the batch
        wall = records["ts"].astype(np.int64) + np.int64(wall_offset_ns)
        seconds, nanos = np.divmod(wall, np.int64(1_000_000_000))
        base = int(seconds.min())
        span = int(seconds.max()) - base + 1
        if span <= 64:
            second_of, index = np.arange(base, base + span), seconds - base
        else:
            second_of, index = np.unique(seconds, return_inverse=True)
        prefixes = _table(
            time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(int(s))).encode() for s in second_of
        )
        ns = nanos.astype(np.intp)
        nine = np.empty((n, 2), dtype=np.uint64)  # 4 + 5 digits, zero-padded (little-endian)
        nine[:, 0] = _PADDED[ns // 100_000] >> np.uint64(8)
        nine[:, 1] = _PADDED[ns % 100_000]
        # One second or one cgroup in the batch (the usual): a constant part, kept in the
        # reused line matrix while it stays the same.
        second: bytes | U8 = prefixes[index] if span > 1 else prefixes[0].tobytes()
        parts += [b'{"time":"', second, nine.view(np.uint8)]

        # identity: once per distinct cgroup
        cgroups = records["cgroup"]
        if (cgroups == cgroups[0]).all():
            distinct, which = cgroups[:1], np.zeros(n, dtype=np.intp)
        else:
            distinct, which = np.unique(cgroups, return_inverse=True)
        cg = [self._cgroup_parts(int(c)) for c in distinct]
        head: bytes | U8 = cg[0][0]
        tail: bytes | U8 = cg[0][1]
        if len(cg) > 1:
            head, tail = _table(p[0] for p in cg)[which], _table(p[1] for p in cg)[which]
        parts += [head, digits(records["pid"], 10), b',"tid":']
        parts += [digits(records["tid"], 10), b',"comm":"', string_bytes(records["comm"]), b'"']
        parts.append(tail)
        for f, key in zip(self.layout.fields, self._keys, strict=True):
            parts.append(b"," + key + b":")
            column = records[f"f_{f.name}"]
            if f.kind == "str":
                parts += [b'"', string_bytes(column), b'"']
            elif f.kind == "int":
                parts.append(signed_digits(column.astype(np.int64), 19))
            else:
                parts.append(digits(column.astype(np.uint64), 20))
        parts.append(b"}\n")
        lines = self._matrix(parts, n)
        return lines.tobytes().translate(None, b"\0")

    def _matrix(self, parts: list[bytes | U8], n: int) -> U8:
        """The batch's lines with their constant parts written once per shape (they stay
        in the reused matrix; each batch overwrites the variable columns whole)."""
        shape = tuple(p if isinstance(p, bytes) else p.shape[1] for p in parts)
        if self._shape != shape or len(self._lines) < n:
            width = sum(len(p) if isinstance(p, bytes) else p for p in shape)
            self._lines = np.zeros((max(n, len(self._lines)), width), dtype=np.uint8)
            self._shape = shape
            at = 0
            for p in shape:
                if isinstance(p, bytes):
                    self._lines[:, at : at + len(p)] = _const(p)
                at += len(p) if isinstance(p, bytes) else p
        lines = self._lines[:n]
        at = 0
        for p in parts:
            if isinstance(p, bytes):
                at += len(p)
            else:
                lines[:, at : at + p.shape[1]] = p
                at += p.shape[1]
        return lines
