"""The real ProgramLoader: BCC compiles the plan's C text, attaches it, and the
LoadedProgram reads and writes its maps."""

from __future__ import annotations

import atexit
import ctypes
import logging
import re
from collections import defaultdict
from typing import Any

import numpy as np
from bcc import BPF  # the only place bcc is imported (see the import-linter contract)

from tracekeeper_agent.bpf.maps import KERNEL_OWNED, bump_generation, sync_table
from tracekeeper_agent.bpf.ringbuf import RingReader
from tracekeeper_agent.bpf.stderr_capture import capture_fd2
from tracekeeper_agent.host.bpf_ids import prog_id
from tracekeeper_agent.host.event_records import EventBatch, record_layout
from tracekeeper_agent.ports import (
    CountSample,
    FilterEntries,
    HistogramSample,
    KernelCounters,
    LoadFailure,
    ProgramPlan,
    RawEvent,
    SampleKey,
)
from tracekeeper_api.protocol import ProbeState
from tracekeeper_api.reasons import OutcomeReason
from tracekeeper_api.text import truncate_message

log = logging.getLogger(__name__)

_TASK_COMM_LEN = 16
_CFLAGS = ["-Wno-macro-redefined", "-Wno-unused-function"]


def _failure_reason(text: str) -> OutcomeReason:
    if re.search(r"Unable to find kernel headers|linux/kconfig.h.*not found", text):
        return "KernelHeadersMissing"
    if re.search(r"error:|Failed to compile", text):
        return "CompileFailed"
    return "AttachFailed"


class BccProgram:
    """A loaded program (implements kernel.LoadedProgram)."""

    def __init__(self, bpf: Any, plan: ProgramPlan) -> None:
        self._bpf = bpf
        self.plan = plan
        self._ring_open = False
        self._pending: list[RawEvent] = []
        self._reader: RingReader | None = None
        self._program_ids = tuple(sorted(prog_id(f.fd) for f in bpf.funcs.values()))

    @property
    def program_ids(self) -> tuple[int, ...]:
        return self._program_ids

    def update_filter(self, entries: FilterEntries) -> None:
        kinds = self.plan.filter_kinds
        if "cgroup" in kinds:
            sync_table(self._bpf[b"tk_cgroups"], entries.cgroups, key_of=ctypes.c_ulonglong)
            bump_generation(self._bpf[b"tk_gen"])
        if "pid" in kinds:
            sync_table(
                self._bpf[b"tk_pids"],
                dict.fromkeys(entries.pids, 1),
                key_of=ctypes.c_uint,
                keep=lambda v: bool(v & KERNEL_OWNED),
            )
        if "comm" in kinds:
            comms = self._bpf[b"tk_comms"]
            sync_table(
                comms,
                dict.fromkeys(entries.comms, 1),
                key_of=lambda name: comms.Key(name.encode()[: _TASK_COMM_LEN - 1]),
            )

    def _key(self, k: Any) -> SampleKey:
        by = self.plan.by
        return SampleKey(
            cgroup_id=int(k.cgroup) if {"pod", "container"} & set(by) else None,
            pid=int(k.pid) if "pid" in by else None,
            comm=bytes(k.comm).split(b"\0", 1)[0].decode(errors="replace")
            if "comm" in by
            else None,
        )

    def _values(self) -> list[tuple[Any, int]]:
        if self.plan.output_kind not in ("count", "histogram") and not self._has(b"tk_values"):
            return []
        table = self._bpf[b"tk_values"]
        return [(k, sum(int(x) for x in v)) for k, v in table.items()]

    def _has(self, name: bytes) -> bool:
        try:
            self._bpf[name]
        except KeyError:
            return False
        return True

    def read_counts(self) -> list[CountSample]:
        if self.plan.output_kind == "histogram":
            return []
        totals: dict[SampleKey, int] = defaultdict(int)
        for k, total in self._values():
            totals[self._key(k)] += total
        return [CountSample(key, value) for key, value in totals.items()]

    def read_histograms(self) -> list[HistogramSample]:
        if self.plan.output_kind != "histogram":
            return []
        buckets: dict[SampleKey, dict[int, int]] = defaultdict(dict)
        for k, total in self._values():
            slots = buckets[self._key(k)]
            slots[int(k.slot)] = slots.get(int(k.slot), 0) + total
        return [HistogramSample(key, slots) for key, slots in buckets.items()]

    def read_counters(self) -> KernelCounters:
        per_cpu = self._bpf[b"tk_counters"]
        sums = [sum(int(x) for x in per_cpu[ctypes.c_int(i)]) for i in range(5)]
        return KernelCounters(
            matched=sums[0],
            sampled_out=sums[1],
            rate_limited=sums[2],
            ring_full=sums[3],
            lru_new_keys=sums[4],
        )

    def live_keys(self) -> int:
        if not self._has(b"tk_values"):
            return 0
        return len(self._bpf[b"tk_values"])

    def _on_event(self, _ctx: Any, data: Any, _size: int) -> int:
        e = self._bpf[b"tk_events"].event(data)
        fields: dict[str, int | str] = {}
        for f in self.plan.event_fields:
            raw = getattr(e, f"f_{f.name}")
            fields[f.name] = raw.decode(errors="replace") if f.kind == "str" else int(raw)
        self._pending.append(
            RawEvent(
                ts_ns=int(e.ts),
                pid=int(e.pid),
                tid=int(e.tid),
                cgroup_id=int(e.cgroup),
                comm=e.comm.decode(errors="replace"),
                fields=fields,
            )
        )
        return 0

    def poll_events(self, timeout_ms: int) -> list[RawEvent]:
        if self.plan.output_kind != "events":
            return []
        if self._reader is not None:
            raise RuntimeError("the ring is read in batches (poll_batch) already")
        if not self._ring_open:
            self._bpf[b"tk_events"].open_ring_buffer(self._on_event)
            self._ring_open = True
        self._bpf.ring_buffer_poll(timeout_ms)
        batch, self._pending = self._pending, []
        return batch

    def poll_batch(self, timeout_ms: int, max_records: int) -> EventBatch:
        if self.plan.output_kind != "events":
            return EventBatch(np.zeros(0, record_layout(()).dtype), record_layout(()))
        if self._reader is None:
            if self._ring_open:
                raise RuntimeError("the ring is read per record (poll_events) already")
            table = self._bpf[b"tk_events"]
            layout = record_layout(self.plan.event_fields)
            # BCC's view of struct tk_event (from the compiled source) must be ours.
            bcc_size = ctypes.sizeof(_event_class(table))
            if bcc_size != layout.size:
                raise RuntimeError(
                    f"struct tk_event is {bcc_size} bytes, the record layout {layout.size}"
                )
            self._reader = RingReader(table.map_fd, layout)
        return self._reader.poll(timeout_ms, max_records)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        discard(self._bpf)


