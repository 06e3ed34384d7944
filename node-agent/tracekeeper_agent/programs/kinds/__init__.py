"""Probe kinds: one module per attach point, registered here by its wire name.

A kind checks its spec against the running kernel and renders the C functions that
attach there; the shared prelude (filter, sampling, outputs) comes from the builder.
Adding a kind is one new module plus one line in REGISTRY.
"""

from __future__ import annotations

from collections.abc import Callable

from tracekeeper_agent.programs.kinds import (
    kprobe,
    program,
    raw_tracepoint,
    syscall,
    tracepoint,
    uprobe,
)
from tracekeeper_agent.programs.kinds.context import BuildContext, KindRender
from tracekeeper_api.probes import TraceProbeSpec

Renderer = Callable[[TraceProbeSpec, BuildContext], KindRender]

REGISTRY: dict[str, Renderer] = {
    "tracepoint": tracepoint.render,
    "rawTracepoint": raw_tracepoint.render,
    "syscall": syscall.render,
    "uprobe": uprobe.render,
    "kprobe": kprobe.render,
    "program": program.render,
}

__all__ = ["REGISTRY", "BuildContext", "KindRender", "Renderer"]
