"""Node-local cgroup v2 facts: the root, cgroup ids, and which pod/container owns a cgroup.

A cgroup id is the inode number of its directory on the cgroup2 filesystem; it is what
`bpf_get_current_cgroup_id()` returns, and `bpf_get_current_ancestor_cgroup_id(level)`
takes the directory's depth below the root. Both are only right when `root` is the real
cgroup2 root (the host's, not a cgroup namespace's), which is why the agent runs with the
host cgroup namespace.

Kubelet lays pods out by cgroup driver:

- systemd:  kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/
            cri-containerd-<id>.scope | crio-<id>.scope | docker-<id>.scope
            (guaranteed pods: kubepods.slice/kubepods-pod<uid_>.slice; `_` replaces `-`)
- cgroupfs: kubepods/burstable/pod<uid>/<id>   (CRI-O: crio-<id>)
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath

CGROUP2_SUPER_MAGIC = 0x63677270
DEFAULT_ROOT_CANDIDATES: tuple[Path, ...] = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))


class CgroupError(Exception):
    """A cgroup fact could not be established (no cgroup2 root, bad path, ...)."""


class Runtime(StrEnum):
    CONTAINERD = "containerd"
    CRIO = "cri-o"
    DOCKER = "docker"


@dataclass(frozen=True, slots=True)
class CgroupOwner:
    """Who a cgroup belongs to; container_id is None for the pod-level cgroup."""

    pod_uid: str
    container_id: str | None


@dataclass(frozen=True, slots=True)
class CgroupEntry:
    path: Path
    cgroup_id: int
    level: int
    owner: CgroupOwner


# --- root and ids ------------------------------------------------------------------------


class _Statfs(ctypes.Structure):
    # Only f_type is read; the buffer is padded past the real struct statfs (120 bytes).
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 248)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Statfs)]
_libc.statfs.restype = ctypes.c_int


def filesystem_magic(path: Path | str) -> int:
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return int(buf.f_type) & 0xFFFFFFFF


def is_cgroup2(path: Path | str) -> bool:
    try:
        return filesystem_magic(path) == CGROUP2_SUPER_MAGIC
    except OSError:
        return False


def detect_root(
    override: Path | str | None = None,
    candidates: Sequence[Path] = DEFAULT_ROOT_CANDIDATES,
) -> Path:
    """The cgroup2 root: `override` if given, else the first candidate mounted as cgroup2.

    Hybrid hosts (this build machine) mount v1 controllers at /sys/fs/cgroup and v2 at
    /sys/fs/cgroup/unified; unified hosts mount v2 at /sys/fs/cgroup itself.
    """
    if override is not None:
        path = Path(override)
        if not is_cgroup2(path):
            raise CgroupError(f"cgroup root override {path} is not a cgroup2 mount")
        return path
    for path in candidates:
        if is_cgroup2(path):
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise CgroupError(f"no cgroup2 filesystem mounted at any of: {tried}")


def cgroup_id(path: Path | str) -> int:
    """The cgroup id as BPF sees it: the directory's inode number."""
    return os.stat(path, follow_symlinks=False).st_ino


def cgroup_level(root: Path, path: Path) -> int:
    """Depth below the root (root is 0): the `level` for bpf_get_current_ancestor_cgroup_id."""
    try:
        return len(path.relative_to(root).parts)
    except ValueError:
        raise CgroupError(f"{path} is not below the cgroup root {root}") from None


# --- container ids ------------------------------------------------------

_SCHEMES: dict[str, Runtime] = {
    "containerd": Runtime.CONTAINERD,
    "cri-o": Runtime.CRIO,
    "docker": Runtime.DOCKER,
}
_HEX = re.compile(r"^[0-9a-fA-F]+$")


def split_container_id(raw: str) -> tuple[Runtime | None, str]:
    """`containerd://<hex>` -> (CONTAINERD, hex); a bare id -> (None, id)."""
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "", raw
    if not rest or not _HEX.match(rest):
        raise CgroupError(f"container id {raw!r} is not <runtime>://<hex>")
    if scheme and scheme not in _SCHEMES:
        raise CgroupError(f"container id {raw!r} has an unknown runtime scheme {scheme!r}")
    return (_SCHEMES[scheme] if scheme else None), rest


