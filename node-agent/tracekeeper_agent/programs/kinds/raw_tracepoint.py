"""rawTracepoint: a tracepoint by name, arguments not decoded (cheaper than tracepoint)."""

from __future__ import annotations

from tracekeeper_agent.host.tracefs import find_tracefs
from tracekeeper_agent.ports import Attachment, LoadFailure
from tracekeeper_agent.programs.kinds.context import BuildContext, KindRender
from tracekeeper_agent.programs.kinds.outputs import emit
from tracekeeper_api.probes import TraceProbeSpec


def render(spec: TraceProbeSpec, ctx: BuildContext) -> KindRender:
    name = spec.raw_tracepoint
    assert name is not None
    events = (ctx.tracefs or find_tracefs()) / "events"
    if not any(events.glob(f"*/{name}/format")):
        raise LoadFailure(
            "Failed",
            "AttachFailed",
            f"raw tracepoint {name} does not exist on this node's kernel ({ctx.kernel.release}): "
            f"no {events}/*/{name}",
        )
    body = (
        f"RAW_TRACEPOINT_PROBE({name}) {{\n    TK_ADMIT();\n{emit(spec.output)}    return 0;\n}}\n"
    )
    return KindRender(body=body, attachments=(Attachment("auto", f"raw_tracepoint__{name}", name),))
