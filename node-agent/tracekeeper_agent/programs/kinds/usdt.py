"""usdt: a statically defined probe (`DTRACE_PROBE` / SystemTap SDT) in a binary of the targets.

The binary resolves in the targeted containers' roots exactly as a uprobe's does; its
`.note.stapsdt` notes give every site of provider:name, and each site is a plain uprobe at
the site's file offset, with the probe's semaphore given to the kernel as the uprobe's
`ref_ctr_offset` (host/usdt_notes.py). Per file, like uprobes: every process mapping it is
covered, the filter map decides who counts.

Events carry the arguments as arg0..argN, read from the registers and memory the note
names (sign- or zero-extended to 64 bits by the note's size). Sites of one probe may keep
an argument in different places, so there is one C function per distinct argument layout.
"""

from __future__ import annotations

from typing import Literal

from tracekeeper_agent.host.elf_symbols import BinaryNotFound
from tracekeeper_agent.host.usdt_notes import (
    Constant,
    Memory,
    Register,
    UsdtArg,
    UsdtFile,
    resolve_usdt,
)
from tracekeeper_agent.ports import Attachment, EventField, LoadFailure, TargetRoot
from tracekeeper_agent.programs.kinds.context import BuildContext, KindRender
from tracekeeper_agent.programs.kinds.outputs import emit
from tracekeeper_agent.programs.kinds.uprobe import NO_ROOT_YET, NothingToAttach, distinct_files
from tracekeeper_api.probes import TraceProbeSpec

MAX_SITES = 256
"""Uprobes of one usdt probe across its files (BCC's own quota is 1000 per process)."""
MAX_ARGS = 12
"""sys/sdt.h's limit (DTRACE_PROBE12)."""

IntKind = Literal["int", "uint"]
Layout = tuple[UsdtArg, ...]
"""The arguments as read at a site; a function per distinct one."""


def binary_of(spec: TraceProbeSpec) -> str | None:
    return spec.usdt.binary if spec.usdt is not None else None


def render(spec: TraceProbeSpec, ctx: BuildContext) -> KindRender:
    u = spec.usdt
    assert u is not None
    probe = f"usdt {u.binary}:{u.provider}:{u.name}"
    if not ctx.kernel.uprobes.available:
        raise LoadFailure(
            "Unsupported",
            "Unsupported",
            f"{probe}: this node's kernel ({ctx.kernel.release}) has no uprobes "
            f"({ctx.kernel.uprobes.evidence}), which USDT probes are attached with",
        )
    if not ctx.roots:
        raise NothingToAttach(f"{probe}: waiting, {NO_ROOT_YET} to resolve the binary in")
    files = resolve_all(u.binary, u.provider, u.name, ctx.roots)
    try:
        return _render(spec, probe, files)
    except BaseException:
        for f in files:
            f.close()
        raise


def _render(spec: TraceProbeSpec, probe: str, files: list[UsdtFile]) -> KindRender:
    assert spec.usdt is not None
    sites = [(f, s) for f in files for s in f.sites]
    if len(sites) > MAX_SITES:
        raise LoadFailure(
            "Failed", "AttachFailed", f"{probe} has {len(sites)} sites, more than {MAX_SITES}"
        )
    events = spec.output.kind == "events"
    layouts: dict[Layout, str] = {}
    for _, site in sites:
        layouts.setdefault(site.args if events else (), f"tk_usdt_{len(layouts)}")
    captured = captured_args(list(layouts)) if events else []
    attachments = tuple(
        Attachment(
            "usdt",
            layouts[site.args if events else ()],
            site.probe,
            f.file.proc_path,
            binary_id=f.file.identity,
            display=spec.usdt.binary,
            offset=site.offset,
            ref_ctr_offset=site.semaphore_offset,
        )
        for f, site in sites
    )
    body = readers(list(layouts), captured) + "".join(
        _function(fn, layout, captured, spec) for layout, fn in layouts.items()
    )
    return KindRender(
        body=body,
        attachments=attachments,
        event_fields=tuple(EventField(f"arg{i}", kind, 8) for i, kind in captured),
        event_decls=tuple(f"{'s64' if kind == 'int' else 'u64'} f_arg{i};" for i, kind in captured),
        held_fds=tuple(f.file.fd for f in files),
    )


