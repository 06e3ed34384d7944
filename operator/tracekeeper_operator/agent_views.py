"""Each node's agent as status folding, unloading and the pusher see it (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tracekeeper_api.protocol import NodeReport


@dataclass(frozen=True)
class AgentView:
    """One node's agent as status folding and unloading see it."""

    node: str
    endpoint: str | None
    report: NodeReport | None
    error: str | None
    """Why the last contact failed; None when it succeeded (or none was made yet)."""
    in_flight: frozenset[str] = frozenset()
    """Probe ids of a push on its way (not yet confirmed either way)."""
    desired: frozenset[str] = frozenset()
    """Probe ids the node should run (pushed or about to be)."""


def status_inputs(view: AgentView) -> tuple[object, ...]:
    """What status folding and unloading read of a view (not the agents' live counters)."""
    probes: tuple[tuple[str, ...], ...] = ()
    if view.report is not None:
        probes = tuple(
            (p.id, p.spec_hash, p.state, p.reason, p.message) for p in view.report.probes
        )
    return (view.endpoint, view.error, view.report is None, probes, view.in_flight)


def holding_nodes(probe_id: str, views: Mapping[str, AgentView]) -> list[str]:
    """Nodes whose agent may still run `probe_id`: its last report lists the probe, or it
    answered at least once and the probe is still desired there or on its way in a push.
    An agent that never answered this operator holds nothing: it is not known to run the
    probe, and if it does (a predecessor's push) it drops it with the next state it gets."""
    holding = []
    for node, view in sorted(views.items()):
        if view.endpoint is None or view.report is None:
            continue
        if (
            probe_id in view.desired
            or probe_id in view.in_flight
            or any(p.id == probe_id for p in view.report.probes)
        ):
            holding.append(node)
    return holding
