"""USDT (SystemTap SDT) probes of an ELF file: its `.note.stapsdt` notes, read with pyelftools,
and where a uprobe for each probe site goes.

A note names a provider and a probe, the site's address (a `nop` the compiler put where
`DTRACE_PROBE` was), the address of `.stapsdt.base` at link time (prelink moves code: the
site moves by the same difference), an optional semaphore (a u16 the program reads to know
whether anyone listens) and the arguments in the assembler's syntax, `size@operand`
(`-4@%eax`: a signed 4-byte value in eax; `8@-16(%rbp)`: 8 unsigned bytes at rbp-16).

The kernel wants file offsets, for the site and for the semaphore (uprobe `ref_ctr_offset`):
addresses are turned into offsets through the PT_LOAD segment holding them, as libbpf does.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.construct import ConstructError
from elftools.elf.elffile import ELFFile

from tracekeeper_agent.host.elf_symbols import (
    MAX_ELF_BYTES,
    BinaryNotFound,
    NotAnElf,
    UprobeTargetError,
    find_binary,
)
from tracekeeper_agent.host.rootfs import OpenedFile, RootPathError

NOTE_SECTION = ".note.stapsdt"
BASE_SECTION = ".stapsdt.base"
NT_STAPSDT = 3
"""pyelftools names type 3 after GNU's build-id note; the owner "stapsdt" tells them apart."""
MAX_NOTES = 4096
"""Notes read from one file (libc has ~40, a JVM ~500): a bound on a tenant's file."""
MAX_LISTED = 10
"""Probes named in a not-found message."""


class UsdtProbeNotFound(UprobeTargetError):
    pass


# --- arguments -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Register:
    """A register's value: `field` of the kernel's struct pt_regs."""

    field: str


@dataclass(frozen=True, slots=True)
class Memory:
    """`size` bytes of user memory at base + offset (+ index * scale)."""

    base: str
    offset: int
    index: str | None = None
    scale: int = 1


@dataclass(frozen=True, slots=True)
class Constant:
    value: int


Operand = Register | Memory | Constant


@dataclass(frozen=True, slots=True)
class UsdtArg:
    size: int
    """Bytes: 1, 2, 4 or 8."""
    signed: bool
    operand: Operand | None
    """None: a BPF program cannot read it from the probe's registers (a floating-point or
    vector register, a symbol's address, a segment register, an unknown syntax)."""
    text: str
    """As the note says it (`-4@%eax`), for messages and the C text's comments."""


def _x86_64_registers() -> dict[str, str]:
    names: dict[str, str] = {}
    for field, wide, narrow in (
        ("ax", "a", "al"),
        ("bx", "b", "bl"),
        ("cx", "c", "cl"),
        ("dx", "d", "dl"),
    ):
        names |= {f"r{wide}x": field, f"e{wide}x": field, f"{wide}x": field, narrow: field}
    for field, low in (("si", "sil"), ("di", "dil"), ("bp", "bpl"), ("sp", "spl")):
        names |= {f"r{field}": field, f"e{field}": field, field: field, low: field}
    for n in range(8, 16):
        names |= {f"r{n}{suffix}": f"r{n}" for suffix in ("", "d", "w", "b", "l")}
    return names


_X86_64_REGS = _x86_64_registers()
"""Every name of a general-purpose register (rax, eax, ax, al, r8d, ...) -> its pt_regs
field; the width comes from the argument's size. ah/bh/ch/dh (bits 8-15) are not here:
compilers do not emit them for SDT arguments, and reading them would need a shift."""

_ARG = re.compile(r"^(-?)(1|2|4|8)@(.+)$")
_INT = r"-?(?:0x[0-9a-fA-F]+|[0-9]+)"
_MEMORY = re.compile(rf"^({_INT})?\(%(\w+)(?:,%(\w+)(?:,([1248]))?)?\)$")
_CONSTANT = re.compile(rf"^\$({_INT})$")
EM_X86_64 = "EM_X86_64"


