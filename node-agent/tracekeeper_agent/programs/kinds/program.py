"""program: raw BCC source, privileged. The prelude gives it TK_FILTER() and the outputs."""

from __future__ import annotations

from tracekeeper_agent.ports import Attachment, LoadFailure
from tracekeeper_agent.programs.kinds.context import BuildContext, KindRender
from tracekeeper_api.probes import TraceProbeSpec


def render(spec: TraceProbeSpec, ctx: BuildContext) -> KindRender:
    assert spec.program is not None
    if not ctx.allow_program:
        raise LoadFailure(
            "Failed",
            "NotPermitted",
            "raw program source is only loaded when the operator permits it "
            "(privileged namespace and raw programs allowed)",
        )
    # BCC attaches TRACEPOINT_PROBE / RAW_TRACEPOINT_PROBE / kprobe__ functions by name.
    return KindRender(
        body=spec.program.source + "\n", attachments=(Attachment("auto", "*"),), raw=True
    )
