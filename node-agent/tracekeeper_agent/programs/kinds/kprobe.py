"""kprobe / kretprobe: a kernel function. Kernels without kprobes get Unsupported."""

from __future__ import annotations

from tracekeeper_agent.ports import Attachment, LoadFailure
from tracekeeper_agent.programs.kinds.context import BuildContext, KindRender
from tracekeeper_agent.programs.kinds.outputs import regs_function
from tracekeeper_api.probes import TraceProbeSpec


def render(spec: TraceProbeSpec, ctx: BuildContext) -> KindRender:
    kp = spec.kprobe
    assert kp is not None
    if not ctx.kernel.kprobes.available:
        raise LoadFailure(
            "Unsupported",
            "Unsupported",
            f"kprobe {kp.function}: this node's kernel ({ctx.kernel.release}) has no kprobes "
            f"({ctx.kernel.kprobes.evidence}); use a tracepoint or syscall probe instead",
        )
    fn = "tk_kretprobe" if kp.return_ else "tk_kprobe"
    body = regs_function(fn, spec.output)
    attach = Attachment("kretprobe" if kp.return_ else "kprobe", fn, kp.function)
    return KindRender(body=body, attachments=(attach,))
