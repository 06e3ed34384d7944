"""Watch the cgroup tree with inotify: cgroup directories created and removed, as they happen.

The agent inserts a pod's filter entry the moment its pod-level cgroup appears (before the
first container runs in it) and attributes the cgroups of restarted containers, without
runtime hooks. Only the kubepods subtrees (plus what the caller names) are watched
recursively, and the number of watches is capped: a host's whole cgroup tree can be large.

Use: `start()`, then seed state from `snapshot()` (or a `CgroupIndex.rescan()`), then consume
`read()` or `events()`. Events may repeat what the seed already holds: apply them
idempotently. After an inotify queue overflow the watcher resyncs itself and reports the
differences, preceded by an OVERFLOW event.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from tracekeeper_agent.targets.cgroups import find_kubepods_dirs, is_kubepods_name

log = logging.getLogger(__name__)

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000

_WATCH_MASK = IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW
_EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len
DEFAULT_MAX_WATCHES = 16384

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_init1.restype = ctypes.c_int
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_add_watch.restype = ctypes.c_int
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.inotify_rm_watch.restype = ctypes.c_int


class CgroupEventKind(StrEnum):
    CREATED = "created"
    REMOVED = "removed"
    OVERFLOW = "overflow"  # the kernel dropped events; the diffs of a resync follow


@dataclass(frozen=True, slots=True)
class CgroupEvent:
    kind: CgroupEventKind
    path: Path
    cgroup_id: int  # 0 for OVERFLOW


class CgroupWatcher:
    """Recursive inotify watch over cgroup subtrees, non-blocking, asyncio-friendly.

    `subtrees` default to the kubepods directories present at start. With `watch_root`, the
    root itself is watched (not recursively) so that a kubepods directory created later
    becomes a subtree too, and so is each subtree's parent, so that one removed and made
    again (deeper than the root) is watched again.
    """

    def __init__(
        self,
        root: Path,
        *,
        subtrees: Sequence[Path] | None = None,
        watch_root: bool = True,
        max_watches: int = DEFAULT_MAX_WATCHES,
    ) -> None:
        self.root = root
        self._requested = list(subtrees) if subtrees is not None else None
        self._watch_root = watch_root
        self.max_watches = max_watches
        self.subtrees: list[Path] = []
        self.dropped_watches = 0  # directories seen but not watched (cap or kernel limit)
        self.overflows = 0
        self._fd = -1
        self._wd_path: dict[int, Path] = {}
        self._wd_recursive: dict[int, bool] = {}
        self._path_wd: dict[Path, int] = {}
        self._known: dict[Path, int] = {}  # every directory seen below a subtree -> cgroup id
        self._pending: list[CgroupEvent] = []

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._fd >= 0:
            return
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd
        if self._watch_root:
            self._add_watch(self.root, recursive=False)
        if self._requested is None:
            self._requested = find_kubepods_dirs(self.root)
        for top in self._requested:
            if self._watch_root and top.parent != self.root:
                # Shallow, as the root: a tree removed and made again there is seen again.
                self._add_watch(top.parent, recursive=False)
            self._add_subtree(top, report=False)
        self._pending.clear()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._wd_path.clear()
        self._wd_recursive.clear()
        self._path_wd.clear()

    def __enter__(self) -> CgroupWatcher:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("watcher is not started")
        return self._fd

    @property
    def watch_count(self) -> int:
        return len(self._wd_path)

    def snapshot(self) -> dict[Path, int]:
        """Every cgroup directory currently known below the subtrees -> its cgroup id."""
        return dict(self._known)

    # --- consuming -----------------------------------------------------------------------

    def read(self) -> list[CgroupEvent]:
        """Everything that happened since the last call; never blocks."""
        while True:
            try:
                data = os.read(self.fileno(), 65536)
            except BlockingIOError:
                break
            self._handle(data)
        out, self._pending = self._pending, []
        return out

    async def events(self) -> AsyncIterator[CgroupEvent]:
        """Async iterator over events, woken by the event loop when the fd is readable."""
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(self.fileno(), readable.set)
        try:
            while True:
                readable.clear()
                for event in self.read():
                    yield event
                await readable.wait()
        finally:
            if self._fd >= 0:
                loop.remove_reader(self._fd)

    # --- internals -----------------------------------------------------------------------

    def _handle(self, data: bytes) -> None:
        offset = 0
        while offset + _EVENT_HEADER.size <= len(data):
            wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
            start = offset + _EVENT_HEADER.size
            name = os.fsdecode(data[start : start + length].rstrip(b"\0"))
            offset = start + length
            if mask & IN_Q_OVERFLOW:
                self.overflows += 1
                log.warning("inotify queue overflowed on the cgroup tree: rescanning")
                self._pending.append(CgroupEvent(CgroupEventKind.OVERFLOW, self.root, 0))
                self.resync()
                continue
            directory = self._wd_path.get(wd)
            if directory is None:
                continue
            if mask & IN_IGNORED:
                self._forget_watch(wd)
            elif mask & IN_DELETE_SELF:
                self._removed(directory)
            elif mask & IN_ISDIR and mask & IN_DELETE:
                self._removed(directory / name)
            elif mask & IN_ISDIR and mask & IN_CREATE and self._wants(wd, name):
                self._add_subtree(directory / name, report=True)

    def _wants(self, wd: int, name: str) -> bool:
        # On the (non-recursive) root and parent watches only a kubepods directory counts.
        return self._wd_recursive.get(wd, False) or is_kubepods_name(name)

    def _add_subtree(self, top: Path, *, report: bool) -> None:
        """Watch `top` and everything below it. The watch goes on before the listing, so a
        child created in between is seen by one or the other (the `_known` map dedupes)."""
        if top not in self.subtrees and not any(top.is_relative_to(s) for s in self.subtrees):
            self.subtrees.append(top)
        stack = [top]
        while stack:
            directory = stack.pop()
            try:
                cgid = os.stat(directory, follow_symlinks=False).st_ino
            except FileNotFoundError:
                continue  # already gone again; its IN_DELETE (if any) finds nothing known
            previous = self._known.get(directory)
            if previous != cgid:
                if previous is not None and report:
                    self._pending.append(CgroupEvent(CgroupEventKind.REMOVED, directory, previous))
                self._known[directory] = cgid
                if report:
                    self._pending.append(CgroupEvent(CgroupEventKind.CREATED, directory, cgid))
            if not self._add_watch(directory, recursive=True):
                continue
            try:
                with os.scandir(directory) as it:
                    children = [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
            except FileNotFoundError:
                continue
            stack.extend(children)

    def _add_watch(self, directory: Path, *, recursive: bool) -> bool:
        if directory in self._path_wd:
            self._wd_recursive[self._path_wd[directory]] |= recursive
            return True
        if len(self._wd_path) >= self.max_watches:
            self._drop(directory, f"the cap of {self.max_watches} watches")
            return False
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(directory), _WATCH_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR):
                return False
            if err == errno.ENOSPC:
                self._drop(directory, "fs.inotify.max_user_watches")
                return False
            raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")
        self._wd_path[wd] = directory
        self._wd_recursive[wd] = recursive
        self._path_wd[directory] = wd
        return True

    def _drop(self, directory: Path, limit: str) -> None:
        if self.dropped_watches == 0:
            log.warning("not watching %s and below: reached %s", directory, limit)
        self.dropped_watches += 1

    def _forget_watch(self, wd: int) -> None:
        path = self._wd_path.pop(wd, None)
        self._wd_recursive.pop(wd, None)
        if path is not None and self._path_wd.get(path) == wd:
            del self._path_wd[path]

    def _removed(self, path: Path) -> None:
        # cgroupfs (kernfs) sends no IN_IGNORED for a removed directory: its watch would stay
        # (one per pod ever seen, until the cap) and shadow a directory made again there.
        wd = self._path_wd.pop(path, None)
        if wd is not None:
            self._wd_path.pop(wd, None)
            self._wd_recursive.pop(wd, None)
            _libc.inotify_rm_watch(self._fd, wd)  # EINVAL when the kernel already dropped it
        cgid = self._known.pop(path, None)
        if cgid is not None:
            self._pending.append(CgroupEvent(CgroupEventKind.REMOVED, path, cgid))

    def resync(self) -> None:
        """Rescan the subtrees and queue the differences as events (done on a queue
        overflow; a caller may also run it now and then as a safety net)."""
        for path in sorted(self._known, key=lambda p: -len(p.parts)):
            if not path.is_dir():
                self._removed(path)
        if self._watch_root:
            for top in find_kubepods_dirs(self.root, max_depth=1):
                if top not in self.subtrees:
                    self._add_subtree(top, report=True)
        for top in list(self.subtrees):
            self._add_subtree(top, report=True)
