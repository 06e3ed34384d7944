"""Program shapes: what changes a probe's C text. Probes of one shape share one BPF program
on a node (the agent binds each to a bit of the program's mask, up to BINDINGS_PER_PROGRAM);
the operator counts programs per attach point by shape. Who is traced, sampling and the
rate limit are not in a shape: they are the binding's map contents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.protocol import ProbeAssignment

BINDINGS_PER_PROGRAM = 64
"""Probes one program serves: the bits of a u64 mask."""


@dataclass(frozen=True)
class Shape:
    """What a program's C text is made from (hashable: the key probes are grouped by)."""

    attach: str
    """The attach kind and its spec, as canonical JSON."""
    output: str
    by: tuple[str, ...]
    fields: tuple[str, ...]
    value: str | None
    label: str
    """Said in GET /v1/state: `syscall openat (latency) histogram by pod`."""
    owner: str = ""
    """Raw programs only: the probe id (a raw program is never shared)."""


def shape_of(assignment: ProbeAssignment) -> Shape:
    """The attach point (kind and its spec: a syscall's enter/exit pair is in it), output
    kind, `by` keys, captured fields and histogram value. Raw `program` probes carry their
    probe id: never shared."""
    spec = assignment.spec
    kind = spec.attach_kind
    attach_spec = getattr(spec, _ATTACH_FIELDS[kind])
    dumped = (
        attach_spec.model_dump(mode="json", by_alias=True)
        if hasattr(attach_spec, "model_dump")
        else attach_spec
    )
    out = spec.output
    by = tuple(out.by) if out.kind != "events" else ()
    fields = tuple(out.fields) if out.kind == "events" else ()
    return Shape(
        attach=f"{kind}:{json.dumps(dumped, sort_keys=True)}",
        output=out.kind,
        by=by,
        fields=fields,
        value=out.value,
        label=f"program of {assignment.id}" if kind == "program" else _label(spec, by, fields),
        owner=assignment.id if kind == "program" else "",
    )


_ATTACH_FIELDS = {
    "tracepoint": "tracepoint",
    "rawTracepoint": "raw_tracepoint",
    "syscall": "syscall",
    "uprobe": "uprobe",
    "usdt": "usdt",
    "kprobe": "kprobe",
    "program": "program",
}


def _label(spec: TraceProbeSpec, by: tuple[str, ...], fields: tuple[str, ...]) -> str:
    kind = spec.attach_kind
    if spec.tracepoint is not None:
        where = spec.tracepoint
    elif spec.raw_tracepoint is not None:
        where = spec.raw_tracepoint
    elif spec.syscall is not None:
        where = spec.syscall.name + (" (latency)" if spec.syscall.latency else "")
    elif spec.uprobe is not None:
        ret = "ret" if spec.uprobe.return_ else ""
        where = f"{spec.uprobe.binary}:{spec.uprobe.symbol}{' ' + ret if ret else ''}"
    elif spec.usdt is not None:
        where = f"{spec.usdt.binary}:{spec.usdt.provider}:{spec.usdt.name}"
    else:
        assert spec.kprobe is not None
        where = spec.kprobe.function + (" ret" if spec.kprobe.return_ else "")
    text = f"{kind} {where} {spec.output.kind}"
    if by:
        text += f" by {','.join(by)}"
    if fields:
        text += f" fields {','.join(fields)}"
    if spec.output.value:
        text += f" value {spec.output.value}"
    return text
