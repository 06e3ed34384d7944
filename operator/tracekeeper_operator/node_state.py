"""Per-node desired state: which probes each agent runs, with its targets there.

Suspended probes are left out of every node's state (the agent closes their programs);
their status says Suspended. Sending them with `suspend: true` would only make every agent
hold and report a probe that does nothing.

Revisions come from a clock based on wall time in milliseconds, so that a restarted
operator (which remembers nothing) still sends revisions above the ones its predecessor
sent; an agent that answers 409 with a higher applied revision moves the clock past it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from tracekeeper_api.protocol import (
    MAX_PROBES_PER_NODE,
    NodeState,
    ProbeAssignment,
    spec_hash,
)
from tracekeeper_operator.records import ProbeRecord
from tracekeeper_operator.selection import Selected

Assignments = tuple[ProbeAssignment, ...]


@dataclass(frozen=True)
class Rendered:
    """Every node's desired probes, and the probes a node could not take (over its cap)."""

    nodes: Mapping[str, Assignments]
    overflow: Mapping[str, tuple[str, ...]]
    """node -> probe ids left out because the node already has MAX_PROBES_PER_NODE."""


def assignment(
    probe: ProbeRecord, selected: Selected, node: str, allow_raw: bool
) -> ProbeAssignment:
    spec = probe.spec
    assert spec is not None
    return ProbeAssignment(
        id=probe.id,
        spec_hash=spec_hash(spec),
        spec=spec,
        targets=selected.targets[node],
        # Selection refused raw programs that are not allowed: one that got here may run.
        allow_program=allow_raw and spec.program is not None,
    )


def render_nodes(
    probes: Mapping[str, ProbeRecord],
    selections: Mapping[str, Selected],
    agent_nodes: Iterable[str],
    *,
    allow_raw: bool,
    max_probes: int = MAX_PROBES_PER_NODE,
) -> Rendered:
    """Desired probes per node. Every node with an agent gets an entry, empty when it runs
    nothing, so that probes deleted while the operator was away are removed too."""
    per_node: dict[str, list[ProbeAssignment]] = {node: [] for node in agent_nodes}
    for probe_id in sorted(selections):
        probe = probes[probe_id]
        if probe.deleting or probe.spec is None or probe.spec.suspend:
            continue
        selected = selections[probe_id]
        for node in selected.nodes:
            per_node.setdefault(node, []).append(assignment(probe, selected, node, allow_raw))
    nodes: dict[str, Assignments] = {}
    overflow: dict[str, tuple[str, ...]] = {}
    for node, items in sorted(per_node.items()):
        nodes[node] = tuple(items[:max_probes])
        if len(items) > max_probes:
            overflow[node] = tuple(a.id for a in items[max_probes:])
    return Rendered(nodes=nodes, overflow=overflow)


class RevisionClock:
    """Monotonic revisions that also increase across operator restarts."""

    def __init__(self, wall_ms: Callable[[], int] | None = None) -> None:
        self._wall_ms = wall_ms or (lambda: time.time_ns() // 1_000_000)
        self._last = 0

    def next(self) -> int:
        self._last = max(self._last + 1, self._wall_ms())
        return self._last

    def move_past(self, revision: int) -> None:
        """After a 409: the agent holds a revision from a clock ahead of ours."""
        self._last = max(self._last, revision)


def node_state(node: str, revision: int, probes: Assignments) -> NodeState:
    return NodeState(node=node, revision=revision, probes=list(probes))
