"""Whom a probe traces on this node: ProbeTargets -> the entries of its filter maps.

The operator sends pod UIDs and container IDs; cgroup ids and PIDs are node-local facts
resolved here. A target whose cgroup does not exist yet is pending: the cgroup watcher
reports the directory when it appears and the reconciler resolves the probe again, so a
pod-level entry is in the map before the pod's first container runs.

Never "everything" by omission: entries that resolve to nothing leave the maps empty, and an
empty cgroup/pid map matches no process (only `host_wide` traces without them).
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

from tracekeeper_agent.host.rootfs import cgroup_pids, open_process_root, open_root
from tracekeeper_agent.identity import PodIdentity
from tracekeeper_agent.ports import FilterEntries
from tracekeeper_agent.programs.kinds.context import TargetRoot
from tracekeeper_agent.targets.cgroup_watch import CgroupEvent, CgroupEventKind, CgroupWatcher
from tracekeeper_agent.targets.cgroups import (
    CgroupError,
    CgroupIndex,
    CgroupOwner,
    parse_cgroup_path,
    split_container_id,
)
from tracekeeper_api.protocol import ProbeAssignment, ProbeTargets

BINDING = 1
"""The map value of every entry: one filter per program until shared probes (several
bindings per program) arrive."""

MAX_PENDING_LISTED = 5
"""Pending targets named in an outcome message; the rest are counted."""


class CgroupLookup(Protocol):
    """This node's cgroup facts, as the resolver needs them (a CgroupIndex in the agent)."""

    def pod_cgroup_id(self, pod_uid: str) -> int | None: ...

    def container_cgroup_id(self, pod_uid: str, container_id: str) -> int | None: ...

    def pod_container_ids(self, pod_uid: str) -> frozenset[str]:
        """Bare ids of the pod's containers that have a cgroup now."""

    def path_cgroup_id(self, path: str) -> int | None:
        """The id of a cgroup given by its path below the v2 root (`/system.slice/x`)."""

    def owner(self, cgroup_id: int) -> CgroupOwner | None: ...


class ProcessTable(Protocol):
    def descendants(self, pids: Iterable[int]) -> frozenset[int]:
        """Every live process forked (transitively) from `pids`, not including them."""


@dataclass(frozen=True)
class Resolution:
    """A probe's targets as resolved on this node at one moment."""

    entries: FilterEntries = field(default_factory=FilterEntries)
    pods: int = 0
    """Pod targets with at least one cgroup entry."""
    containers: int = 0
    """Container cgroups covered (by a pod-level entry or their own)."""
    pending: tuple[str, ...] = ()
    """Targets without a cgroup yet, described for the outcome message."""

    def pending_message(self) -> str:
        if not self.pending:
            return ""
        listed = ", ".join(self.pending[:MAX_PENDING_LISTED])
        more = len(self.pending) - MAX_PENDING_LISTED
        suffix = f" and {more} more" if more > 0 else ""
        return f"waiting for the cgroups of {listed}{suffix}"


def resolve_targets(
    targets: ProbeTargets, cgroups: CgroupLookup, processes: ProcessTable | None = None
) -> Resolution:
    """The filter entries for `targets` now. Pure given the lookups (no kernel access)."""
    cgroup_ids: dict[int, int] = {}
    pending: list[str] = []
    pods = containers = 0
    for pod in targets.pods:
        where = f"{pod.namespace}/{pod.name}"
        if pod.all_containers:
            # The pod-level cgroup is the ancestor of every container, present and future.
            cgid = cgroups.pod_cgroup_id(pod.uid)
            if cgid is None:
                pending.append(f"pod {where}")
                continue
            cgroup_ids[cgid] = BINDING
            pods += 1
            containers += len(cgroups.pod_container_ids(pod.uid))
            continue
        found = 0
        for container in pod.containers:
            label = f"container {where}/{container.name}"
            if container.container_id is None:
                pending.append(f"{label} (not started)")
                continue
            cgid = cgroups.container_cgroup_id(pod.uid, container.container_id)
            if cgid is None:
                pending.append(label)
                continue
            cgroup_ids[cgid] = BINDING
            found += 1
        pods += found > 0
        containers += found
    for path in targets.cgroup_paths:
        cgid = cgroups.path_cgroup_id(path)
        if cgid is None:
            pending.append(f"cgroup {path}")
        else:
            cgroup_ids[cgid] = BINDING
    pids = frozenset(targets.pids)
    if targets.follow_children and pids and processes is not None:
        # Children forked before the program loaded; later ones are the program's to follow.
        pids |= processes.descendants(pids)
    entries = FilterEntries(cgroups=cgroup_ids, pids=pids, comms=frozenset(targets.process_names))
    return Resolution(entries, pods=pods, containers=containers, pending=tuple(pending))


