"""The agent's own check that a tenant probe stays in its namespace.

The operator renders only a tenant's own pods and refuses privileged fields; the agent
checks again, so that a compromised or buggy operator (or anyone holding the API token)
cannot widen a tenant probe: privileged fields and pods of other namespaces are refused
for probes outside the privileged namespaces, as a NotPermitted outcome of that probe.
"""

from __future__ import annotations

from tracekeeper_agent.ports import LoadFailure
from tracekeeper_api.protocol import ProbeAssignment

DEFAULT_PRIVILEGED = frozenset({"tracekeeper-system"})
"""As the operator's default: its own namespace."""


def refusal(assignment: ProbeAssignment, privileged: frozenset[str] | None) -> LoadFailure | None:
    """NotPermitted when a probe outside `privileged` uses what it may not; None when it
    may run. `privileged` None trusts every probe (standalone mode: the host's root user
    wrote the file)."""
    namespace = assignment.namespace
    if privileged is None or namespace in privileged:
        return None
    targets, spec = assignment.targets, assignment.spec
    used = [
        name
        for name, present in (
            ("program", spec.program is not None),
            ("allowProgram", assignment.allow_program),
            ("pids", bool(targets.pids)),
            ("cgroupPaths", bool(targets.cgroup_paths)),
            ("hostWide", targets.host_wide),
        )
        if present
    ]
    if spec.filter is not None:
        used.extend(f for f in spec.filter.privileged_fields() if f not in used)
    where = ", ".join(sorted(privileged)) or "(none)"
    if used:
        return LoadFailure(
            "Failed",
            "NotPermitted",
            f"refused by the node agent: privileged field(s) {', '.join(used)} outside "
            f"the privileged namespaces ({where})",
        )
    foreign = sum(1 for pod in targets.pods if pod.namespace != namespace)
    if foreign:
        return LoadFailure(
            "Failed",
            "NotPermitted",
            f"refused by the node agent: {foreign} targeted pod(s) are not in namespace "
            f"{namespace!r}; a probe outside the privileged namespaces ({where}) traces only "
            "its own namespace",
        )
    return None
