"""Which nodes run a probe, from the operator's push state (what it sent, what agents said)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tracekeeper_api.protocol import KernelInfo, ProbeOutcome
from tracekeeper_operator.agent_views import AgentView
from tracekeeper_operator.inventory import Refused


@dataclass(frozen=True)
class Placement:
    node: str
    endpoint: str | None
    outcome: ProbeOutcome | None
    """The agent's last report for the probe; None until it reported one."""
    error: str | None
    kernel: KernelInfo | None = None
    refused: Refused | None = None
    """What the operator kept off this node: its kernel cannot run the probe."""


def placements(
    probe_id: str,
    views: Mapping[str, AgentView],
    unsupported: Mapping[str, Mapping[str, Refused]] | None = None,
) -> list[Placement]:
    """Nodes the probe is meant to run on, that report it, or that cannot run it (by their
    reported kernel), by node name."""
    out: list[Placement] = []
    for node in sorted(views):
        view = views[node]
        outcome = None
        kernel = view.report.kernel if view.report is not None else None
        if view.report is not None:
            outcome = next((o for o in view.report.probes if o.id == probe_id), None)
        refused = (unsupported or {}).get(node, {}).get(probe_id)
        if probe_id in view.desired or outcome is not None or refused is not None:
            out.append(Placement(node, view.endpoint, outcome, view.error, kernel, refused))
    return out


def running(placement: Placement) -> bool:
    """Whether the node's agent says the probe's program is loaded."""
    return placement.outcome is not None and placement.outcome.state == "Loaded"
