"""Resolve a uprobe target (binary + symbol) before BCC attaches, with errors a user can act on.

The binary is an absolute path or a library name (`c`, `libc.so.6`), looked up inside a
container's root (`/proc/<pid>/root`) when one is given. Symlinks are resolved by hand,
component by component, as the container would see them: the kernel would resolve an
absolute link under /proc/<pid>/root against the agent's own root instead. A path that
climbs out of the root is refused; the agent API takes binary paths from tenants.
"""

from __future__ import annotations

import mmap
import os
import platform
import stat
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath

HOST_ROOT = Path("/")
_MAX_SYMLINKS = 40  # as the kernel's MAXSYMLINKS
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


class PathEscapesRoot(UprobeTargetError):
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
class UprobeTarget:
    path: Path  # as the agent opens it (under the container root); give this to BCC
    path_in_root: PurePosixPath  # as the container sees it
    symbol: ElfSymbol


# --- paths ------------------------------------------------------------------------------


def container_root(pid: int, *, proc: Path = Path("/proc")) -> Path:
    """The root filesystem of the container running `pid`, as the agent can reach it."""
    return proc / str(pid) / "root"


def resolve_in_root(root: Path, path: str) -> PurePosixPath:
    """Resolve `path` (absolute, as seen inside `root`) to a symlink-free path inside root.

    Absolute symlinks restart from `root` (not from the agent's /); `..` in the request is
    refused, and a relative link that climbs above `root` raises PathEscapesRoot.
    """
    requested = PurePosixPath(path)
    if not requested.is_absolute():
        raise BinaryNotFound(f"binary path {path!r} must be absolute")
    if ".." in requested.parts:
        raise PathEscapesRoot(f"binary path {path!r} contains '..'")
    pending = deque(requested.parts[1:])
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                raise PathEscapesRoot(f"{path!r} leads out of {root} through a symlink")
            resolved.pop()
            continue
        host = root.joinpath(*resolved, part)
        try:
            st = os.lstat(host)
        except (FileNotFoundError, NotADirectoryError):
            where = "/" + "/".join([*resolved, part])
            raise BinaryNotFound(f"{where} does not exist in {root} (resolving {path})") from None
        if not stat.S_ISLNK(st.st_mode):
            resolved.append(part)
            continue
        hops += 1
        if hops > _MAX_SYMLINKS:
            raise BinaryNotFound(f"too many levels of symbolic links resolving {path} in {root}")
        target = PurePosixPath(os.readlink(host))
        if target.is_absolute():
            resolved = []
            pending.extendleft(reversed(target.parts[1:]))
        else:
            pending.extendleft(reversed(target.parts))
    return PurePosixPath("/", *resolved)


def _host_path(root: Path, inside: PurePosixPath) -> Path:
    return root.joinpath(*inside.parts[1:])


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


def find_binary(binary: str, *, root: Path = HOST_ROOT) -> PurePosixPath:
    """Where `binary` is inside `root`: an absolute path, or a library (`c`, `libc.so.6`),
    or failing that an executable in the usual bin directories."""
    if "/" in binary:
        inside = resolve_in_root(root, binary)
        if not stat.S_ISREG(os.stat(_host_path(root, inside)).st_mode):
            raise BinaryNotFound(f"{binary} in {root} is not a regular file")
        return inside
    if not binary or binary in (".", ".."):
        raise BinaryNotFound(f"binary name {binary!r} is empty")
    searched: list[str] = []
    for candidate in _name_candidates(binary, root, searched):
        try:
            inside = resolve_in_root(root, candidate)
        except BinaryNotFound:
            continue
        if _is_native_elf(_host_path(root, inside)):
            return inside
    raise BinaryNotFound(
        f"no library or executable {binary!r} in {root}; searched {', '.join(searched)}"
    )


def _name_candidates(name: str, root: Path, searched: list[str]) -> Iterator[str]:
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
        cache = _host_path(root, resolve_in_root(root, _LD_CACHE)).read_bytes()
    except (UprobeTargetError, OSError):
        cache = b""
    for key, path in read_ld_cache(cache):
        if wanted(key):
            yield path
    for directory in lib_dirs:
        searched.append(directory)
        try:
            host_dir = _host_path(root, resolve_in_root(root, directory))
            names = sorted(os.listdir(host_dir))
        except (UprobeTargetError, OSError):
            continue
        yield from (f"{directory}/{n}" for n in names if wanted(n))
    for directory in _BIN_DIRS:
        searched.append(directory)
        yield f"{directory}/{name}"


def _is_native_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            header = f.read(20)
    except OSError:
        return False
    machine = _ELF_MACHINES.get(platform.machine())
    if len(header) < 20 or header[:4] != b"\x7fELF" or header[4] != 2:
        return False
    order = "<" if header[5] == 1 else ">"
    return machine is None or struct.unpack_from(order + "H", header, 18)[0] == machine


# --- ELF symbols ---------------------------------------------------------------------------


def elf_symbols(path: Path) -> Iterator[ElfSymbol]:
    """Every symbol of an ELF64 file's .symtab and .dynsym (in that order)."""
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            yield from _symbols(data, path)
    except ValueError as exc:  # mmap of an empty file
        raise NotAnElf(f"{path} is not an ELF file ({exc})") from None


def _symbols(data: _Image, path: Path) -> Iterator[ElfSymbol]:
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


def find_symbol(path: Path, symbol: str) -> ElfSymbol:
    """The defined symbol `symbol` of `path`; SymbolNotFound says why not."""
    imported = False
    for sym in elf_symbols(path):
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


def resolve_uprobe(binary: str, symbol: str, *, root: Path = HOST_ROOT) -> UprobeTarget:
    """Check a uprobe target: find the binary (inside `root`), then its symbol."""
    inside = find_binary(binary, root=root)
    path = _host_path(root, inside)
    sym = find_symbol(path, symbol)
    if sym.kind not in _ATTACHABLE:
        raise SymbolNotFound(f"symbol {symbol!r} in {path} is a {sym.kind}, not a function")
    return UprobeTarget(path, inside, sym)
