"""Who a cgroup belongs to: pod and container names for counters and events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PodIdentity:
    namespace: str
    pod: str
    container: str = ""
    """Empty when the cgroup is the pod's own (pod-level) cgroup or not known yet."""


class Attributor(Protocol):
    def identify(self, cgroup_id: int) -> PodIdentity | None:
        """The pod/container of a cgroup id (the current task's cgroup), if a target's."""
