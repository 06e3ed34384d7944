"""Resolve a uprobe target (binary + symbol) before BCC attaches, with errors a user can act on.

The binary is an absolute path or a library name (`c`, `libc.so.6`), opened inside a root
(a container's, through `rootfs`: the kernel resolves symlinks within it, nothing leads
out). The fd that was checked is the one the loader attaches through. Messages name what
the tenant asked for, never where the agent found it.
"""

from __future__ import annotations

import mmap
import os
import platform
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

from tracekeeper_agent.host.rootfs import (
    OpenedFile,
    RootPathError,
    elf_machine_ok,
    list_dir_in_root,
    open_in_root,
    read_bounded,
    read_header,
)

MAX_ELF_BYTES = 2 << 30
_ARCH_TRIPLETS = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}
_ELF_MACHINES = {"x86_64": 62, "aarch64": 183}
_LIB_DIRS = ("/lib", "/usr/lib", "/lib64", "/usr/lib64", "/usr/local/lib")
_BIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
_LD_CACHE = "/etc/ld.so.cache"
_LD_CACHE_MAGIC = b"glibc-ld.so.cache1.1"

_SHT_SYMTAB, _SHT_DYNSYM = 2, 11
_SHN_UNDEF = 0
_Image = bytes | mmap.mmap  # symbols are read in place from the mapped file


class UprobeTargetError(Exception):
    pass


class BinaryNotFound(UprobeTargetError):
    pass


class NotAnElf(UprobeTargetError):
    pass


class SymbolNotFound(UprobeTargetError):
    pass


class SymbolKind(StrEnum):
    NOTYPE = "notype"
    OBJECT = "object"
    FUNC = "func"
    SECTION = "section"
    FILE = "file"
    COMMON = "common"
    TLS = "tls"
    IFUNC = "ifunc"  # a uprobe on it hits the resolver, not the implementation
    OTHER = "other"


_KINDS = dict(enumerate(list(SymbolKind)[:7])) | {10: SymbolKind.IFUNC}
_ATTACHABLE = frozenset({SymbolKind.FUNC, SymbolKind.IFUNC, SymbolKind.NOTYPE})


@dataclass(frozen=True, slots=True)
class ElfSymbol:
    name: str
    value: int
    size: int
    kind: SymbolKind
    defined: bool  # False: imported from another object (st_shndx == SHN_UNDEF)
    table: str  # ".symtab" or ".dynsym"


@dataclass(frozen=True, slots=True)
class UprobeFile:
    """A checked, open binary and the symbol to probe in it."""

    file: OpenedFile
    symbol: ElfSymbol

    def close(self) -> None:
        os.close(self.file.fd)


# --- finding the binary --------------------------------------------------------------------


def read_ld_cache(data: bytes) -> list[tuple[str, str]]:
    """(soname, path) pairs of a glibc ld.so.cache (the "new" format, glibc >= 2.3)."""
    base = data.find(_LD_CACHE_MAGIC)
    if base < 0 or len(data) < base + 48:
        return []
    nlibs, _len_strings = struct.unpack_from("=II", data, base + 20)
    entries: list[tuple[str, str]] = []
    for i in range(nlibs):
        off = base + 48 + i * 24
        if off + 24 > len(data):
            break
        _flags, key, value = struct.unpack_from("=iII", data, off)
        entries.append((_cstring(data, base + key), _cstring(data, base + value)))
    return entries


def _cstring(data: bytes, offset: int) -> str:
    end = data.find(b"\0", offset)
    return os.fsdecode(data[offset : end if end >= 0 else len(data)])


def find_binary(binary: str, root_fd: int) -> OpenedFile:
    """Open `binary` inside the root: an absolute path, or a library (`c`, `libc.so.6`), or
    failing that an executable in the usual bin directories. The caller closes the fd."""
    if "/" in binary:
        return open_in_root(root_fd, binary)
    if not binary or binary in (".", ".."):
        raise BinaryNotFound(f"binary name {binary!r} is empty")
    searched: list[str] = []
    machine = _ELF_MACHINES.get(platform.machine())
    for candidate in _name_candidates(binary, root_fd, searched):
        try:
            opened = open_in_root(root_fd, candidate)
        except RootPathError:
            continue
        if elf_machine_ok(read_header(opened.fd, 20), machine):
            return opened
        os.close(opened.fd)
    raise BinaryNotFound(
        f"no library or executable {binary!r} in the container; searched {', '.join(searched)}"
    )


def _name_candidates(name: str, root_fd: int, searched: list[str]) -> Iterator[str]:
    triplet = _ARCH_TRIPLETS.get(platform.machine())
    lib_dirs = [*_LIB_DIRS, *(f"{d}/{triplet}" for d in ("/lib", "/usr/lib") if triplet)]
    soname = name if ".so" in name else None
    prefix = f"lib{name}.so"

    def wanted(filename: str) -> bool:
        if soname is not None:
            return filename == soname
        return filename == prefix or filename.startswith(prefix + ".")

    searched.append(_LD_CACHE)
    try:
        opened = open_in_root(root_fd, _LD_CACHE)
    except RootPathError:
        cache = b""
    else:
        try:
            cache = read_bounded(opened.fd)
        finally:
            os.close(opened.fd)
    for key, path in read_ld_cache(cache):
        if wanted(key) and path.startswith("/"):
            yield path
    for directory in lib_dirs:
        searched.append(directory)
        yield from (f"{directory}/{n}" for n in list_dir_in_root(root_fd, directory) if wanted(n))
    for directory in _BIN_DIRS:
        searched.append(directory)
        yield f"{directory}/{name}"


