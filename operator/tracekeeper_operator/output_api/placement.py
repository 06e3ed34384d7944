"""Which nodes run a probe, from the operator's push state (what it sent, what agents said)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tracekeeper_api.protocol import ProbeOutcome
from tracekeeper_operator.agent_views import AgentView


@dataclass(frozen=True)
class Placement:
    node: str
    endpoint: str | None
    outcome: ProbeOutcome | None
    """The agent's last report for the probe; None until it reported one."""
    error: str | None


def placements(probe_id: str, views: Mapping[str, AgentView]) -> list[Placement]:
    """Nodes the probe is meant to run on or that report it, by node name."""
    out: list[Placement] = []
    for node in sorted(views):
        view = views[node]
        outcome = None
        if view.report is not None:
            outcome = next((o for o in view.report.probes if o.id == probe_id), None)
        if probe_id in view.desired or outcome is not None:
            out.append(Placement(node, view.endpoint, outcome, view.error))
    return out


def running(placement: Placement) -> bool:
    """Whether the node's agent says the probe's program is loaded."""
    return placement.outcome is not None and placement.outcome.state == "Loaded"
