"""TraceFilter: whom to trace. Used by reference (filterRef) or inline in a TraceProbe."""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import ConfigDict, Field, model_validator

from tracekeeper_api.base import SpecModel
from tracekeeper_api.selectors import LabelSelector
from tracekeeper_api.strings import CgroupPath, DnsLabel, ProcessName

# Fields that trace beyond the object's own namespace or outside pods: refused
# outside the privileged namespaces (admission policy, and again by the operator).
PRIVILEGED_FILTER_FIELDS = ("namespaceSelector", "pids", "cgroupPaths", "hostWide")

Pid = Annotated[int, Field(ge=1, le=4_194_304)]  # PID_MAX_LIMIT on 64-bit


class TraceFilterSpec(SpecModel):
    """Whom to trace. Without podSelector, every pod of the object's namespace is traced,
    never the whole host."""

    pod_selector: LabelSelector | None = None
    """Pods to trace, by label, in the object's own namespace (or in the namespaces chosen by
    namespaceSelector, in privileged namespaces only). Omitted: every pod of the namespace."""
    containers: list[DnsLabel] = Field(default_factory=list, max_length=16)
    """Only these containers of the selected pods (by container name). Empty: all containers."""
    process_names: list[ProcessName] = Field(default_factory=list, max_length=16)
    """Only processes with one of these names (comm, at most 15 characters), matched in kernel."""
    namespace_selector: LabelSelector | None = None
    """Privileged: select pods in the namespaces matching this selector."""
    pids: list[Pid] = Field(
        default_factory=list, max_length=64, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """Privileged: host process IDs to trace (on every selected node)."""
    follow_children: bool = False
    """With pids: also trace processes forked by them, while they live."""
    cgroup_paths: list[CgroupPath] = Field(default_factory=list, max_length=16)
    """Privileged: cgroup v2 paths (below the cgroup root) whose processes are traced."""
    host_wide: bool = False
    """Privileged: trace every process on the selected nodes."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.hostWide) && self.hostWide) || (!has(self.podSelector)"
                    " && !has(self.namespaceSelector)"
                    " && (!has(self.pids) || size(self.pids) == 0)"
                    " && (!has(self.cgroupPaths) || size(self.cgroupPaths) == 0))",
                    "message": "hostWide traces every process: it cannot be combined with "
                    "podSelector, namespaceSelector, pids or cgroupPaths",
                },
                {
                    "rule": "!(has(self.followChildren) && self.followChildren)"
                    " || (has(self.pids) && size(self.pids) > 0)",
                    "message": "followChildren needs pids",
                },
            ]
        }
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.host_wide and (
            self.pod_selector or self.namespace_selector or self.pids or self.cgroup_paths
        ):
            raise ValueError(
                "hostWide traces every process: it cannot be combined with "
                "podSelector, namespaceSelector, pids or cgroupPaths"
            )
        if self.follow_children and not self.pids:
            raise ValueError("followChildren needs pids")
        if len(set(self.pids)) != len(self.pids):
            raise ValueError("pids must not repeat")
        return self

    def privileged_fields(self) -> list[str]:
        """The privileged fields this filter sets (empty for a tenant-safe filter)."""
        used = {
            "namespaceSelector": self.namespace_selector is not None,
            "pids": bool(self.pids),
            "cgroupPaths": bool(self.cgroup_paths),
            "hostWide": self.host_wide,
        }
        return [name for name in PRIVILEGED_FILTER_FIELDS if used[name]]

    @property
    def targets_pods(self) -> bool:
        """Whether this filter selects pods (the default), rather than only host targets."""
        return not (self.pids or self.cgroup_paths or self.host_wide) or (
            self.pod_selector is not None or self.namespace_selector is not None
        )