def needs_polling(targets: ProbeTargets, resolution: Resolution) -> bool:
    """Whether the targets can change without a cgroup event under the watched pod trees:
    cgroup paths elsewhere in the hierarchy, forked children, anything still pending."""
    return bool(resolution.pending or targets.cgroup_paths or targets.follow_children)


# --- root filesystems of the targets (uprobe binaries) -------------------------------------


def container_cgroup_dirs(targets: ProbeTargets, index: CgroupIndex) -> list[tuple[str, Path]]:
    """(label, cgroup directory) of every targeted container that has a cgroup now; the
    label names the pod as the tenant does."""
    found: list[tuple[str, Path]] = []
    for pod in targets.pods:
        label = f"pod {pod.namespace}/{pod.name}"
        uid = _norm_uid(pod.uid)
        if pod.all_containers:
            entries = [e for e in index.pod_entries(uid) if e.owner.container_id is not None]
        else:
            entries = []
            for container in pod.containers:
                if container.container_id is None:
                    continue
                try:
                    entry = index.container_cgroup(uid, container.container_id)
                except CgroupError:
                    continue
                if entry is not None:
                    entries.append(entry)
        found.extend((label, e.path) for e in entries)
    return found


class TargetRoots:
    """Opens the roots a probe's targets see: for pods, `/proc/<pid>/root` of a process in
    each targeted container's cgroup (one per container; containers without a process yet
    are skipped); host pids, their own roots; host-wide or cgroup-path probes, the host's.
    """

    def __init__(self, cgroups: NodeCgroups, proc: Path = Path("/proc")) -> None:
        self._cgroups = cgroups
        self._proc = proc

    def __call__(self, targets: ProbeTargets) -> list[TargetRoot]:
        roots: list[TargetRoot] = []
        for label, directory in container_cgroup_dirs(targets, self._cgroups.index):
            for pid in cgroup_pids(directory):
                fd = open_process_root(pid, directory, proc=self._proc)
                if fd is not None:
                    roots.append(TargetRoot(fd, label))
                    break
        for pid in targets.pids:
            try:
                fd = open_root(self._proc / str(pid) / "root")
            except OSError:
                continue
            roots.append(TargetRoot(fd, f"pid {pid}"))
        if targets.host_wide or targets.cgroup_paths:
            roots.append(TargetRoot(open_root("/"), "host"))
        return roots


