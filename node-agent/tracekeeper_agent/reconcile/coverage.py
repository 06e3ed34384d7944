"""Whether a new pod was covered before its first process: the container-start race, as
it went on this node (issue 13).

A pod counts when the agent saw its own cgroup made while a binding targeting it already
ran (a pod that is older than every probe now targeting it never raced anything). When the
agent writes its identity entry the pod is covered *before its first process* (none in its
cgroup yet: nothing was missed) or *after* it (some calls of its first processes were not
seen). Pods the kernel claimed at mkdir are not counted here: the claims counter has them,
and they are covered before any process by construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tracekeeper_agent.ports import FilterEntries, IdentityMap
from tracekeeper_agent.targets.resolution import CgroupLookup


@dataclass
class PodCoverage:
    """Counts, since the agent started, of new pods covered by the agent's own write."""

    before_first_process: int = 0
    after_first_process: int = 0

    def note(
        self,
        bindings: Iterable[tuple[FilterEntries, float]],
        written: Mapping[int, int],
        cgroups: CgroupLookup,
        identities: IdentityMap,
    ) -> None:
        """`bindings`: each binding's entries and when it was bound (monotonic), before the
        identity entries of these bindings are written; `written`: the agent's entries so
        far (a pod whose cgroup id is among them was counted already)."""
        oldest: dict[int, tuple[str, float]] = {}
        for entries, bound_at in bindings:
            for pod in entries.pods:
                if pod.cgroup_id is None or pod.cgroup_id in written:
                    continue
                seen = oldest.get(pod.cgroup_id)
                if seen is None or bound_at < seen[1]:
                    oldest[pod.cgroup_id] = (pod.uid, bound_at)
        racing = {
            cgid: uid
            for cgid, (uid, bound_at) in oldest.items()
            if (born := cgroups.pod_born_at(uid)) is not None and bound_at <= born
        }
        if not racing:
            return
        claimed = identities.held(racing.keys())
        for cgid, uid in racing.items():
            if cgid in claimed:
                continue
            if cgroups.pod_has_processes(uid):
                self.after_first_process += 1
            else:
                self.before_first_process += 1
