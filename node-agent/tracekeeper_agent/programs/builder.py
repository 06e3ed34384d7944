"""Spec -> BCC C text and an attach plan, checked against the running kernel first.

The text is the prelude (c_prelude.h: filter, sampling, rate limit, outputs) with
#defines that compile in only what this probe uses, then the probe kind's functions.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from tracekeeper_agent.host.elf_symbols import UprobeTargetError, find_binary
from tracekeeper_agent.host.kernel_features import KernelFeatures, detect
from tracekeeper_agent.host.rootfs import RootPathError, open_root
from tracekeeper_agent.ports import FilterKind, HeldFiles, LoadFailure, ProgramPlan, TargetRoot
from tracekeeper_agent.programs.kinds import REGISTRY, BuildContext, KindRender
from tracekeeper_api.protocol import ProbeAssignment, ProbeTargets

PRELUDE = (Path(__file__).parent / "c_prelude.h").read_text()

MAX_CGROUPS = 16384
MAX_PIDS = 65536
MAX_KEYS = 10240
MAX_CGROUP_LEVEL = 16
RING_PAGES = 512  # 2 MiB of ring buffer per events probe


@cache
def node_kernel() -> KernelFeatures:
    return detect()


def filter_kinds(targets: ProbeTargets) -> frozenset[FilterKind]:
    """Only the filter kinds a probe uses are compiled in. Pods always bring the cgroup
    filter, even with no pod on this node yet: an empty map matches nothing."""
    kinds: set[FilterKind] = set()
    if targets.pods or targets.cgroup_paths or not (targets.pids or targets.host_wide):
        kinds.add("cgroup")
    if targets.pids:
        kinds.add("pid")
    if targets.process_names:
        kinds.add("comm")
    if targets.host_wide:
        kinds.discard("cgroup")
    return frozenset(kinds)


def _defines(assignment: ProbeAssignment, kinds: frozenset[FilterKind]) -> str:
    spec, targets = assignment.spec, assignment.targets
    out = spec.output
    by = set(out.by) if out.kind != "events" else set()
    values = {
        "TK_FILTER_CGROUP": "cgroup" in kinds,
        "TK_FILTER_PID": "pid" in kinds,
        "TK_FILTER_COMM": "comm" in kinds,
        "TK_FOLLOW_CHILDREN": targets.follow_children,
        "TK_HOST_WIDE": targets.host_wide,
        "TK_SAMPLING": spec.sampling,
        "TK_OUTPUT_COUNT": out.kind == "count" or spec.program is not None,
        "TK_OUTPUT_HISTOGRAM": out.kind == "histogram",
        "TK_OUTPUT_EVENTS": out.kind == "events",
        "TK_BY_CGROUP": bool(by & {"pod", "container"}),
        "TK_BY_PID": "pid" in by,
        "TK_BY_COMM": "comm" in by,
        "TK_RATE_LIMIT": out.rate_limit or 0,
        "TK_MAX_CGROUPS": MAX_CGROUPS,
        "TK_MAX_PIDS": MAX_PIDS,
        "TK_MAX_KEYS": MAX_KEYS,
        "TK_MAX_LEVEL": MAX_CGROUP_LEVEL,
        "TK_RING_PAGES": RING_PAGES,
    }
    return "".join(f"#define {k} {int(v)}\n" for k, v in values.items())


def _event_struct(kind: KindRender) -> str:
    members = "\n".join(f"    {d}" for d in kind.event_decls)
    return (
        "struct tk_event {\n"
        "    u64 ts;\n"
        "    u64 cgroup;\n"
        "    u32 pid;\n"
        "    u32 tid;\n"
        "    char comm[TASK_COMM_LEN];\n"
        f"{members}\n"
        "};\n"
    )


def render_source(assignment: ProbeAssignment, ctx: BuildContext) -> tuple[str, KindRender]:
    spec = assignment.spec
    kind = REGISTRY[spec.attach_kind](spec, ctx)
    kinds = filter_kinds(assignment.targets)
    parts = [
        f"/* tracekeeper probe {assignment.id} ({spec.attach_kind}, {spec.output.kind}) */\n",
        _defines(assignment, kinds),
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
        probe_id=assignment.id,
        source=source,
        attachments=kind.attachments,
        filter_kinds=filter_kinds(assignment.targets),
        output_kind=spec.output.kind,
        by=tuple(spec.output.by) if spec.output.kind != "events" else (),
        event_fields=kind.event_fields,
        source_hash=hashlib.sha256(source.encode()).hexdigest()[:16],
    )


# --- what a plan depends on, and where it is resolved --------------------------------------


def plan_inputs(assignment: ProbeAssignment) -> Hashable:
    """What the program of an assignment is built from, besides the files of its uprobe:
    the spec (by its hash), the permission for raw source and the shape of the targets
    (which filter kinds and defines are compiled in). Targets themselves are map entries."""
    t = assignment.targets
    shape = (
        bool(t.pods),
        bool(t.cgroup_paths),
        bool(t.pids),
        bool(t.process_names),
        t.follow_children,
        t.host_wide,
    )
    return (assignment.spec_hash, assignment.allow_program, shape)


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
    """The agent's plan builder: uprobe binaries resolve in the roots `roots_of` opens for
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

    def inputs(self, assignment: ProbeAssignment) -> Hashable:
        base = plan_inputs(assignment)
        up = assignment.spec.uprobe
        if up is None:
            return base
        files: set[object] = set()
        roots = self._roots_of(assignment.targets)
        try:
            for root in roots:
                try:
                    opened = find_binary(up.binary, root.fd)
                except (RootPathError, UprobeTargetError, OSError) as exc:
                    files.add(f"{root.label}: {exc}")
                    continue
                os.close(opened.fd)
                files.add((opened.dev, opened.ino, opened.size, opened.change))
        finally:
            _close(roots)
        return (base, frozenset(files), bool(roots))

    def build(self, assignment: ProbeAssignment) -> ProgramPlan:
        roots = self._roots_of(assignment.targets) if assignment.spec.uprobe else []
        try:
            privileged = self._privileged is None or assignment.namespace in self._privileged
            ctx = BuildContext(
                kernel=node_kernel(),
                roots=tuple(roots),
                allow_program=assignment.allow_program,
                privileged=privileged,
            )
            return _build(assignment, ctx)
        finally:
            _close(roots)


def _close(roots: list[TargetRoot]) -> None:
    for root in roots:
        os.close(root.fd)
