"""The root filesystems a probe's targets see, for uprobes to resolve files in."""

from __future__ import annotations

from pathlib import Path

from tracekeeper_agent.host.rootfs import cgroup_pids, open_process_root, open_root
from tracekeeper_agent.ports import TargetRoot
from tracekeeper_agent.targets.node import NodeCgroups
from tracekeeper_agent.targets.resolution import container_cgroup_dirs
from tracekeeper_api.protocol import ProbeTargets


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
