"""TraceProbe: what to trace (one attach point) and what to produce."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import ConfigDict, Field, model_validator

from tracekeeper_api.base import SpecModel
from tracekeeper_api.durations import ProbeDuration
from tracekeeper_api.filters import TraceFilterSpec
from tracekeeper_api.strings import (
    AbsoluteBinaryPath,
    BinaryRef,
    CIdentifier,
    FieldName,
    KernelIdentifier,
    LabelKey,
    LabelValue,
    ObjectName,
    SyscallName,
    TracepointName,
)

# The attach points, by wire name. Exactly one per TraceProbe.
ATTACH_POINTS = (
    "tracepoint", "rawTracepoint", "uprobe", "usdt", "kprobe", "syscall", "program"
)  # fmt: skip

MAX_PROGRAM_SOURCE = 65536
MAX_EVENTS_PER_SECOND = 1_000_000
MAX_SAMPLING = 1_000_000


class UprobeSpec(SpecModel):
    """A user-space function entry (or return) in a binary or library."""

    binary: BinaryRef
    """Absolute path of the binary inside the target container (/usr/sbin/nginx), or a library
    name (c, libssl.so.3) resolved like the dynamic linker does."""
    symbol: KernelIdentifier
    """The function's symbol name, as in the ELF symbol table (e.g. SSL_write)."""
    return_: bool = Field(default=False, alias="return")
    """Attach to the function's return instead of its entry (a uretprobe)."""


class UsdtSpec(SpecModel):
    """A statically defined tracing probe (USDT, SystemTap SDT: DTRACE_PROBE in C) in a
    binary or library of the target containers, as listed by `readelf -n` under
    .note.stapsdt."""

    binary: AbsoluteBinaryPath
    """Absolute path of the executable or library inside the target container
    (/usr/bin/python3)."""
    provider: CIdentifier
    """The probe's provider (python; readelf -n says "Provider")."""
    name: CIdentifier
    """The probe's name (function__entry; readelf -n says "Name"). Events carry its
    arguments as arg0..argN (integers; pointers as numbers)."""


class KprobeSpec(SpecModel):
    """A kernel function entry (or return). Needs a kernel built with kprobes."""

    function: KernelIdentifier
    """Kernel function name, as in /proc/kallsyms (e.g. tcp_v4_connect)."""
    return_: bool = Field(default=False, alias="return")
    """Attach to the function's return instead of its entry (a kretprobe)."""


class SyscallSpec(SpecModel):
    """A system call, traced at entry and exit (sys_enter_NAME / sys_exit_NAME)."""

    name: SyscallName
    """The system call's name without prefix (read, openat, connect)."""
    latency: bool = False
    """Measure the time from entry to exit; with output kind histogram this is the value."""


class ProgramSpec(SpecModel):
    """Raw BCC C source. Privileged: only in the operator's privileged namespaces, and only
    when the operator allows raw programs."""

    source: str = Field(min_length=1, max_length=MAX_PROGRAM_SOURCE)
    """BCC C text. Use TRACEPOINT_PROBE or RAW_TRACEPOINT_PROBE functions; call TK_FILTER()
    first to respect the probe's filter, and TK_COUNT() to count in the probe's output."""


AggregationKey = Literal["pod", "container", "comm", "pid"]
OutputKind = Literal["count", "histogram", "events"]


def _by_pod() -> list[AggregationKey]:
    return ["pod"]


