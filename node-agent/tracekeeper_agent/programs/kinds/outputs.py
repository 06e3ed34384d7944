"""C statements that produce a probe's output at a hit: shared by all kinds."""

from __future__ import annotations

from tracekeeper_agent.ports import EventField
from tracekeeper_api.probes import OutputSpec


def emit(output: OutputSpec, *, value: str | None = None, captures: str = "") -> str:
    """The statements after tk_admit() succeeded. `value` is the histogram's C expression;
    `captures` fills the extra struct tk_event members of `e`."""
    if output.kind == "count":
        return "    TK_COUNT();\n"
    if output.kind == "histogram":
        if value is None:
            raise ValueError("histogram output without a value expression")
        return f"    tk_observe({value});\n"
    return (
        "    if (!tk_rate_ok())\n"
        "        return 0;\n"
        "    struct tk_event *e = tk_events.ringbuf_reserve(sizeof(struct tk_event));\n"
        "    if (!e) {\n"
        "        tk_inc(TK_RING_FULL);\n"
        "        return 0;\n"
        "    }\n"
        "    TK_EVENT_COMMON(e);\n"
        f"{captures}"
        "    tk_events.ringbuf_submit(e, 0);\n"
    )


def regs_function(fn: str, output: OutputSpec) -> str:
    """A probe function taking pt_regs (kprobes, uprobes): filter, then the output."""
    return (
        f"int {fn}(struct pt_regs *ctx) {{\n"
        "    if (!tk_admit())\n"
        "        return 0;\n"
        f"{emit(output)}"
        "    return 0;\n"
        "}\n"
    )


LATENCY_FIELD = EventField(name="latency_ns", kind="uint", size=8)
