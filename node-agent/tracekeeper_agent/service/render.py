"""`tracekeeper-agent render -f probe.yaml`: the C text each TraceProbe of a file compiles to
(the habit of BCC tools' `--ebpf`), without loading anything: the quickest way to see what a
spec becomes. Uprobe binaries resolve in the host's root, as `run` does."""

from __future__ import annotations

import os
from typing import TextIO

from tracekeeper_agent.ports import LoadFailure
from tracekeeper_agent.programs.builder import host_roots, node_kernel, render_source
from tracekeeper_agent.programs.kinds import BuildContext
from tracekeeper_api.protocol import NodeState


def render_state(state: NodeState, out: TextIO, err: TextIO) -> int:
    """Print each probe's C to `out`; a probe this kernel cannot build goes to `err` with its
    reason. Returns how many probes failed."""
    failed = 0
    kernel = node_kernel()
    for assignment in state.probes:
        try:
            with host_roots() as roots:
                ctx = BuildContext(kernel=kernel, roots=roots, allow_program=True)
                source, kind = render_source(assignment, ctx)
                for fd in kind.held_fds:
                    os.close(fd)
        except LoadFailure as exc:
            print(f"{assignment.id}: {exc.state} ({exc.reason}: {exc.message})", file=err)
            failed += 1
            continue
        out.write(source if source.endswith("\n") else source + "\n")
    return failed
