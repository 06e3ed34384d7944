"""`tracekeeper-agent run`: TraceProbe files -> a NodeState for this host, and what it says back."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_api.filters import TraceFilterSpec
from tracekeeper_api.protocol import NodeReport, NodeState, ProbeTargets, spec_hash
from tracekeeper_api.resources import (
    Resource,
    TraceFilter,
    TraceProbe,
    format_errors,
    load_documents,
)

DEFAULT_NAMESPACE = "default"


class StandaloneError(ValueError):
    """A file that standalone mode cannot run; the message names the document and field."""


def host_targets(spec: TraceFilterSpec | None, where: str, prefix: str) -> ProbeTargets:
    """A filter's targets on this host. Pod selection needs Kubernetes: refused, as is a
    filter that selects no host process (it would trace nothing, silently)."""
    if spec is not None:
        for field, used in (
            ("podSelector", spec.pod_selector is not None),
            ("namespaceSelector", spec.namespace_selector is not None),
            ("containers", bool(spec.containers)),
        ):
            if used:
                raise StandaloneError(
                    f"{where}: {prefix}{field} selects Kubernetes pods, which standalone mode "
                    "does not have; trace host processes with pids, cgroupPaths or hostWide"
                )
    if spec is None:
        raise StandaloneError(
            f"{where}: no filter or filterRef; in Kubernetes that traces every pod of the "
            "namespace, on a host set filter.pids, filter.cgroupPaths or filter.hostWide: true"
        )
    if not (spec.pids or spec.cgroup_paths or spec.host_wide):
        raise StandaloneError(
            f"{where}: {prefix.rstrip('.')} selects no host process; set pids, cgroupPaths or "
            "hostWide: true (processNames only narrow those down)"
        )
    return ProbeTargets(
        pids=spec.pids,
        follow_children=spec.follow_children,
        cgroup_paths=spec.cgroup_paths,
        process_names=spec.process_names,
        host_wide=spec.host_wide,
    )


def standalone_state(resources: Sequence[Resource], *, node: str, source: str) -> NodeState:
    """TraceProbes of one file as a NodeState for this host, filterRefs resolved within the
    file (same namespace)."""
    filters = {
        (r.metadata.namespace or DEFAULT_NAMESPACE, r.metadata.name): r.spec
        for r in resources
        if isinstance(r, TraceFilter)
    }
    probes = [r for r in resources if isinstance(r, TraceProbe)]
    if not probes:
        raise StandaloneError(f"{source}: no TraceProbe in the file")
    assignments = []
    for probe in probes:
        namespace = probe.metadata.namespace or DEFAULT_NAMESPACE
        where = f"{source}: TraceProbe {namespace}/{probe.metadata.name}"
        spec = probe.spec
        if spec.filter_ref is not None:
            found = filters.get((namespace, spec.filter_ref))
            if found is None:
                raise StandaloneError(
                    f"{where}: spec.filterRef {spec.filter_ref!r} names no TraceFilter of "
                    f"namespace {namespace} in this file"
                )
            filter_where = f"{source}: TraceFilter {namespace}/{spec.filter_ref}"
            targets = host_targets(found, filter_where, "spec.")
        else:
            targets = host_targets(spec.filter, where, "spec.filter.")
        assignments.append(
            {
                "id": f"{namespace}/{probe.metadata.name}",
                "specHash": spec_hash(spec),
                "spec": spec.to_wire(),
                "targets": targets.to_wire(),
                "allowProgram": True,  # whoever runs this is root on this host already
            }
        )
    try:
        return NodeState.model_validate({"node": node, "revision": 1, "probes": assignments})
    except ValidationError as exc:
        raise StandaloneError(f"{source}: cannot run these probes:\n{format_errors(exc)}") from exc


def outcome_lines(report: NodeReport) -> list[str]:
    lines = []
    for p in report.probes:
        if p.state == "Loaded":
            ids = ", ".join(str(i) for i in p.program_ids)
            detail = f"program ids {ids}; {p.filter_entries} filter entries"
            if p.shared_by > 1:
                detail += f"; shared by {p.shared_by} probes"
            if p.message:
                detail += f"; {p.message}"
        else:
            detail = f"{p.reason}: {p.message}" if p.message else p.reason
        lines.append(f"{p.id}: {p.state} ({detail})")
    return lines


def load_standalone(path: Path, cgroup_root: Path | None) -> tuple[NodeState, Path]:
    """The file's probes as this host's state, and the cgroup root (for cgroupPaths)."""
    source = str(path)
    state = standalone_state(
        list(load_documents(path.read_text(), source)), node=socket.gethostname(), source=source
    )
    return state, detect_root(cgroup_root)
