"""uprobe / uretprobe: a function in a binary or library, resolved in the targets' roots.

Uprobes are per inode: one attachment per distinct file found across the targeted
containers' roots covers every process that maps it (the filter map still decides who
counts). Attachments go through /proc/self/fd/N of the fd that was checked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from tracekeeper_agent.host.elf_symbols import (
    BinaryNotFound,
    UprobeFile,
    UprobeTargetError,
    resolve_uprobe,
)
from tracekeeper_agent.host.rootfs import OpenedFile
from tracekeeper_agent.ports import AttachKind, Attachment, LoadFailure, TargetRoot
from tracekeeper_agent.programs.kinds.context import BuildContext, KindRender
from tracekeeper_agent.programs.kinds.outputs import regs_function
from tracekeeper_api.probes import TraceProbeSpec

NO_ROOT_YET = "no process runs in the targeted containers yet"


class NothingToAttach(LoadFailure):
    """No targeted container runs yet: nothing to resolve the binary in. Reported as
    Loaded (pending, like a pod whose cgroup does not exist yet), re-planned when one
    starts."""

    def __init__(self, message: str) -> None:
        super().__init__("Loaded", "Loaded", message)


def binary_of(spec: TraceProbeSpec) -> str | None:
    return spec.uprobe.binary if spec.uprobe is not None else None


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
    if not ctx.roots:
        raise NothingToAttach(
            f"uprobe {up.binary}:{up.symbol}: waiting, {NO_ROOT_YET} to resolve the binary in"
        )
    files = resolve_all(up.binary, up.symbol, ctx.roots)
    fn = "tk_uretprobe" if up.return_ else "tk_uprobe"
    kind: AttachKind = "uretprobe" if up.return_ else "uprobe"
    attachments = tuple(
        Attachment(
            kind,
            fn,
            up.symbol,
            f.file.proc_path,
            binary_id=f.file.identity,
            display=up.binary,
        )
        for f in files
    )
    return KindRender(
        body=regs_function(fn, spec.output),
        attachments=attachments,
        held_fds=tuple(f.file.fd for f in files),
    )


class OpenBinary(Protocol):
    """A binary resolved in a target's root, held open (UprobeFile, UsdtFile)."""

    @property
    def file(self) -> OpenedFile: ...

    def close(self) -> None: ...


B = TypeVar("B", bound=OpenBinary)


def distinct_files(
    roots: tuple[TargetRoot, ...],
    resolve: Callable[[int], B],
    message: Callable[[UprobeTargetError, str], str],
) -> list[B]:
    """`resolve` in each root (its fd), the distinct files kept. A root without the binary
    (a sidecar, another image) is skipped; none with it, or any other failure, fails the
    probe with `message(error, where)`.

    Distinct by (inode, size, ctime), not (dev, inode): overlayfs reports its own st_dev
    per mount, so one image's file in two containers would be attached (and counted) twice.
    """
    found: dict[tuple[int, int, int], B] = {}
    missing: list[str] = []
    try:
        for root in roots:
            where = f" in {root.label}" if len(roots) > 1 else ""
            try:
                target = resolve(root.fd)
            except BinaryNotFound as exc:
                missing.append(message(exc, where))
                continue
            except UprobeTargetError as exc:
                raise LoadFailure("Failed", "AttachFailed", message(exc, where)) from None
            key = (target.file.ino, target.file.size, target.file.change)
            if key in found:
                target.close()
            else:
                found[key] = target
    except BaseException:
        for f in found.values():
            f.close()
        raise
    if not found:
        raise LoadFailure("Failed", "AttachFailed", missing[0])
    return list(found.values())


def resolve_all(binary: str, symbol: str, roots: tuple[TargetRoot, ...]) -> list[UprobeFile]:
    """The distinct files holding `symbol` in the roots; a binary without the symbol fails
    the probe, naming that target."""
    return distinct_files(
        roots,
        lambda fd: resolve_uprobe(binary, symbol, fd),
        lambda exc, where: f"uprobe {binary}:{symbol}{where}: {exc}",
    )
