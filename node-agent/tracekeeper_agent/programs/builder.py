"""Spec -> BCC C text and an attach plan of its shape, checked against the running kernel.

The text is the shared constants (programs/constants.py) and the shape's #defines (output
kind, `by` keys), the prelude (c_prelude.h: filter, per-binding sampling and rate limit,
outputs), then the probe kind's functions. Nothing of who is traced, sampling or the rate
limit is in it: every probe of one shape compiles to the same text (programs/sharing.py).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from tracekeeper_agent.host.elf_symbols import UprobeTargetError, find_binary
from tracekeeper_agent.host.event_records import EVENT_HEADER
from tracekeeper_agent.host.kernel_features import KernelFeatures, detect
from tracekeeper_agent.host.rootfs import RootPathError, open_root
from tracekeeper_agent.ports import HeldFiles, LoadFailure, ProgramPlan, TargetRoot
from tracekeeper_agent.programs.constants import c_defines
from tracekeeper_agent.programs.kinds import REGISTRY, BuildContext, KindRender, binary_of
from tracekeeper_api.protocol import ProbeAssignment, ProbeTargets
from tracekeeper_api.shapes import shape_of

PRELUDE = (Path(__file__).parent / "c_prelude.h").read_text()


@cache
def node_kernel() -> KernelFeatures:
    return detect()


def follows(assignment: ProbeAssignment) -> bool:
    """The probe follows the children of its pids: its program has the fork and exit
    followers (a shape of its own: they cost every other program a slot on those
    tracepoints otherwise)."""
    return assignment.targets.follow_children and bool(assignment.targets.pids)


def _defines(assignment: ProbeAssignment) -> str:
    out = assignment.spec.output
    by = set(out.by) if out.kind != "events" else set()
    values = {
        "TK_OUTPUT_COUNT": out.kind == "count" or assignment.spec.program is not None,
        "TK_OUTPUT_HISTOGRAM": out.kind == "histogram",
        "TK_OUTPUT_EVENTS": out.kind == "events",
        "TK_BY_CGROUP": bool(by & {"pod", "container"}),
        "TK_BY_PID": "pid" in by,
        "TK_BY_COMM": "comm" in by,
        "TK_FOLLOW_CHILDREN": follows(assignment),
    }
    return c_defines() + "".join(f"#define {k} {int(v)}\n" for k, v in values.items())


def _event_struct(kind: KindRender) -> str:
    members = [decl for _name, decl, _fmt in EVENT_HEADER] + list(kind.event_decls)
    return "struct tk_event {\n" + "".join(f"    {d}\n" for d in members) + "};\n"


def render_source(assignment: ProbeAssignment, ctx: BuildContext) -> tuple[str, KindRender]:
    spec = assignment.spec
    kind = REGISTRY[spec.attach_kind](spec, ctx)
    parts = [
        f"/* tracekeeper program: {shape_of(assignment).label} */\n",
        # Raw programs are written against BCC's usual headers (task_struct, ...).
        "#include <linux/sched.h>\n" if kind.raw else "",
        _defines(assignment),
        PRELUDE,
        "\n",
    ]
    if spec.output.kind == "events":
        parts.append(_event_struct(kind))
    parts.append("\n" + kind.body)
    return "".join(parts), kind


def build_plan(assignment: ProbeAssignment, ctx: BuildContext | None = None) -> ProgramPlan:
    """The plan to load for one assignment; LoadFailure when this kernel cannot do it.
    Without a context, uprobe binaries resolve in the host's root (standalone mode)."""
    if ctx is None:
        with host_roots() as roots:
            # Standalone: the host's root user wrote the file, so it is privileged.
            ctx = BuildContext(
                kernel=node_kernel(),
                roots=roots,
                allow_program=assignment.allow_program,
                privileged=True,
            )
            return _build(assignment, ctx)
    return _build(assignment, ctx)


