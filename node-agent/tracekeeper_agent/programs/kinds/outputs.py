"""C statements that produce a probe's output at a hit: shared by all kinds."""

from __future__ import annotations

from tracekeeper_agent.ports import EventField
from tracekeeper_api.probes import OutputSpec


def emit(output: OutputSpec, *, value: str | None = None, captures: str = "") -> str:
    """The statements after TK_ADMIT() (tk_mask: the bindings that keep the hit). `value`
    is the histogram's C expression; `captures` fills the extra struct tk_event members of
    `e`. Events: one record per hit, carrying the mask of the bindings it is for."""
    if output.kind == "count":
        return "    tk_count(tk_mask);\n"
    if output.kind == "histogram":
        if value is None:
            raise ValueError("histogram output without a value expression")
        return f"    tk_observe(tk_mask, {value});\n"
    return (
        "    tk_mask = tk_rate_ok(tk_mask);\n"
        "    if (!tk_mask)\n"
        "        return 0;\n"
        "    struct tk_event *e = tk_events.ringbuf_reserve(sizeof(struct tk_event));\n"
        "    if (!e) {\n"
        "        tk_ring_full(tk_mask);\n"
        "        return 0;\n"
        "    }\n"
        "    TK_EVENT_COMMON(e);\n"
        f"{captures}"
        "    tk_events.ringbuf_submit(e, 0);\n"
    )


def regs_function(fn: str, output: OutputSpec) -> str:
    """A probe function taking pt_regs (kprobes, uprobes): filter, then the output."""
    return f"int {fn}(struct pt_regs *ctx) {{\n    TK_ADMIT();\n{emit(output)}    return 0;\n}}\n"


LATENCY_FIELD = EventField(name="latency_ns", kind="uint", size=8)
