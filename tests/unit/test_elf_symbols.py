"""Uprobe target resolution against a fake container root with synthetic ELF files."""

from __future__ import annotations

import os
import platform
import re
import struct
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from tracekeeper_agent.host.elf_symbols import (
    BinaryNotFound,
    ElfSymbol,
    NotAnElf,
    SymbolKind,
    SymbolNotFound,
    UprobeFile,
    UprobeTargetError,
    fd_symbols,
    find_binary,
    find_symbol_in,
    read_ld_cache,
    resolve_uprobe,
)
from tracekeeper_agent.host.rootfs import (
    NotFoundInRoot,
    OpenedFile,
    PathRefused,
    RootPathError,
    open_in_root,
    open_root,
)


def elf_symbols(path: Path) -> Iterator[ElfSymbol]:
    """Every symbol of an ELF64 file's .symtab and .dynsym (in that order)."""
    with path.open("rb") as f:
        yield from fd_symbols(f.fileno(), str(path))


def find_symbol(path: Path, symbol: str) -> ElfSymbol:
    """The defined symbol `symbol` of `path`; SymbolNotFound says why not."""
    return find_symbol_in(elf_symbols(path), symbol, str(path))


MACHINE = {"x86_64": 62, "aarch64": 183}.get(platform.machine(), 62)
TRIPLET = {"aarch64": "aarch64-linux-gnu"}.get(platform.machine(), "x86_64-linux-gnu")
FUNC, OBJECT, IFUNC = 2, 1, 10
GLOBAL = 1

# (name, type, defined, value, size)
Sym = tuple[str, int, bool, int, int]


def build_elf(symtab: list[Sym], dynsym: list[Sym], *, machine: int = MACHINE) -> bytes:
    """A minimal little-endian ELF64 with .dynsym/.dynstr, .symtab/.strtab and .shstrtab."""

    def table(symbols: list[Sym]) -> tuple[bytes, bytes]:
        strings, entries = b"\0", [bytes(24)]
        for name, kind, defined, value, size in symbols:
            entries.append(
                struct.pack(
                    "<IBBHQQ", len(strings), GLOBAL << 4 | kind, 0, 1 if defined else 0, value, size
                )
            )
            strings += name.encode() + b"\0"
        return b"".join(entries), strings

    dyn, dynstr = table(dynsym)
    sym, strtab = table(symtab)
    names = [b"", b".dynsym", b".dynstr", b".symtab", b".strtab", b".shstrtab"]
    shstrtab = b"".join(n + b"\0" for n in names)
    name_offsets = [shstrtab.index(n + b"\0") if n else 0 for n in names]
    blobs = [dyn, dynstr, sym, strtab, shstrtab]
    offset, body, placed = 64, b"", []
    for blob in blobs:
        placed.append((offset + len(body), len(blob)))
        body += blob
    shoff = 64 + len(body)
    # (type, link, entsize) per section after the null one
    layout = [(11, 2, 24), (3, 0, 0), (2, 4, 24), (3, 0, 0), (3, 0, 0)]
    headers = bytes(64)
    for i, ((sh_type, link, entsize), (off, size)) in enumerate(zip(layout, placed, strict=True)):
        headers += struct.pack(
            "<IIQQQQIIQQ", name_offsets[i + 1], sh_type, 0, 0, off, size, link, 0, 8, entsize
        )
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH", ident, 3, machine, 1, 0, 0, shoff, 0, 64, 56, 0, 64, 6, 5
    )
    return ehdr + body + headers


def build_ld_cache(entries: list[tuple[str, str]]) -> bytes:
    header_size, entry_size = 48, 24
    strings = b""
    packed = []
    base = header_size + entry_size * len(entries)
    for key, value in entries:
        key_off = base + len(strings)
        strings += key.encode() + b"\0"
        value_off = base + len(strings)
        strings += value.encode() + b"\0"
        packed.append(struct.pack("=iIIIQ", 0x0303, key_off, value_off, 0, 0))
    header = b"glibc-ld.so.cache1.1" + struct.pack("=II", len(entries), len(strings))
    header += bytes(4) + struct.pack("=I", 0) + bytes(12)
    assert len(header) == header_size
    return header + b"".join(packed) + strings


