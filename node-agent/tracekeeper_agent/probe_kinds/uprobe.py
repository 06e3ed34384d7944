"""uprobe / uretprobe: a function in a binary or library, resolved in the targets' roots."""

from __future__ import annotations

from tracekeeper_agent.elf_symbols import UprobeTargetError, resolve_uprobe
from tracekeeper_agent.kernel import Attachment, LoadFailure
from tracekeeper_agent.probe_kinds.context import BuildContext, KindRender
from tracekeeper_agent.probe_kinds.outputs import regs_function
from tracekeeper_api.probes import TraceProbeSpec


def render(spec: TraceProbeSpec, ctx: BuildContext) -> KindRender:
    up = spec.uprobe
    assert up is not None
    if not ctx.kernel.uprobes.available:
        raise LoadFailure(
            "Unsupported",
            "Unsupported",
            f"uprobe {up.symbol}: this node's kernel ({ctx.kernel.release}) has no uprobes "
            f"({ctx.kernel.uprobes.evidence})",
        )
    binary = resolve(up.binary, up.symbol, ctx)
    fn = "tk_uretprobe" if up.return_ else "tk_uprobe"
    body = regs_function(fn, spec.output)
    attach = Attachment("uretprobe" if up.return_ else "uprobe", fn, up.symbol, binary)
    return KindRender(body=body, attachments=(attach,))


def resolve(binary: str, symbol: str, ctx: BuildContext) -> str:
    """Host path of the ELF file holding `symbol`, looked up in the first target root.
    Uprobes are per inode: one attach covers every process that maps that file."""
    try:
        target = resolve_uprobe(binary, symbol, root=ctx.roots[0])
    except UprobeTargetError as exc:
        raise LoadFailure("Failed", "AttachFailed", f"uprobe {binary}:{symbol}: {exc}") from exc
    return str(target.path)
