"""Whom a probe traces on this node: ProbeTargets -> the entries of its filter maps.

The operator sends pod UIDs and container IDs; cgroup ids and PIDs are node-local facts
resolved here. A target whose cgroup does not exist yet is pending. A whole pod gets its
slot anyway, with the paths kubelet will give it: the kernel claims the directory at mkdir,
before any process runs in it. The cgroup watcher reports the directory too (the fallback
for pods learned after their mkdir) and the reconciler resolves the probe again.

Never "everything" by omission: entries that resolve to nothing leave the maps empty, and an
empty cgroup/pid map matches no process (only `host_wide` traces without them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tracekeeper_agent.ports import FilterEntries, PodEntry
from tracekeeper_agent.targets.cgroups import (
    CgroupError,
    CgroupIndex,
    CgroupOwner,
)
from tracekeeper_api.protocol import ProbeTargets
from tracekeeper_api.text import first_of

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

    def pod_cgroup_paths(self, pod_uid: str) -> tuple[str, ...]:
        """Where kubelet will make the pod's cgroup on this node (targets/pod_paths.py)."""

    def owner(self, cgroup_id: int) -> CgroupOwner | None: ...

    def pod_born_at(self, pod_uid: str) -> float | None:
        """Monotonic time the agent saw the pod's own cgroup made (None: it existed when the
        agent started, or is not there)."""

    def pod_has_processes(self, pod_uid: str) -> bool:
        """Some process is in the pod's cgroup or below it now."""


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
        return f"waiting for the cgroups of {first_of(self.pending, MAX_PENDING_LISTED)}"


def resolve_targets(
    targets: ProbeTargets, cgroups: CgroupLookup, processes: ProcessTable | None = None
) -> Resolution:
    """The filter entries for `targets` now. Pure given the lookups (no kernel access)."""
    cgroup_ids: set[int] = set()
    whole_pods: set[PodEntry] = set()
    pending: list[str] = []
    pods = containers = 0
    for pod in targets.pods:
        where = f"{pod.namespace}/{pod.name}"
        if pod.all_containers:
            # The pod-level cgroup is the ancestor of every container, present and future.
            uid = norm_uid(pod.uid)
            cgid = cgroups.pod_cgroup_id(uid)
            if cgid is None:
                # Pending: the kernel claims its cgroup at mkdir (programs/cgroup_claims.c).
                whole_pods.add(PodEntry(uid, None, cgroups.pod_cgroup_paths(uid)))
                pending.append(f"pod {where}")
                continue
            whole_pods.add(PodEntry(uid, cgid))
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
            cgroup_ids.add(cgid)
            found += 1
        pods += found > 0
        containers += found
    for path in targets.cgroup_paths:
        cgid = cgroups.path_cgroup_id(path)
        if cgid is None:
            pending.append(f"cgroup {path}")
        else:
            cgroup_ids.add(cgid)
    pids = frozenset(targets.pids)
    if targets.follow_children and pids and processes is not None:
        # Children forked before the program loaded; later ones are the program's to follow.
        pids |= processes.descendants(pids)
    entries = FilterEntries(
        cgroups=frozenset(cgroup_ids),
        pids=pids,
        comms=frozenset(targets.process_names),
        pods=frozenset(whole_pods),
    )
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
        uid = norm_uid(pod.uid)
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


def norm_uid(uid: str) -> str:
    return uid.lower()
