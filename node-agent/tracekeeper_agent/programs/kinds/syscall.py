"""syscall: sys_enter_NAME (and sys_exit_NAME for latency) as one probe."""

from __future__ import annotations

from tracekeeper_agent.host.tracefs import tracepoint_exists
from tracekeeper_agent.ports import Attachment, LoadFailure
from tracekeeper_agent.programs.kinds.context import BuildContext, KindRender
from tracekeeper_agent.programs.kinds.outputs import LATENCY_FIELD, emit
from tracekeeper_api.probes import TraceProbeSpec

# Entry timestamps by thread; LRU so that threads killed inside a syscall cannot leak entries.
# The mask of the bindings that admitted the entry rides with its timestamp to the exit.
_LATENCY_MAP = (
    "struct tk_start_t {\n    u64 ts;\n    u64 mask;\n};\n"
    'BPF_TABLE("lru_hash", u64, struct tk_start_t, tk_start, 65536);\n'
)
_CAPTURE_LATENCY = "    e->f_latency_ns = delta;\n"


def render(spec: TraceProbeSpec, ctx: BuildContext) -> KindRender:
    sc = spec.syscall
    assert sc is not None
    enter, exit_ = f"sys_enter_{sc.name}", f"sys_exit_{sc.name}"
    for tp in (enter, exit_) if sc.latency else (enter,):
        if not tracepoint_exists(f"syscalls:{tp}", tracefs=ctx.tracefs):
            raise LoadFailure(
                "Failed",
                "AttachFailed",
                f"syscall {sc.name!r} has no tracepoint syscalls:{tp} on this node's kernel "
                f"({ctx.kernel.release}): check the name (e.g. openat, read, connect)",
            )
    out = spec.output
    if not sc.latency:
        body = (
            f"TRACEPOINT_PROBE(syscalls, {enter}) {{\n"
            "    TK_ADMIT();\n"
            f"{emit(out)}"
            "    return 0;\n"
            "}\n"
        )
        return KindRender(
            body=body,
            attachments=(
                Attachment("auto", f"tracepoint__syscalls__{enter}", f"syscalls:{enter}"),
            ),
        )
    # Filter and sample at entry; only admitted calls leave a timestamp for the exit.
    body = (
        _LATENCY_MAP + f"TRACEPOINT_PROBE(syscalls, {enter}) {{\n"
        "    TK_ADMIT();\n"
        "    u64 id = bpf_get_current_pid_tgid();\n"
        "    struct tk_start_t st = {};\n"
        "    st.ts = bpf_ktime_get_ns();\n"
        "    st.mask = tk_mask;\n"
        "    tk_start.update(&id, &st);\n"
        "    return 0;\n"
        "}\n\n"
        f"TRACEPOINT_PROBE(syscalls, {exit_}) {{\n"
        "    u64 id = bpf_get_current_pid_tgid();\n"
        "    struct tk_start_t *start = tk_start.lookup(&id);\n"
        "    if (!start)\n"
        "        return 0;\n"
        "    u64 delta = bpf_ktime_get_ns() - start->ts;\n"
        "    u64 tk_mask = start->mask;\n"
        "    tk_start.delete(&id);\n"
        + emit(out, value="delta", captures=_CAPTURE_LATENCY)
        + "    return 0;\n"
        "}\n"
    )
    events = out.kind == "events"
    return KindRender(
        body=body,
        attachments=(
            Attachment("auto", f"tracepoint__syscalls__{enter}", f"syscalls:{enter}"),
            Attachment("auto", f"tracepoint__syscalls__{exit_}", f"syscalls:{exit_}"),
        ),
        event_fields=(LATENCY_FIELD,) if events else (),
        event_decls=("u64 f_latency_ns;",) if events else (),
    )