def _build(assignment: ProbeAssignment, ctx: BuildContext) -> ProgramPlan:
    if not ctx.kernel.kernel_headers.available:
        raise LoadFailure(
            "KernelHeadersMissing",
            "KernelHeadersMissing",
            f"BCC needs kernel headers for {ctx.kernel.release}: "
            f"{ctx.kernel.kernel_headers.evidence} "
            "(install linux-headers and link /lib/modules/$(uname -r)/build)",
        )
    source, kind = render_source(assignment, ctx)
    spec = assignment.spec
    return ProgramPlan(
        held=HeldFiles(list(kind.held_fds)),
        shape=shape_of(assignment).label,
        source=source,
        attachments=kind.attachments,
        output_kind=spec.output.kind,
        by=tuple(spec.output.by) if spec.output.kind != "events" else (),
        event_fields=kind.event_fields,
        source_hash=hashlib.sha256(source.encode()).hexdigest()[:16],
    )


# --- what a plan depends on, and where it is resolved --------------------------------------


def plan_inputs(assignment: ProbeAssignment, privileged: bool = True) -> Hashable:
    """What the program of an assignment is built from, besides the files of its binary
    (uprobe, usdt: the sites and argument layouts of a usdt probe come from the file):
    its shape, the permission for raw source and whether its namespace is privileged (a
    tenant's probe must not join a program capturing what it may not), and whether it
    follows children (programs.builder.follows). Probes with equal inputs share one
    program; targets, sampling and rate limit are map contents."""
    return (shape_of(assignment), assignment.allow_program, privileged, follows(assignment))


RootsOf = Callable[[ProbeTargets], list[TargetRoot]]
"""Opens the roots a probe's targets live in (dirfds the caller closes)."""


@contextmanager
def host_roots() -> Iterator[tuple[TargetRoot, ...]]:
    """The host's root as the only TargetRoot, closed on exit."""
    fd = open_root("/")
    try:
        yield (TargetRoot(fd, "host"),)
    finally:
        os.close(fd)


def host_root_only(_: ProbeTargets) -> list[TargetRoot]:
    return [TargetRoot(open_root("/"), "host")]


class Planner:
    """The agent's plan builder: uprobe and usdt binaries resolve in the roots `roots_of` opens for
    the probe's targets (the targeted containers' in the agent, the host's standalone).
    `inputs` is cheap (no compile, no ELF scan) and says when `build` must run again."""

    def __init__(
        self,
        roots_of: RootsOf = host_root_only,
        privileged_namespaces: frozenset[str] | None = None,
    ) -> None:
        self._roots_of = roots_of
        self._privileged = privileged_namespaces
        """Whose probes may capture address fields (None: every probe, standalone)."""

    def _privileged_ns(self, assignment: ProbeAssignment) -> bool:
        return self._privileged is None or assignment.namespace in self._privileged

    def inputs(self, assignment: ProbeAssignment) -> Hashable:
        base = plan_inputs(assignment, self._privileged_ns(assignment))
        binary = binary_of(assignment.spec)
        if binary is None:
            return base
        files: set[object] = set()
        roots = self._roots_of(assignment.targets)
        try:
            for root in roots:
                try:
                    opened = find_binary(binary, root.fd)
                except (RootPathError, UprobeTargetError, OSError) as exc:
                    files.add(f"{root.label}: {exc}")
                    continue
                os.close(opened.fd)
                files.add((opened.dev, opened.ino, opened.size, opened.change))
        finally:
            _close(roots)
        return (base, frozenset(files), bool(roots))

    def build(self, assignment: ProbeAssignment) -> ProgramPlan:
        roots = self._roots_of(assignment.targets) if binary_of(assignment.spec) else []
        try:
            ctx = BuildContext(
                kernel=node_kernel(),
                roots=tuple(roots),
                allow_program=assignment.allow_program,
                privileged=self._privileged_ns(assignment),
            )
            return _build(assignment, ctx)
        finally:
            _close(roots)


def _close(roots: list[TargetRoot]) -> None:
    for root in roots:
        os.close(root.fd)
