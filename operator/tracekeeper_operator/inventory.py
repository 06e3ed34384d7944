"""What a node cannot run, decided by the operator from the kernel facts its agent reported
(KernelInfo, sent with every report): such a probe is not pushed there at all, and says
why with the node's own fact. No round trip, no compile, no agent log to read.

Pure. A node whose agent has not reported yet gets the probe, and its agent decides (the
same checks run there: this only saves the trip).
"""

from __future__ import annotations

from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.protocol import KernelInfo
from tracekeeper_api.reasons import OutcomeReason

Refused = tuple[OutcomeReason, str]


def node_refusal(spec: TraceProbeSpec, node: str, kernel: KernelInfo) -> Refused | None:
    """Why `node` cannot run the probe, from its agent's report; None if it may (or if the
    report holds no kernel facts: no release, nothing known)."""
    if not kernel.release:
        return None

    def fact(feature: str) -> str:
        why = kernel.missing.get(feature)
        return f" (its agent found: {why})" if why else ""

    where = f"node {node}'s kernel ({kernel.release or 'release unknown'})"
    if spec.kprobe is not None and not kernel.kprobes:
        return ("Unsupported", f"{where} has no kprobes{fact('kprobes')}; "
                "use a tracepoint or syscall probe instead")  # fmt: skip
    if spec.uprobe is not None and not kernel.uprobes:
        return "Unsupported", f"{where} has no uprobes{fact('uprobes')}"
    if spec.usdt is not None and not kernel.uprobes:
        return ("Unsupported", f"{where} has no uprobes{fact('uprobes')}, which USDT "
                "probes are attached with")  # fmt: skip
    uses_tracepoints = spec.tracepoint is not None or spec.syscall is not None
    if uses_tracepoints and kernel.tracepoints is False:
        return "Unsupported", f"{where} has no tracepoints{fact('tracepoints')}"
    if spec.output.kind == "events" and kernel.ring_buffer is False:
        return ("Unsupported", f"{where} has no BPF ring buffer for events"
                f"{fact('ringBuffer')}; use a count or histogram output")  # fmt: skip
    if not kernel.headers:
        return ("KernelHeadersMissing", f"{where}: BCC has no kernel headers to compile "
                f"against{fact('headers')}")  # fmt: skip
    return None