def parse_arg(text: str, machine: str = EM_X86_64) -> UsdtArg:
    """One argument of a note. Operands are decoded for x86-64 only; on other machines the
    probe still attaches, its arguments are just not captured."""
    m = _ARG.match(text)
    if m is None:
        return UsdtArg(8, False, None, text)  # no size (old notes) or a float (`8f@%xmm0`)
    signed, size, operand = m.group(1) == "-", int(m.group(2)), m.group(3)
    return UsdtArg(size, signed, _x86_64_operand(operand) if machine == EM_X86_64 else None, text)


def _x86_64_operand(text: str) -> Operand | None:
    if text.startswith("%"):
        field = _X86_64_REGS.get(text[1:])
        return Register(field) if field else None
    if c := _CONSTANT.match(text):
        return Constant(int(c.group(1), 0))
    if mem := _MEMORY.match(text):
        base = _X86_64_REGS.get(mem.group(2))
        index = _X86_64_REGS.get(mem.group(3)) if mem.group(3) else None
        if base is None or (mem.group(3) and index is None):
            return None  # %rip-relative (a symbol's address), a segment register
        offset = int(mem.group(1), 0) if mem.group(1) else 0
        return Memory(base, offset, index, int(mem.group(4) or 1))
    return None  # `sym(%rip)`, `%fs:...`, `%xmm0`, ...


def parse_args(text: str, machine: str = EM_X86_64) -> tuple[UsdtArg, ...]:
    return tuple(parse_arg(a, machine) for a in text.split())


# --- notes ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsdtNote:
    """One probe site."""

    provider: str
    name: str
    offset: int
    """File offset of the site: where the uprobe goes."""
    semaphore_offset: int
    """File offset of the probe's semaphore, 0 if it has none (the kernel's uprobe
    `ref_ctr_offset`: it increments the u16 in every process that maps the file while the
    uprobe exists, so the program's `if (semaphore)` sees a listener)."""
    args: tuple[UsdtArg, ...]

    @property
    def probe(self) -> str:
        return f"{self.provider}:{self.name}"


@dataclass(frozen=True, slots=True)
class LoadSegment:
    vaddr: int
    memsz: int
    offset: int
    filesz: int


def read_notes(fd: int, label: str) -> list[UsdtNote]:
    """The USDT probe sites of an open ELF file (none: an empty list)."""
    try:
        with os.fdopen(os.dup(fd), "rb") as stream:
            elf = ELFFile(stream)
            return _notes(elf, label)
    except (ELFError, ConstructError, struct.error, ValueError, EOFError) as exc:
        raise NotAnElf(f"{label} is not a readable ELF file ({exc})") from None


def _notes(elf: ELFFile, label: str) -> list[UsdtNote]:
    section = elf.get_section_by_name(NOTE_SECTION)
    if section is None or not hasattr(section, "iter_notes"):
        return []
    if elf.elfclass != 64:
        raise NotAnElf(f"{label} is a 32-bit ELF file; only ELF64 is supported")
    order = "<" if elf.little_endian else ">"
    base_section = elf.get_section_by_name(BASE_SECTION)
    base_now = int(base_section["sh_addr"]) if base_section is not None else 0
    loads = [
        LoadSegment(int(s["p_vaddr"]), int(s["p_memsz"]), int(s["p_offset"]), int(s["p_filesz"]))
        for s in elf.iter_segments("PT_LOAD")
    ]
    machine = str(elf["e_machine"])
    notes: list[UsdtNote] = []
    for note in section.iter_notes():
        if note["n_name"] != "stapsdt" or note["n_type"] not in (NT_STAPSDT, "NT_GNU_BUILD_ID"):
            continue
        if len(notes) >= MAX_NOTES:
            raise NotAnElf(f"{label} has more than {MAX_NOTES} USDT notes")
        notes.append(parse_note(bytes(note["n_descdata"]), order, base_now, loads, machine, label))
    return notes


