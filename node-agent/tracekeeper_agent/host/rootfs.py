"""Open files inside a container's root filesystem, through one fd chain.

Paths come from tenants (a uprobe's `binary`) and are resolved by the kernel with
openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS) below a dirfd of the container's root
(`/proc/<pid>/root` of a process of that container): absolute symlinks and `..` stay
inside the root, /proc magic links are refused, and what is opened is checked (a regular
file, not on a kernel pseudo filesystem) on the fd itself, so that nothing can be swapped
between the check and its use. Callers keep the fd and hand `/proc/self/fd/N` on.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(platform.machine(), 437)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

REFUSED_PREFIXES = ("/proc", "/sys", "/dev")
"""Kernel interfaces, not binaries: refused however they are spelled."""
# Filesystems whose files are kernel interfaces (statfs f_type), refused even when a
# symlink inside the container leads there.
_PSEUDO_FS = frozenset(
    {
        0x9FA0,  # proc
        0x62656572,  # sysfs
        0x64626720,  # debugfs
        0x74726163,  # tracefs
        0x63677270,  # cgroup2
        0x27E0EB,  # cgroup
        0xCAFE4A11,  # bpffs
        0x73636673,  # securityfs
        0x1373,  # devtmpfs / devfs
    }
)
MAX_SMALL_FILE = 8 * 1024 * 1024
"""Bound of whole-file reads (ld.so.cache is ~100 KiB on a large distribution)."""


class RootPathError(Exception):
    """A path that cannot be opened in the root; the message names only the request."""


class PathRefused(RootPathError):
    pass


class NotFoundInRoot(RootPathError):
    pass


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_Statfs)]


def _openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    how = _OpenHow(flags=flags, mode=0, resolve=resolve)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def fs_magic(fd: int) -> int:
    buf = _Statfs()
    if _libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(buf.f_type) & 0xFFFFFFFF


def check_request(path: str) -> PurePosixPath:
    """A path a tenant may ask for: absolute, without `..`, not below /proc, /sys, /dev."""
    requested = PurePosixPath(path)
    if not requested.is_absolute():
        raise NotFoundInRoot(f"binary path {path!r} must be absolute")
    if ".." in requested.parts:
        raise PathRefused(f"binary path {path!r} contains '..'")
    normal = "/" + "/".join(p for p in requested.parts[1:] if p not in ("", "."))
    for prefix in REFUSED_PREFIXES:
        if normal == prefix or normal.startswith(prefix + "/"):
            raise PathRefused(f"binary path {path!r} is below {prefix}, which is refused")
    return PurePosixPath(normal)


@dataclass(frozen=True)
class OpenedFile:
    """A checked regular file inside a root; the caller closes `fd`."""

    fd: int
    dev: int
    ino: int
    size: int
    change: int
    """st_ctime_ns: changes with the content (cache keys)."""

    @property
    def identity(self) -> tuple[int, int]:
        return (self.dev, self.ino)

    @property
    def proc_path(self) -> str:
        """The path naming exactly this open file, for APIs that take a path (BCC)."""
        return f"/proc/self/fd/{self.fd}"


def _explain(exc: OSError, path: str) -> RootPathError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return NotFoundInRoot(f"{path} does not exist in the container")
    if exc.errno == errno.ELOOP:
        return PathRefused(f"{path}: too many symbolic links, or a /proc magic link")
    if exc.errno == errno.EXDEV:
        return PathRefused(f"{path} leads out of the container's root")
    if exc.errno == errno.ENOSYS:
        return RootPathError("this kernel has no openat2 (Linux >= 5.6 is needed)")
    return NotFoundInRoot(f"{path} cannot be opened in the container ({exc.strerror})")


def open_in_root(root_fd: int, path: str) -> OpenedFile:
    """Open `path` as the container sees it, read-only, checked on the fd: a regular file
    outside the kernel's pseudo filesystems. `path` goes through check_request first."""
    check_request(path)
    try:
        fd = _openat2(root_fd, path, _FILE_FLAGS, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    except OSError as exc:
        raise _explain(exc, path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotFoundInRoot(f"{path} is not a regular file")
        if fs_magic(fd) in _PSEUDO_FS:
            raise PathRefused(f"{path} is a kernel interface file, which is refused")
    except BaseException:
        os.close(fd)
        raise
    return OpenedFile(fd, st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns)


def list_dir_in_root(root_fd: int, path: str) -> list[str]:
    """Names in a directory of the root (empty when it is missing)."""
    try:
        fd = _openat2(root_fd, path, _DIR_FLAGS, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    except OSError:
        return []
    try:
        if fs_magic(fd) in _PSEUDO_FS:
            return []
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


def read_bounded(fd: int, limit: int = MAX_SMALL_FILE) -> bytes:
    """The file's first `limit` bytes (pread: the fd's offset is left alone)."""
    chunks: list[bytes] = []
    offset = 0
    while offset < limit:
        chunk = os.pread(fd, min(65536, limit - offset), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def read_header(fd: int, size: int) -> bytes:
    return os.pread(fd, size, 0)


def open_root(path: Path | str) -> int:
    """A dirfd of a root directory (the host's `/` in standalone mode, tests' trees)."""
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def open_process_root(pid: int, cgroup_dir: Path, *, proc: Path = Path("/proc")) -> int | None:
    """A dirfd of the root of process `pid`, if it is (still) in `cgroup_dir`: the /proc
    directory is opened first and pins the process, then its membership is checked, so a
    reused pid cannot hand over another process's root. None when it is gone."""
    try:
        proc_fd = os.open(proc / str(pid), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        root_fd = os.open("root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=proc_fd)
    except OSError:
        os.close(proc_fd)
        return None
    os.close(proc_fd)
    if pid not in cgroup_pids(cgroup_dir):
        os.close(root_fd)
        return None
    return root_fd


def cgroup_pids(cgroup_dir: Path, limit: int = 1 << 20) -> list[int]:
    """The pids of a cgroup (its cgroup.procs, bounded), ascending."""
    try:
        with open(cgroup_dir / "cgroup.procs", "rb") as f:
            data = f.read(limit)
    except OSError:
        return []
    return sorted(int(x) for x in data.split() if x.isdigit())


def elf_machine_ok(header: bytes, machine: int | None) -> bool:
    if len(header) < 20 or header[:4] != b"\x7fELF" or header[4] != 2:
        return False
    order = "<" if header[5] == 1 else ">"
    return machine is None or struct.unpack_from(order + "H", header, 18)[0] == machine
