"""Cgroup id -> the pod and container names of a target, for counters and events."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tracekeeper_agent.ports import PodIdentity
from tracekeeper_agent.targets.cgroups import (
    CgroupError,
    split_container_id,
)
from tracekeeper_agent.targets.resolution import CgroupLookup, norm_uid
from tracekeeper_api.protocol import ProbeAssignment


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
                uid = norm_uid(pod.uid)
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
        uid = norm_uid(owner.pod_uid)
        names = self._pods.get(uid)
        if names is None:
            return None
        container = ""
        if owner.container_id is not None:
            container = self._containers.get((uid, owner.container_id.lower()), "")
        return PodIdentity(namespace=names[0], pod=names[1], container=container)