# --- ELF symbols ---------------------------------------------------------------------------


def fd_symbols(fd: int, label: str) -> Iterator[ElfSymbol]:
    """The symbols of an open ELF64 file, read in place (mapped, never read whole)."""
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as data:
            yield from _symbols(data, label)
    except ValueError as exc:  # mmap of an empty file
        raise NotAnElf(f"{label} is not an ELF file ({exc})") from None


def _symbols(data: _Image, path: str) -> Iterator[ElfSymbol]:
    if data[:4] != b"\x7fELF":
        raise NotAnElf(f"{path} is not an ELF file")
    if data[4] != 2:
        raise NotAnElf(f"{path} is a 32-bit ELF file; only ELF64 is supported")
    order = "<" if data[5] == 1 else ">"
    try:
        shoff, shentsize, shnum = _section_table(data, order)
        sections = [
            struct.unpack_from(order + "IIQQQQIIQQ", data, shoff + i * shentsize)
            for i in range(shnum)
        ]
        for sh_type, table in ((_SHT_SYMTAB, ".symtab"), (_SHT_DYNSYM, ".dynsym")):
            for sec in sections:
                if sec[1] == sh_type:
                    strtab = sections[sec[6]]
                    yield from _table(data, order, sec, strtab, table)
    except (struct.error, IndexError):
        raise NotAnElf(f"{path} is a truncated or corrupt ELF file") from None


def _section_table(data: _Image, order: str) -> tuple[int, int, int]:
    (shoff,) = struct.unpack_from(order + "Q", data, 0x28)
    shentsize, shnum = struct.unpack_from(order + "HH", data, 0x3A)
    if shnum == 0 and shoff:  # extended numbering: the count lives in section 0
        shnum = struct.unpack_from(order + "Q", data, shoff + 0x20)[0]
    return shoff, shentsize, shnum


def _table(
    data: _Image,
    order: str,
    sec: tuple[int, ...],
    strtab: tuple[int, ...],
    table: str,
) -> Iterator[ElfSymbol]:
    offset, size, entsize = sec[4], sec[5], sec[9] or 24
    str_off, str_size = strtab[4], strtab[5]
    for pos in range(offset, offset + size - entsize + 1, entsize):
        st_name, st_info, _other, shndx, value, sym_size = struct.unpack_from(
            order + "IBBHQQ", data, pos
        )
        if st_name == 0 or st_name >= str_size:
            continue
        start = str_off + st_name
        end = data.find(b"\0", start, str_off + str_size)
        name = os.fsdecode(data[start : end if end >= 0 else str_off + str_size])
        kind = _KINDS.get(st_info & 0xF, SymbolKind.OTHER)
        yield ElfSymbol(name, value, sym_size, kind, shndx != _SHN_UNDEF, table)


def find_symbol_in(symbols: Iterator[ElfSymbol], symbol: str, path: str) -> ElfSymbol:
    imported = False
    for sym in symbols:
        if sym.name != symbol:
            continue
        if sym.defined:
            return sym
        imported = True
    if imported:
        raise SymbolNotFound(
            f"symbol {symbol!r} is imported by {path}, not defined there: "
            "probe the library that defines it"
        )
    raise SymbolNotFound(f"symbol {symbol!r} not found in {path} (.symtab and .dynsym)")


def resolve_uprobe(binary: str, symbol: str, root_fd: int) -> UprobeFile:
    """Check a uprobe target inside a root: open the binary, then find its symbol. The
    returned fd stays open (attach through its /proc/self/fd path, then close it). Errors
    name only `binary` and `symbol`, never where the agent found the file."""
    try:
        opened = find_binary(binary, root_fd)
    except RootPathError as exc:
        raise BinaryNotFound(str(exc)) from None
    try:
        sym = symbol_of(opened, symbol, binary)
    except BaseException:
        os.close(opened.fd)
        raise
    return UprobeFile(opened, sym)


_SYMBOL_CACHE: dict[tuple[int, int, int, int, str], ElfSymbol | SymbolNotFound] = {}
_SYMBOL_CACHE_SIZE = 512


def symbol_of(opened: OpenedFile, symbol: str, label: str) -> ElfSymbol:
    """The attachable symbol `symbol` of an opened file, remembered by file identity: an
    ELF scan of a large library (libLLVM) takes a tenth of a second or more."""
    key = (opened.dev, opened.ino, opened.size, opened.change, symbol)
    cached = _SYMBOL_CACHE.get(key)
    if cached is None:
        try:
            cached = _find_attachable(opened, symbol, label)
        except SymbolNotFound as exc:
            cached = exc
        if len(_SYMBOL_CACHE) >= _SYMBOL_CACHE_SIZE:
            _SYMBOL_CACHE.pop(next(iter(_SYMBOL_CACHE)))
        _SYMBOL_CACHE[key] = cached
    if isinstance(cached, SymbolNotFound):
        raise SymbolNotFound(str(cached))
    return cached


def _find_attachable(opened: OpenedFile, symbol: str, label: str) -> ElfSymbol:
    if opened.size > MAX_ELF_BYTES:
        raise NotAnElf(f"{label} is larger than {MAX_ELF_BYTES >> 20} MiB")
    sym = find_symbol_in(fd_symbols(opened.fd, label), symbol, label)
    if sym.kind not in _ATTACHABLE:
        raise SymbolNotFound(f"symbol {symbol!r} in {label} is a {sym.kind}, not a function")
    return sym