class OutputSpec(SpecModel):
    """What the probe produces."""

    kind: OutputKind = "count"
    """count: a counter per key; histogram: log2 buckets of a value (latency for syscall
    latency probes, otherwise the tracepoint field named in value); events: one record per hit."""
    by: list[AggregationKey] = Field(
        default_factory=_by_pod,
        max_length=4,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    """Aggregation keys for count and histogram: pod, container, comm, pid."""
    fields: list[FieldName] = Field(default_factory=list, max_length=8)
    """For events of tracepoints: the tracepoint fields to capture (e.g. filename)."""
    value: FieldName | None = None
    """For histograms of tracepoints: the numeric tracepoint field whose values are bucketed."""
    rate_limit: int | None = Field(default=None, ge=1, le=MAX_EVENTS_PER_SECOND)
    """For events: at most this many events per second per node, enforced in kernel; the rest
    are counted as dropped."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.rateLimit) || self.kind == 'events'",
                    "message": "rateLimit applies to output kind events only",
                },
                {
                    "rule": "!has(self.fields) || size(self.fields) == 0 || self.kind == 'events'",
                    "message": "fields applies to output kind events only",
                },
                {
                    "rule": "!has(self.value) || self.kind == 'histogram'",
                    "message": "value applies to output kind histogram only",
                },
            ]
        }
    )

    @model_validator(mode="after")
    def _fits_kind(self) -> Self:
        if self.rate_limit is not None and self.kind != "events":
            raise ValueError("rateLimit applies to output kind events only")
        if self.fields and self.kind != "events":
            raise ValueError("fields applies to output kind events only")
        if self.value is not None and self.kind != "histogram":
            raise ValueError("value applies to output kind histogram only")
        if len(set(self.by)) != len(self.by):
            raise ValueError("by keys must not repeat")
        return self


_ONE_ATTACH_RULE = (
    "(has(self.tracepoint) ? 1 : 0) + (has(self.rawTracepoint) ? 1 : 0)"
    " + (has(self.uprobe) ? 1 : 0) + (has(self.usdt) ? 1 : 0) + (has(self.kprobe) ? 1 : 0)"
    " + (has(self.syscall) ? 1 : 0) + (has(self.program) ? 1 : 0) == 1"
)
_ONE_ATTACH_MESSAGE = (
    "set exactly one attach point: tracepoint, rawTracepoint, uprobe, usdt, kprobe, syscall "
    "or program"
)


class TraceProbeSpec(SpecModel):
    """What to trace (exactly one attach point), whom (filterRef or filter) and what to
    produce (output)."""

    tracepoint: TracepointName | None = None
    """A kernel tracepoint, category:name as under /sys/kernel/tracing/events
    (e.g. syscalls:sys_enter_openat, sched:sched_process_exec)."""
    raw_tracepoint: KernelIdentifier | None = None
    """A raw tracepoint by name (e.g. sched_switch); arguments are not decoded."""
    uprobe: UprobeSpec | None = None
    """A user-space function in a binary or library of the target containers."""
    usdt: UsdtSpec | None = None
    """A USDT (SDT) probe in a binary or library of the target containers."""
    kprobe: KprobeSpec | None = None
    """A kernel function. Nodes without kprobes report Unsupported."""
    syscall: SyscallSpec | None = None
    """A system call at entry and exit, optionally measuring its latency."""
    program: ProgramSpec | None = None
    """Privileged: raw BCC C source."""
    filter_ref: ObjectName | None = None
    """Name of a TraceFilter in the same namespace."""
    filter: TraceFilterSpec | None = None
    """An inline filter. Without filterRef and filter: every pod of the namespace."""
    output: OutputSpec = Field(default_factory=OutputSpec)
    """What to produce: counts, a histogram, or events."""
    sampling: int = Field(default=1, ge=1, le=MAX_SAMPLING)
    """Keep 1 in N hits, decided in kernel (1 keeps every hit)."""
    node_selector: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=16)
    """Only nodes with these labels load the probe."""
    suspend: bool = False
    """Unload the probe everywhere while keeping the object."""
    duration: ProbeDuration | None = None
    """A debug session's length (e.g. 10m, 1h30m; 1s to 168h), counted from when the probe
    is first Ready. Then it is unloaded everywhere and Expired (Ready=False, reason
    Expired); the object and its last values stay in status.session. Changing or removing
    duration runs it again. A namespace's budget may cap it (maxDuration), and then gives
    probes without one that maximum."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": _ONE_ATTACH_RULE, "message": _ONE_ATTACH_MESSAGE},
                {
                    "rule": "!(has(self.filterRef) && has(self.filter))",
                    "message": "set filterRef or filter, not both",
                },
                {
                    "rule": "!has(self.output) || !has(self.output.kind)"
                    " || self.output.kind != 'histogram'"
                    " || (has(self.syscall) && has(self.syscall.latency) && self.syscall.latency)"
                    " || has(self.output.value)",
                    "message": "a histogram needs a value: a syscall probe with latency: true, "
                    "or output.value naming a numeric tracepoint field",
                },
                {
                    "rule": "!has(self.output) || !has(self.output.fields)"
                    " || size(self.output.fields) == 0 || has(self.tracepoint)",
                    "message": "output.fields captures tracepoint fields: it needs a tracepoint",
                },
                {
                    "rule": "!has(self.output) || !has(self.output.value) || has(self.tracepoint)",
                    "message": "output.value names a tracepoint field: it needs a tracepoint",
                },
            ]
        }
    )

    @model_validator(mode="after")
    def _one_attach_point(self) -> Self:
        if len(self.attach_points()) != 1:
            found = ", ".join(self.attach_points()) or "none"
            raise ValueError(f"{_ONE_ATTACH_MESSAGE} (found: {found})")
        if self.filter_ref is not None and self.filter is not None:
            raise ValueError("set filterRef or filter, not both")
        out = self.output
        if out.kind == "histogram" and not (
            (self.syscall is not None and self.syscall.latency) or out.value is not None
        ):
            raise ValueError(
                "a histogram needs a value: a syscall probe with latency: true, "
                "or output.value naming a numeric tracepoint field"
            )
        if out.fields and self.tracepoint is None:
            raise ValueError("output.fields captures tracepoint fields: it needs a tracepoint")
        if out.value is not None and self.tracepoint is None:
            raise ValueError("output.value names a tracepoint field: it needs a tracepoint")
        return self

    def attach_points(self) -> list[str]:
        values = {
            "tracepoint": self.tracepoint,
            "rawTracepoint": self.raw_tracepoint,
            "uprobe": self.uprobe,
            "usdt": self.usdt,
            "kprobe": self.kprobe,
            "syscall": self.syscall,
            "program": self.program,
        }
        return [name for name in ATTACH_POINTS if values[name] is not None]

    @property
    def attach_kind(self) -> str:
        return self.attach_points()[0]