LIBFOO = build_elf(
    symtab=[("local_helper", FUNC, True, 0x1000, 16)],
    dynsym=[
        ("foo_open", FUNC, True, 0x2000, 64),
        ("foo_table", OBJECT, True, 0x3000, 128),
        ("foo_fast", IFUNC, True, 0x2100, 8),
        ("malloc", FUNC, False, 0, 0),
    ],
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A merged-/usr container root: /lib -> usr/lib, /lib64 -> /usr/lib (absolute)."""
    r = tmp_path / "root"
    libdir = r / "usr" / "lib" / TRIPLET
    libdir.mkdir(parents=True)
    (libdir / "libfoo.so.1").write_bytes(LIBFOO)
    (libdir / "libfoo.so").symlink_to("libfoo.so.1")
    (r / "usr" / "lib32").mkdir()
    (r / "usr" / "lib32" / "libfoo.so.1").write_bytes(b"\x7fELF\x01\x01\x01" + bytes(60))
    (r / "lib").symlink_to("usr/lib")
    (r / "lib64").symlink_to("/usr/lib")
    (r / "usr" / "bin").mkdir()
    (r / "usr" / "bin" / "app").write_bytes(build_elf([("main", FUNC, True, 0x10, 4)], []))
    (r / "bin").symlink_to("usr/bin")
    (r / "etc").mkdir()
    cache = [
        ("libfoo.so.1", "/usr/lib32/libfoo.so.1"),  # 32-bit first: must be skipped
        ("libfoo.so.1", f"/lib/{TRIPLET}/libfoo.so.1"),
    ]
    (r / "etc" / "ld.so.cache").write_bytes(build_ld_cache(cache))
    return r


def test_read_ld_cache() -> None:
    entries = [("libc.so.6", "/lib/x/libc.so.6"), ("libz.so.1", "/lib/x/libz.so.1")]
    assert read_ld_cache(build_ld_cache(entries)) == entries
    # glibc before 2.32 may prepend the old format; offsets count from the new header.
    assert read_ld_cache(b"ld.so-1.7.0" + bytes(13) + build_ld_cache(entries)) == entries
    assert read_ld_cache(b"") == []


def test_symbols_of_synthetic_elf(tmp_path: Path) -> None:
    path = tmp_path / "libfoo.so.1"
    path.write_bytes(LIBFOO)
    symbols = {(s.name, s.table): s for s in elf_symbols(path)}
    assert symbols[("local_helper", ".symtab")].kind is SymbolKind.FUNC
    assert symbols[("foo_open", ".dynsym")].value == 0x2000
    assert symbols[("foo_fast", ".dynsym")].kind is SymbolKind.IFUNC
    assert not symbols[("malloc", ".dynsym")].defined
    assert find_symbol(path, "foo_open").size == 64
    assert find_symbol(path, "local_helper").table == ".symtab"


def test_symbol_errors_name_symbol_and_binary(tmp_path: Path) -> None:
    path = tmp_path / "libfoo.so.1"
    path.write_bytes(LIBFOO)
    with pytest.raises(SymbolNotFound, match=re.escape(f"'nope' not found in {path}")):
        find_symbol(path, "nope")
    with pytest.raises(SymbolNotFound, match="imported by"):
        find_symbol(path, "malloc")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not an ELF"),
        (b"#!/bin/sh\necho hi\n", "not an ELF"),
        (b"\x7fELF\x01\x01\x01" + bytes(60), "32-bit"),
        (LIBFOO[:200], "truncated or corrupt"),
    ],
)
def test_not_an_elf(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "file"
    path.write_bytes(content)
    with pytest.raises(NotAnElf, match=message):
        list(elf_symbols(path))


@pytest.fixture
def root_fd(root: Path) -> Iterator[int]:
    fd = open_root(root)
    yield fd
    os.close(fd)


def found(root: Path, opened: OpenedFile | UprobeFile) -> PurePosixPath:
    """Which file of the tree an fd is (by inode), as a path inside the root."""
    file = opened.file if isinstance(opened, UprobeFile) else opened
    try:
        for path in root.rglob("*"):
            st = path.lstat()
            if (st.st_dev, st.st_ino) == file.identity:
                return PurePosixPath("/", path.relative_to(root))
    finally:
        os.close(file.fd)
    raise AssertionError("the fd is no file of the root")


def test_links_are_followed_inside_the_root(root: Path, root_fd: int) -> None:
    # /lib64 -> /usr/lib is absolute: it must land in the root's /usr/lib, not the host's.
    opened = open_in_root(root_fd, f"/lib64/{TRIPLET}/libfoo.so")
    assert found(root, opened) == PurePosixPath(f"/usr/lib/{TRIPLET}/libfoo.so.1")


def test_absolute_link_cannot_reach_host_files(root: Path, root_fd: int, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(LIBFOO)
    (root / "usr" / "bin" / "abs").symlink_to(outside / "secret")
    with pytest.raises(NotFoundInRoot, match="does not exist in the container"):
        open_in_root(root_fd, "/usr/bin/abs")


def test_relative_link_escaping_stays_in_the_root(root: Path, root_fd: int) -> None:
    (root / "usr" / "bin" / "evil").symlink_to("../../../../../../outside/secret")
    with pytest.raises(NotFoundInRoot, match="does not exist"):
        open_in_root(root_fd, "/usr/bin/evil")
    (root / "usr" / "bin" / "up").symlink_to("../../../../../usr/bin/app")  # clamped at /
    assert found(root, open_in_root(root_fd, "/usr/bin/up")) == PurePosixPath("/usr/bin/app")
    with pytest.raises(PathRefused, match=r"contains '\.\.'"):
        open_in_root(root_fd, "/usr/../../etc/passwd")


@pytest.mark.parametrize(
    "path", ["/proc/1/exe", "/proc", "/sys/kernel/x", "/dev/shm/x", "//dev/./x"]
)
def test_kernel_interfaces_are_refused(root_fd: int, path: str) -> None:
    with pytest.raises(PathRefused, match="refused"):
        open_in_root(root_fd, path)


def test_a_link_to_proc_is_refused(root: Path, root_fd: int) -> None:
    # Resolved inside the root, /proc is this root's: here the host's procfs is not
    # mounted there, so make one that leads to a procfs file through a bind of the tree.
    (root / "usr" / "bin" / "magic").symlink_to("/proc/self/exe")
    with pytest.raises(RootPathError):
        open_in_root(root_fd, "/usr/bin/magic")
    host = open_root("/")
    try:
        (root / "usr" / "bin" / "status").symlink_to("/proc/self/status")
        with pytest.raises(PathRefused, match="kernel interface"):
            # Through the host's root, where /proc is procfs: refused on the fd's filesystem.
            open_in_root(host, f"{root}/usr/bin/status")
    finally:
        os.close(host)


def test_symlink_loop(root: Path, root_fd: int) -> None:
    (root / "usr" / "bin" / "a").symlink_to("b")
    (root / "usr" / "bin" / "b").symlink_to("a")
    with pytest.raises(PathRefused, match="too many symbolic links"):
        open_in_root(root_fd, "/usr/bin/a")


def test_relative_binary_path_refused(root_fd: int) -> None:
    with pytest.raises(NotFoundInRoot, match="absolute"):
        find_binary("bin/app", root_fd)


@pytest.mark.parametrize("name", ["foo", "libfoo.so.1", "libfoo.so"])
def test_library_names(root: Path, root_fd: int, name: str) -> None:
    assert found(root, find_binary(name, root_fd)) == PurePosixPath(
        f"/usr/lib/{TRIPLET}/libfoo.so.1"
    )


def test_library_dirs_without_ld_cache(root: Path, root_fd: int) -> None:
    (root / "etc" / "ld.so.cache").unlink()  # musl images have none
    assert found(root, find_binary("foo", root_fd)) == PurePosixPath(
        f"/usr/lib/{TRIPLET}/libfoo.so.1"
    )


def test_executable_by_name_and_path(root: Path, root_fd: int) -> None:
    assert found(root, find_binary("app", root_fd)) == PurePosixPath("/usr/bin/app")
    assert found(root, find_binary("/bin/app", root_fd)) == PurePosixPath("/usr/bin/app")


def test_not_found_names_what_was_searched(root_fd: int) -> None:
    with pytest.raises(BinaryNotFound, match=r"'bar' in the container; searched /etc/ld.so"):
        find_binary("bar", root_fd)
    with pytest.raises(NotFoundInRoot, match="/opt/app/bin/app does not exist"):
        find_binary("/opt/app/bin/app", root_fd)
    with pytest.raises(NotFoundInRoot, match="not a regular file"):
        find_binary("/usr/bin", root_fd)


def test_resolve_uprobe(root: Path, root_fd: int) -> None:
    target = resolve_uprobe("foo", "foo_open", root_fd)
    assert (target.symbol.name, target.symbol.value) == ("foo_open", 0x2000)
    assert found(root, target) == PurePosixPath(f"/usr/lib/{TRIPLET}/libfoo.so.1")
    fast = resolve_uprobe("foo", "foo_fast", root_fd)
    fast.close()
    assert fast.symbol.kind is SymbolKind.IFUNC
    with pytest.raises(SymbolNotFound, match="is a object, not a function"):
        resolve_uprobe("foo", "foo_table", root_fd)
    with pytest.raises(SymbolNotFound, match=r"'nope' not found in foo "):
        resolve_uprobe("foo", "nope", root_fd)


def test_errors_never_name_a_host_path(root: Path, root_fd: int, tmp_path: Path) -> None:
    (root / "usr" / "bin" / "script").write_bytes(b"#!/bin/sh\n")
    fds_before = len(os.listdir("/proc/self/fd"))
    messages = []
    for binary, symbol in [
        ("/usr/bin/script", "main"),
        ("/usr/bin/app", "nope"),
        ("/opt/x", "main"),
        ("libnope.so.1", "f"),
        ("/proc/self/fd/7", "f"),
        ("foo", "malloc"),
    ]:
        with pytest.raises(UprobeTargetError) as info:
            resolve_uprobe(binary, symbol, root_fd)
        messages.append(str(info.value))
    for message in messages:
        assert str(tmp_path) not in message, message
        assert "/proc/self/fd" not in message.replace("'/proc/self/fd/7'", ""), message
    assert len(os.listdir("/proc/self/fd")) == fds_before  # failed lookups close their fds
