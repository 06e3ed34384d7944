"""This node's cgroups as the reconciler sees them: the index kept current by the watcher."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tracekeeper_agent.targets.cgroup_watch import CgroupEvent, CgroupEventKind, CgroupWatcher
from tracekeeper_agent.targets.cgroups import (
    CgroupError,
    CgroupIndex,
    CgroupOwner,
    has_processes,
    is_kubepods_name,
    parse_cgroup_path,
)
from tracekeeper_agent.targets.pod_paths import pod_cgroup_paths
from tracekeeper_agent.targets.resolution import norm_uid
from tracekeeper_api.protocol import ProbeTargets


@dataclass(frozen=True)
class CgroupChanges:
    """What a batch of cgroup watcher events touched, to re-resolve only the probes concerned."""

    pod_uids: frozenset[str] = frozenset()
    paths: frozenset[str] = frozenset()
    """Root-relative, with a leading slash, as in `cgroupPaths`."""
    everything: bool = False
    """Events were lost (inotify overflow): re-resolve every probe."""

    def concerns(self, targets: ProbeTargets) -> bool:
        if self.everything:
            return True
        if any(norm_uid(p.uid) in self.pod_uids for p in targets.pods):
            return True
        return any(
            changed == path or changed.startswith(path + "/") or path.startswith(changed + "/")
            for path in targets.cgroup_paths
            for changed in self.paths
        )

    def __bool__(self) -> bool:
        return self.everything or bool(self.pod_uids or self.paths)


class NodeCgroups:
    """The agent's CgroupLookup: a CgroupIndex of the pod trees kept current by the watcher,
    plus direct lookups of arbitrary paths below the v2 root."""

    def __init__(self, index: CgroupIndex) -> None:
        self.index = index
        self.root = index.root
        self._kubepods: tuple[PurePosixPath, ...] | None = None
        """The kubepods directories relative to the root, found again after one is made."""
        self._born: dict[str, float] = {}
        """Pod uid -> when its own cgroup was seen made, while it exists."""

    def pod_cgroup_id(self, pod_uid: str) -> int | None:
        entry = self.index.pod_cgroup(norm_uid(pod_uid))
        return entry.cgroup_id if entry else None

    def container_cgroup_id(self, pod_uid: str, container_id: str) -> int | None:
        try:
            entry = self.index.container_cgroup(norm_uid(pod_uid), container_id)
        except CgroupError:  # a malformed container id never resolves
            return None
        return entry.cgroup_id if entry else None

    def pod_container_ids(self, pod_uid: str) -> frozenset[str]:
        return frozenset(
            e.owner.container_id
            for e in self.index.pod_entries(norm_uid(pod_uid))
            if e.owner.container_id is not None
        )

    def path_cgroup_id(self, path: str) -> int | None:
        # CgroupPath admits no '..' component, so the result stays below the root.
        directory = self.root / path.lstrip("/")
        try:
            st = os.stat(directory, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_ino if stat.S_ISDIR(st.st_mode) else None

    def pod_cgroup_paths(self, pod_uid: str) -> tuple[str, ...]:
        if self._kubepods is None:
            self._kubepods = tuple(
                PurePosixPath(d.relative_to(self.root)) for d in self.index.kubepods_dirs
            )
        return pod_cgroup_paths(norm_uid(pod_uid), self._kubepods)

    def owner(self, cgroup_id: int) -> CgroupOwner | None:
        return self.index.owner(cgroup_id)

    def pod_born_at(self, pod_uid: str) -> float | None:
        return self._born.get(norm_uid(pod_uid))

    def pod_has_processes(self, pod_uid: str) -> bool:
        entry = self.index.pod_cgroup(norm_uid(pod_uid))
        return entry is not None and has_processes(entry.path)

    def apply_events(self, events: Iterable[CgroupEvent]) -> CgroupChanges:
        """Fold watcher events into the index; say which pods and paths they touched."""
        uids: set[str] = set()
        paths: set[str] = set()
        everything = False
        for event in events:
            if event.kind is CgroupEventKind.OVERFLOW:
                everything = True
                self._kubepods = None
                continue
            if is_kubepods_name(event.path.name):
                # Pending pods' paths are under the kubepods directories: derive them again.
                self._kubepods = None
                everything = True
            if event.kind is CgroupEventKind.CREATED:
                entry = self.index.add(event.path, known_id=event.cgroup_id)
                owner = entry.owner if entry else None
                if owner is not None and owner.container_id is None:
                    self._born[norm_uid(owner.pod_uid)] = time.monotonic()
            else:
                removed = self.index.remove(event.path)
                owner = removed.owner if removed else None
                if owner is not None and owner.container_id is None:
                    self._born.pop(norm_uid(owner.pod_uid), None)
            if owner is None:
                owner = self._parse(event.path)
            if owner is not None:
                uids.add(norm_uid(owner.pod_uid))
            paths.add(self._relative(event.path))
        return CgroupChanges(frozenset(uids), frozenset(paths), everything)

    def _relative(self, path: Path) -> str:
        try:
            return "/" + str(PurePosixPath(path.relative_to(self.root)))
        except ValueError:
            return str(path)

    def _parse(self, path: Path) -> CgroupOwner | None:
        try:
            return parse_cgroup_path(path.relative_to(self.root))
        except ValueError:
            return None


async def follow_cgroups(
    watcher: CgroupWatcher,
    cgroups: NodeCgroups,
    on_changes: Callable[[CgroupChanges], Awaitable[object]],
) -> None:
    """Run forever: fold the watcher's events into the index, one batch per wakeup, and
    hand what they touched to `on_changes` (the reconciler's refresh_targets). A burst of
    pod starts is one batch, not one refresh per directory."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    fd = watcher.fileno()
    loop.add_reader(fd, readable.set)
    try:
        while True:
            readable.clear()
            changes = cgroups.apply_events(watcher.read())
            if changes:
                await on_changes(changes)
            await readable.wait()
    finally:
        loop.remove_reader(fd)
