"""Probe kinds: one module per attach point, registered here by its wire name.

A kind checks its spec against the running kernel and renders the C functions that
attach there; the shared prelude (filter, sampling, outputs) comes from the builder.
Adding a kind is one new module plus one line in REGISTRY (and one in BINARY_OF if it
resolves a binary in the targets' roots).
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
    usdt,
)
from tracekeeper_agent.programs.kinds.context import BuildContext, KindRender
from tracekeeper_api.probes import TraceProbeSpec

Renderer = Callable[[TraceProbeSpec, BuildContext], KindRender]

REGISTRY: dict[str, Renderer] = {
    "tracepoint": tracepoint.render,
    "rawTracepoint": raw_tracepoint.render,
    "syscall": syscall.render,
    "uprobe": uprobe.render,
    "usdt": usdt.render,
    "kprobe": kprobe.render,
    "program": program.render,
}

BINARY_OF: dict[str, Callable[[TraceProbeSpec], str | None]] = {
    "uprobe": uprobe.binary_of,
    "usdt": usdt.binary_of,
}
"""Kinds whose binary resolves in the targeted containers' roots: the planner opens those
roots for them, and a plan's inputs include the identity of the file found in each."""


def binary_of(spec: TraceProbeSpec) -> str | None:
    """The binary the probe's kind resolves in the targets' roots, if it has one."""
    of = BINARY_OF.get(spec.attach_kind)
    return of(spec) if of is not None else None


__all__ = ["BINARY_OF", "REGISTRY", "BuildContext", "KindRender", "Renderer", "binary_of"]