# --- cgroup changes ------------------------------------------------------------------------


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
        if any(_norm_uid(p.uid) in self.pod_uids for p in targets.pods):
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

    def pod_cgroup_id(self, pod_uid: str) -> int | None:
        entry = self.index.pod_cgroup(_norm_uid(pod_uid))
        return entry.cgroup_id if entry else None

    def container_cgroup_id(self, pod_uid: str, container_id: str) -> int | None:
        try:
            entry = self.index.container_cgroup(_norm_uid(pod_uid), container_id)
        except CgroupError:  # a malformed container id never resolves
            return None
        return entry.cgroup_id if entry else None

    def pod_container_ids(self, pod_uid: str) -> frozenset[str]:
        return frozenset(
            e.owner.container_id
            for e in self.index.pod_entries(_norm_uid(pod_uid))
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

    def owner(self, cgroup_id: int) -> CgroupOwner | None:
        return self.index.owner(cgroup_id)

    def apply_events(self, events: Iterable[CgroupEvent]) -> CgroupChanges:
        """Fold watcher events into the index; say which pods and paths they touched."""
        uids: set[str] = set()
        paths: set[str] = set()
        everything = False
        for event in events:
            if event.kind is CgroupEventKind.OVERFLOW:
                everything = True
                continue
            if event.kind is CgroupEventKind.CREATED:
                entry = self.index.add(event.path, known_id=event.cgroup_id)
                owner = entry.owner if entry else None
            else:
                removed = self.index.remove(event.path)
                owner = removed.owner if removed else None
            if owner is None:
                owner = self._parse(event.path)
            if owner is not None:
                uids.add(_norm_uid(owner.pod_uid))
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


def _norm_uid(uid: str) -> str:
    return uid.lower()


# --- processes -------------------------------------------------------------------------------


class ProcTable:
    """Parent -> children from /proc/<pid>/stat, read on demand."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc

    def descendants(self, pids: Iterable[int]) -> frozenset[int]:
        children = self._children()
        seen: set[int] = set()
        frontier = list(pids)
        while frontier:
            for child in children.get(frontier.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    frontier.append(child)
        return frozenset(seen)

    def _children(self) -> dict[int, list[int]]:
        children: dict[int, list[int]] = {}
        for name in os.listdir(self.proc):
            if not name.isdigit():
                continue
            ppid = parse_ppid(self._read_stat(name))
            if ppid is not None:
                children.setdefault(ppid, []).append(int(name))
        return children

    def _read_stat(self, name: str) -> str:
        try:
            return (self.proc / name / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
            return ""


def parse_ppid(stat_line: str) -> int | None:
    """The parent pid from a /proc/<pid>/stat line; comm may hold spaces and parentheses."""
    _, paren, rest = stat_line.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 2:
        return None
    try:
        return int(fields[1])
    except ValueError:
        return None


# --- attribution -----------------------------------------------------------------------------


class TargetAttributor:
    """The Attributor of the agent: cgroup id -> pod and container names.

    The cgroup index gives the owner (pod uid, container id) of the task's cgroup; the
    targets the operator sent give their names. Cgroups of pods no probe targets are not
    named (None), so nothing is reported about pods outside the desired state.
    """

    def __init__(self, cgroups: CgroupLookup) -> None:
        self._cgroups = cgroups
        self._pods: Mapping[str, tuple[str, str]] = {}
        self._containers: Mapping[tuple[str, str], str] = {}

    def set_targets(self, assignments: Iterable[ProbeAssignment]) -> None:
        pods: dict[str, tuple[str, str]] = {}
        containers: dict[tuple[str, str], str] = {}
        for assignment in assignments:
            for pod in assignment.targets.pods:
                uid = _norm_uid(pod.uid)
                pods[uid] = (pod.namespace, pod.name)
                for c in pod.containers:
                    if c.container_id is None:
                        continue
                    try:
                        _, cid = split_container_id(c.container_id)
                    except CgroupError:
                        continue
                    containers[(uid, cid.lower())] = c.name
        # Swapped whole: readers in other threads see the old or the new tables, never a mix.
        self._pods, self._containers = pods, containers

    def identify(self, cgroup_id: int) -> PodIdentity | None:
        owner = self._cgroups.owner(cgroup_id)
        if owner is None:
            return None
        uid = _norm_uid(owner.pod_uid)
        names = self._pods.get(uid)
        if names is None:
            return None
        container = ""
        if owner.container_id is not None:
            container = self._containers.get((uid, owner.container_id.lower()), "")
        return PodIdentity(namespace=names[0], pod=names[1], container=container)