# --- parsing paths back to owners ---------------------------------------------------------

# systemd slices carry their parents' names as a dash-joined prefix, so a custom
# --cgroup-root (kubelet.slice/kubelet-kubepods.slice/...) only adds a prefix.
_SYSTEMD_KUBEPODS = re.compile(r"^(?:[\w.]+-)*kubepods\.slice$")
_SYSTEMD_POD = re.compile(
    r"^(?:[\w.]+-)*kubepods(?:-(?:burstable|besteffort))?-pod(?P<uid>[0-9a-fA-F_]+)\.slice$"
)
_SYSTEMD_CONTAINER = re.compile(r"^(?:cri-containerd|crio|docker)-(?P<id>[0-9a-fA-F]+)\.scope$")
_CGROUPFS_POD = re.compile(r"^pod(?P<uid>[0-9a-fA-F-]+)$")
_CGROUPFS_CONTAINER = re.compile(r"^(?:crio-|docker-|cri-containerd-)?(?P<id>[0-9a-fA-F]+)$")
_CGROUPFS_QOS = frozenset({"burstable", "besteffort"})


def is_kubepods_name(name: str) -> bool:
    """The top of kubelet's pod tree: `kubepods` (cgroupfs) or `[...-]kubepods.slice`."""
    return name == "kubepods" or bool(_SYSTEMD_KUBEPODS.match(name))


def parse_cgroup_path(path: PurePosixPath | Path | str) -> CgroupOwner | None:
    """Pod and container owning a cgroup path (absolute or root-relative), or None.

    Anything below a container directory belongs to that container; anything else
    below the pod directory (CRI-O's crio-conmon-<id>.scope, for one) to the pod.
    """
    parts = PurePosixPath(path).parts
    for i, name in enumerate(parts):
        pod_uid: str | None = None
        container_re = _CGROUPFS_CONTAINER
        if m := _SYSTEMD_POD.match(name):
            pod_uid = m["uid"].replace("_", "-")
            container_re = _SYSTEMD_CONTAINER
        elif (m := _CGROUPFS_POD.match(name)) and _under_cgroupfs_kubepods(parts, i):
            pod_uid = m["uid"]
        if pod_uid is None:
            continue
        container_id = None
        if i + 1 < len(parts) and (c := container_re.match(parts[i + 1])):
            container_id = c["id"]
        return CgroupOwner(pod_uid, container_id)
    return None


def _under_cgroupfs_kubepods(parts: Sequence[str], i: int) -> bool:
    parent = parts[i - 1] if i >= 1 else ""
    if parent == "kubepods":
        return True
    return parent in _CGROUPFS_QOS and i >= 2 and parts[i - 2] == "kubepods"


# --- finding directories --------------------------------------------------------------------


def find_kubepods_dirs(root: Path, *, max_depth: int = 2) -> list[Path]:
    """kubepods directories within `max_depth` levels of the root (not below one)."""
    found: list[Path] = []
    frontier = [root]
    for _ in range(max_depth):
        below: list[Path] = []
        for directory in frontier:
            for child in _subdirs(directory):
                (found if is_kubepods_name(child.name) else below).append(child)
        frontier = below
    return sorted(found)


