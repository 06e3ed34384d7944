"""tracepoint: any category:name under tracefs; captured fields checked against its format."""

from __future__ import annotations

from tracekeeper_agent.host.tracefs import (
    FieldKind,
    TracefsError,
    TracepointField,
    TracepointFormat,
    read_format,
    tenant_field_refusal,
)
from tracekeeper_agent.ports import Attachment, EventField, LoadFailure
from tracekeeper_agent.programs.kinds.context import BuildContext, KindRender
from tracekeeper_agent.programs.kinds.outputs import emit
from tracekeeper_api.probes import TraceProbeSpec

STRING_BYTES = 256
_SIGNED_NARROW = frozenset({"int", "pid_t", "short", "long", "s32", "s16", "int32_t", "key_t"})


def load_format(tracepoint: str, ctx: BuildContext) -> TracepointFormat:
    try:
        return read_format(tracepoint, tracefs=ctx.tracefs)
    except TracefsError as exc:
        raise LoadFailure(
            "Failed",
            "AttachFailed",
            f"tracepoint {tracepoint} does not exist on this node's kernel "
            f"({ctx.kernel.release}): {exc}",
        ) from exc


def _field(fmt: TracepointFormat, name: str) -> TracepointField:
    found = fmt.field(name)
    if found is None or found.is_common:
        names = ", ".join(f.name for f in fmt.payload_fields)
        raise LoadFailure(
            "Failed",
            "InvalidSpec",
            f"tracepoint {fmt.tracepoint} has no field {name!r}; its fields are: {names}",
        )
    return found


def capture(fmt: TracepointFormat, f: TracepointField) -> tuple[EventField, str, str]:
    """(event field, struct member declaration, C statement copying it from args)."""
    member = f"f_{f.name}"
    if f.kind is FieldKind.INTEGER:
        # Syscall records store every argument as 8 unsigned bytes, even an `int dfd`:
        # narrow through the declared type so that AT_FDCWD reads -100, not 4294967196.
        narrow = fmt.user_pointers and f.c_type in _SIGNED_NARROW
        signed = f.signed or narrow
        value = f"(s64)({f.c_type})args->{f.name}" if narrow else f"args->{f.name}"
        ef = EventField(f.name, "int" if signed else "uint", 8)
        return ef, f"{'s64' if signed else 'u64'} {member};", f"e->{member} = {value};"
    if f.kind is FieldKind.POINTER:
        return (
            EventField(f.name, "uint", 8),
            f"u64 {member};",
            f"e->{member} = (u64)args->{f.name};",
        )
    if f.kind is FieldKind.STRING_POINTER:
        reader = "bpf_probe_read_user_str" if fmt.user_pointers else "bpf_probe_read_kernel_str"
        stmt = f"{reader}(e->{member}, sizeof(e->{member}), (void *)args->{f.name});"
        return EventField(f.name, "str", STRING_BYTES), f"char {member}[{STRING_BYTES}];", stmt
    if f.kind is FieldKind.CHAR_ARRAY:
        size = f.array_len or f.size
        stmt = f"bpf_probe_read_kernel_str(e->{member}, sizeof(e->{member}), args->{f.name});"
        return EventField(f.name, "str", size), f"char {member}[{size}];", stmt
    if f.kind is FieldKind.DATA_LOC_STRING:
        stmt = f"TP_DATA_LOC_READ_STR(e->{member}, {f.name}, sizeof(e->{member}));"
        return EventField(f.name, "str", STRING_BYTES), f"char {member}[{STRING_BYTES}];", stmt
    raise LoadFailure(
        "Failed",
        "InvalidSpec",
        f"field {f.name!r} of {fmt.tracepoint} is a {f.c_type} ({f.kind}): "
        "only integers, pointers and strings can be captured",
    )


def render(spec: TraceProbeSpec, ctx: BuildContext) -> KindRender:
    assert spec.tracepoint is not None
    fmt = load_format(spec.tracepoint, ctx)
    out = spec.output
    value = None
    if out.value is not None:
        vf = _field(fmt, out.value)
        if vf.kind is not FieldKind.INTEGER:
            raise LoadFailure(
                "Failed",
                "InvalidSpec",
                f"output.value {out.value!r} of {fmt.tracepoint} is a {vf.c_type}: "
                "a histogram needs a numeric field",
            )
        value = f"(u64)args->{vf.name}"
    fields, decls, stmts = [], [], []
    for name in out.fields:
        f = _field(fmt, name)
        if not ctx.privileged and (why := tenant_field_refusal(fmt, f)):
            raise LoadFailure(
                "Failed",
                "NotPermitted",
                f"{why}; only probes of the privileged namespaces may capture it",
            )
        ef, decl, stmt = capture(fmt, f)
        fields.append(ef)
        decls.append(decl)
        stmts.append(f"    {stmt}\n")
    body = (
        f"TRACEPOINT_PROBE({fmt.category}, {fmt.name}) {{\n"
        "    TK_ADMIT();\n"
        f"{emit(out, value=value, captures=''.join(stmts))}"
        "    return 0;\n"
        "}\n"
    )
    fn = f"tracepoint__{fmt.category}__{fmt.name}"
    return KindRender(
        body=body,
        attachments=(Attachment("auto", fn, spec.tracepoint),),
        event_fields=tuple(fields),
        event_decls=tuple(decls),
    )