class BccLoader:
    """Compiles and attaches plans (implements kernel.ProgramLoader). The reconciler
    serializes calls, which the fd-2 capture relies on.

    Nothing a load creates outlives a failed load: BCC registers every BPF object with
    atexit (so a half-built one stays alive, attached, until the process exits), and the
    constructor can fail after loading and attaching some functions (TRACEPOINT_PROBE
    auto-attach). The object is created before __init__ runs, so that it can be cleaned
    up whatever step fails."""

    def load(self, plan: ProgramPlan) -> BccProgram:
        try:
            return self._load(plan)
        finally:
            plan.held.release()  # the kernel holds what was attached; our fds can go

    def _load(self, plan: ProgramPlan) -> BccProgram:
        bpf = BPF.__new__(BPF)
        with capture_fd2() as out:
            try:
                bpf.__init__(text=plan.source.encode(), cflags=_CFLAGS)
            except Exception as exc:
                error: Exception | None = exc
            else:
                error = None
        if error is not None:
            discard(bpf)
            text = scrub(f"{out.text}\n{error}".strip(), plan)
            reason = _failure_reason(text)
            state: ProbeState = (
                "KernelHeadersMissing" if reason == "KernelHeadersMissing" else "Failed"
            )
            raise LoadFailure(state, reason, truncate_message(explain(_clean(text))))
        try:
            with capture_fd2() as out:
                self._attach(bpf, plan)
            return BccProgram(bpf, plan)
        except BaseException as exc:  # also a cancellation or an id read that failed
            discard(bpf)
            if not isinstance(exc, Exception):
                raise
            text = scrub(_clean(f"{out.text}\n{exc}".strip()), plan)
            raise LoadFailure("Failed", "AttachFailed", truncate_message(explain(text))) from exc

    @staticmethod
    def _attach(bpf: Any, plan: ProgramPlan) -> None:
        for a in plan.attachments:
            if a.kind == "uprobe":
                bpf.attach_uprobe(
                    name=a.binary.encode(), sym=a.target.encode(), fn_name=a.fn_name.encode()
                )
            elif a.kind == "uretprobe":
                bpf.attach_uretprobe(
                    name=a.binary.encode(), sym=a.target.encode(), fn_name=a.fn_name.encode()
                )
            elif a.kind == "kprobe":
                bpf.attach_kprobe(event=a.target.encode(), fn_name=a.fn_name.encode())
            elif a.kind == "kretprobe":
                bpf.attach_kretprobe(event=a.target.encode(), fn_name=a.fn_name.encode())
            # "auto": BCC attached TRACEPOINT_PROBE / RAW_TRACEPOINT_PROBE on construction


def _event_class(table: Any) -> Any:
    from bcc.table import _get_event_class  # BCC's parser of the event struct

    return _get_event_class(table)


def discard(bpf: Any) -> None:
    """Detach and free a BPF object, complete or not, and drop BCC's atexit reference to
    it (which would otherwise keep every closed program's object until exit)."""
    try:
        if hasattr(bpf, "module"):  # __init__ got as far as compiling
            bpf.cleanup()
    finally:
        atexit.unregister(bpf.cleanup)


_FD_PATH = re.compile(r"/proc/self/fd/\d+")


def scrub(text: str, plan: ProgramPlan) -> str:
    """BCC names the file it was given: the agent's /proc/self/fd path. Say the binary as
    the probe names it instead (messages never carry paths the tenant did not write)."""
    names = {a.binary: a.display for a in plan.attachments if a.display}
    for path, display in names.items():
        text = text.replace(path, display)
    return _FD_PATH.sub("the binary", text)


def _clean(text: str) -> str:
    """Drop the echo of our own source that BCC prints around clang errors."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("In file included")]
    return "\n".join(lines)


# The kernel's errors for limits users can hit, said in their terms (appended: messages
# are truncated from the front, so the explanation survives).
_EXPLANATIONS = (
    (
        re.compile(r"PERF_EVENT_IOC_SET_BPF\): Argument list too long"),
        "the kernel allows at most 64 BPF programs on one tracepoint, and other probes "
        "or tools on this node use them all (BPF_TRACE_MAX_PROGS)",
    ),
)


def explain(text: str) -> str:
    for pattern, why in _EXPLANATIONS:
        if pattern.search(text):
            return f"{text}\n{why}"
    return text