def captured_args(layouts: list[Layout]) -> list[tuple[int, IntKind]]:
    """(index, "int" | "uint") of the arguments every site can read: the note's type allows
    it (an integer in a general register, in memory, or a constant). Signed when every
    site says signed."""
    if not layouts:
        return []
    count = min(len(layout) for layout in layouts)
    out: list[tuple[int, IntKind]] = []
    for i in range(min(count, MAX_ARGS)):
        args = [layout[i] for layout in layouts]
        if all(a.operand is not None for a in args):
            out.append((i, "int" if all(a.signed for a in args) else "uint"))
    return out


def _function(
    fn: str, layout: Layout, captured: list[tuple[int, IntKind]], spec: TraceProbeSpec
) -> str:
    notes = "".join(f"/* arg{i}: {a.text} */\n" for i, a in enumerate(layout))
    skipped = set(range(len(layout))) - {i for i, _ in captured}
    if spec.output.kind == "events" and skipped:
        notes += f"/* not captured (not readable at every site): {sorted(skipped)} */\n"
    captures = "".join(f"    e->f_arg{i} = {read_arg(layout[i])};\n" for i, _ in captured)
    return (
        f"{notes}int {fn}(struct pt_regs *ctx) {{\n"
        "    TK_ADMIT();\n"
        f"{emit(spec.output, captures=captures)}"
        "    return 0;\n"
        "}\n"
    )


_C_TYPES = {(1, True): "s8", (2, True): "s16", (4, True): "s32", (8, True): "s64"} | {
    (1, False): "u8",
    (2, False): "u16",
    (4, False): "u32",
    (8, False): "u64",
}


def read_arg(arg: UsdtArg) -> str:
    """A C expression of the argument's value, extended to 64 bits by its size and sign."""
    ctype = _C_TYPES[(arg.size, arg.signed)]
    wide = "s64" if arg.signed else "u64"
    op = arg.operand
    if isinstance(op, Constant):
        return f"({wide})({ctype}){op.value}LL"
    if isinstance(op, Register):
        return f"({wide})({ctype})ctx->{op.field}"
    assert isinstance(op, Memory)
    address = f"ctx->{op.base} + ({op.offset}LL)"
    if op.index is not None:
        address += f" + ctx->{op.index} * {op.scale}"
    return f"({wide})tk_usdt_read_{ctype}((void *)({address}))"


def readers(layouts: list[Layout], captured: list[tuple[int, IntKind]]) -> str:
    """The memory readers the captured arguments use: the task's own memory at the site,
    read as the note's type (0 if it cannot be read)."""
    types = sorted(
        {
            _C_TYPES[(layout[i].size, layout[i].signed)]
            for layout in layouts
            for i, _ in captured
            if isinstance(layout[i].operand, Memory)
        }
    )
    return "".join(
        f"static __always_inline {t} tk_usdt_read_{t}(void *p) {{\n"
        f"    {t} v = 0;\n"
        "    bpf_probe_read_user(&v, sizeof(v), p);\n"
        "    return v;\n"
        "}\n"
        for t in types
    )


def resolve_all(
    binary: str, provider: str, name: str, roots: tuple[TargetRoot, ...]
) -> list[UsdtFile]:
    """The distinct files with provider:name in the roots, by (inode, size, ctime) as for
    uprobes. A root without the binary is skipped; none with it, or a binary without the
    probe, fails the probe naming it (and the probes the binary has)."""
    return distinct_files(
        roots,
        lambda fd: resolve_usdt(binary, provider, name, fd),
        lambda exc, where: (
            f"usdt {binary}:{provider}:{name}{where}: {exc}"
            if isinstance(exc, BinaryNotFound)
            else f"{exc}{where}"
        ),
    )