def parse_note(
    desc: bytes, order: str, base_now: int, loads: list[LoadSegment], machine: str, label: str
) -> UsdtNote:
    pc, base, semaphore = struct.unpack_from(order + "QQQ", desc, 0)
    provider, name, args = [*desc[24:].split(b"\0"), b"", b""][:3]
    if base and base_now:
        pc += base_now - base  # prelinked: the code moved, and .stapsdt.base with it
    where = f"USDT {os.fsdecode(provider)}:{os.fsdecode(name)} in {label}"
    return UsdtNote(
        provider=os.fsdecode(provider),
        name=os.fsdecode(name),
        offset=_file_offset(pc, loads, where),
        semaphore_offset=_file_offset(semaphore, loads, where + " (semaphore)") if semaphore else 0,
        args=parse_args(os.fsdecode(args), machine),
    )


def _file_offset(vaddr: int, loads: list[LoadSegment], where: str) -> int:
    for seg in loads:
        if seg.vaddr <= vaddr < seg.vaddr + min(seg.memsz, seg.filesz):
            return vaddr - seg.vaddr + seg.offset
    raise NotAnElf(f"{where}: address {vaddr:#x} is in no loaded segment of the file")


def sites_of(notes: list[UsdtNote], provider: str, name: str, label: str) -> list[UsdtNote]:
    """The sites of provider:name (a probe used in several places, or inlined, has one note
    per copy). None: UsdtProbeNotFound naming it and the probes the file has (bounded)."""
    sites = [n for n in notes if n.provider == provider and n.name == name]
    if sites:
        return sites
    probes = sorted({n.probe for n in notes})
    if not probes:
        raise UsdtProbeNotFound(
            f"USDT probe {provider}:{name} not found: {label} has no USDT probes "
            f"(no {NOTE_SECTION} notes)"
        )
    shown = ", ".join(probes[:MAX_LISTED])
    more = f", and {len(probes) - MAX_LISTED} more" if len(probes) > MAX_LISTED else ""
    raise UsdtProbeNotFound(
        f"USDT probe {provider}:{name} not found in {label}; its probes are: {shown}{more}"
    )


# --- in a root -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsdtFile:
    """A checked, open binary and the sites of the probe in it."""

    file: OpenedFile
    sites: tuple[UsdtNote, ...]

    def close(self) -> None:
        os.close(self.file.fd)


_NOTES_CACHE: dict[tuple[int, int, int, int], list[UsdtNote] | NotAnElf] = {}
_NOTES_CACHE_SIZE = 128


def notes_of(opened: OpenedFile, label: str) -> list[UsdtNote]:
    """The notes of an opened file, remembered by file identity (plans are rebuilt on every
    input change; the file is the same until its identity changes)."""
    key = (opened.dev, opened.ino, opened.size, opened.change)
    cached = _NOTES_CACHE.get(key)
    if cached is None:
        if opened.size > MAX_ELF_BYTES:
            raise NotAnElf(f"{label} is larger than {MAX_ELF_BYTES >> 20} MiB")
        try:
            cached = read_notes(opened.fd, label)
        except NotAnElf as exc:
            cached = exc
        if len(_NOTES_CACHE) >= _NOTES_CACHE_SIZE:
            _NOTES_CACHE.pop(next(iter(_NOTES_CACHE)))
        _NOTES_CACHE[key] = cached
    if isinstance(cached, NotAnElf):
        raise NotAnElf(str(cached))
    return cached


def resolve_usdt(binary: str, provider: str, name: str, root_fd: int) -> UsdtFile:
    """Open `binary` inside the root (as uprobes do) and find provider:name among its notes.
    The fd stays open (attach through its /proc/self/fd path, then close it). Errors name
    the binary as the probe wrote it, never where the agent found it."""
    try:
        opened = find_binary(binary, root_fd)
    except RootPathError as exc:
        raise BinaryNotFound(str(exc)) from None
    try:
        sites = sites_of(notes_of(opened, binary), provider, name, binary)
    except BaseException:
        os.close(opened.fd)
        raise
    return UsdtFile(opened, tuple(sites))