def _subdirs(directory: Path) -> list[Path]:
    try:
        with os.scandir(directory) as it:
            return [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def walk_cgroups(top: Path, *, max_depth: int = 8) -> Iterator[Path]:
    """`top` and every cgroup directory below it, parents before children."""
    stack = [(top, 0)]
    while stack:
        directory, depth = stack.pop()
        if not directory.is_dir():
            continue
        yield directory
        if depth < max_depth:
            stack.extend((child, depth + 1) for child in sorted(_subdirs(directory), reverse=True))


def has_processes(top: Path) -> bool:
    """Some process is in `top` or a cgroup below it (cgroup.procs of each; one gone while
    reading holds none)."""
    for directory in walk_cgroups(top):
        try:
            if (directory / "cgroup.procs").read_bytes().strip():
                return True
        except OSError:
            continue
    return False


# --- the index ------------------------------------------------------------------------------


class CgroupIndex:
    """cgroup id -> (pod uid, container id) for every pod cgroup under the kubepods trees.

    Fed by `rescan()` and by the watcher's created/removed events through `add()` and
    `remove()`, which are idempotent so that a scan and events may overlap.
    """

    def __init__(
        self,
        root: Path,
        *,
        kubepods_dirs: Sequence[Path] | None = None,
        max_depth: int = 8,
    ) -> None:
        self.root = root
        self._explicit_kubepods = list(kubepods_dirs) if kubepods_dirs is not None else None
        self._max_depth = max_depth
        self._by_id: dict[int, CgroupEntry] = {}
        self._by_path: dict[Path, CgroupEntry] = {}
        self._by_pod: dict[str, dict[Path, CgroupEntry]] = {}

    @property
    def kubepods_dirs(self) -> list[Path]:
        if self._explicit_kubepods is not None:
            return list(self._explicit_kubepods)
        return find_kubepods_dirs(self.root)

    def rescan(self) -> None:
        """Rebuild from the filesystem."""
        self._by_id.clear()
        self._by_path.clear()
        self._by_pod.clear()
        for top in self.kubepods_dirs:
            for directory in walk_cgroups(top, max_depth=self._max_depth):
                self.add(directory)

    def add(self, path: Path, known_id: int | None = None) -> CgroupEntry | None:
        """Index one directory (`known_id` saves a stat); None when it is not a pod cgroup
        or is already gone."""
        owner = parse_cgroup_path(self._relative(path))
        if owner is None:
            return None
        try:
            cgid = cgroup_id(path) if known_id is None else known_id
        except FileNotFoundError:
            return None
        self.remove(path)
        entry = CgroupEntry(path, cgid, cgroup_level(self.root, path), owner)
        self._by_id[cgid] = entry
        self._by_path[path] = entry
        self._by_pod.setdefault(owner.pod_uid, {})[path] = entry
        return entry

    def remove(self, path: Path) -> CgroupEntry | None:
        entry = self._by_path.pop(path, None)
        if entry is None:
            return None
        if self._by_id.get(entry.cgroup_id) is entry:
            del self._by_id[entry.cgroup_id]
        pod = self._by_pod.get(entry.owner.pod_uid)
        if pod is not None:
            pod.pop(path, None)
            if not pod:
                del self._by_pod[entry.owner.pod_uid]
        return entry

    def by_id(self, cgroup_id: int) -> CgroupEntry | None:
        return self._by_id.get(cgroup_id)

    def owner(self, cgroup_id: int) -> CgroupOwner | None:
        entry = self._by_id.get(cgroup_id)
        return entry.owner if entry else None

    def pod_entries(self, pod_uid: str) -> list[CgroupEntry]:
        """All cgroups of a pod (pod level, containers and anything below), shallowest first."""
        return sorted(self._by_pod.get(pod_uid, {}).values(), key=lambda e: (e.level, e.path))

    def pod_cgroup(self, pod_uid: str) -> CgroupEntry | None:
        """The pod-level cgroup: its id is the ancestor every container of the pod shares."""
        for entry in self.pod_entries(pod_uid):
            if entry.owner.container_id is None:
                return entry
        return None

    def container_cgroup(self, pod_uid: str, container_id: str) -> CgroupEntry | None:
        """The container's own cgroup (`container_id` with or without its runtime scheme)."""
        _, cid = split_container_id(container_id)
        for entry in self.pod_entries(pod_uid):
            if entry.owner.container_id == cid:
                return entry
        return None

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[CgroupEntry]:
        return iter(list(self._by_id.values()))

    def _relative(self, path: Path) -> PurePosixPath:
        try:
            return PurePosixPath(path.relative_to(self.root))
        except ValueError:
            raise CgroupError(f"{path} is not below the cgroup root {self.root}") from None
