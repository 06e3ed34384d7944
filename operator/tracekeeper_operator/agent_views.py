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
    unsaved = None
    if view.report is not None:
        probes = tuple(
            (p.id, p.spec_hash, p.state, p.reason, p.message) for p in view.report.probes
        )
        unsaved = view.report.persisted.error  # a resync that finds the state saved again
    return (view.endpoint, view.error, view.report is None, probes, unsaved, view.in_flight)


def holding_nodes(probe_id: str, views: Mapping[str, AgentView]) -> list[str]:
    """Nodes whose agent may still run `probe_id`: its last report lists the probe, or it
    answered at least once and the probe is still desired there or on its way in a push,
    or it was not heard from yet: a restarted operator's agents may run what its
    predecessor pushed (issue 18's chaos: finalizers went before the agents unloaded).
    An agent whose contact failed before any answer holds nothing: unreachable, it would
    only hold the finalizer to the unload timeout; it drops the probe with its next state."""
    holding = []
    for node, view in sorted(views.items()):
        if view.endpoint is None:
            continue
        if view.report is None:
            if view.error is None:
                holding.append(node)
            continue
        if (
            probe_id in view.desired
            or probe_id in view.in_flight
            or any(p.id == probe_id for p in view.report.probes)
        ):
            holding.append(node)
    return holding
