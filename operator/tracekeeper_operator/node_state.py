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
from dataclasses import dataclass, field

from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.protocol import (
    KernelInfo,
    NodeState,
    ProbeAssignment,
    pack_node_state,
    spec_hash,
)
from tracekeeper_operator.budgets import Candidate, NamespaceBudgets, allocate, effective_spec
from tracekeeper_operator.inventory import Refused, node_refusal
from tracekeeper_operator.records import ProbeRecord
from tracekeeper_operator.selection import Selected

Assignments = tuple[ProbeAssignment, ...]


@dataclass(frozen=True)
class Rendered:
    """Every node's desired probes, and the probes a node did not take (over a budget)."""

    nodes: Mapping[str, Assignments]
    refused: Mapping[str, Mapping[str, str]]
    """node -> probe id -> why it was left out (a QuotaExceeded message)."""
    spec_hashes: Mapping[str, str]
    """probe id -> the hash of the spec sent (defaults filled in), as agents report it."""
    unsupported: Mapping[str, Mapping[str, Refused]] = field(default_factory=dict)
    """node -> probe id -> (reason, message): what the node's reported kernel cannot run,
    not pushed there."""


def assignment(
    probe: ProbeRecord,
    spec: TraceProbeSpec,
    selected: Selected,
    node: str,
    allow_raw: bool,
    hashed: str | None = None,
) -> ProbeAssignment:
    """`hashed`: spec_hash(spec), when the caller has it (it is a JSON dump and a SHA-256:
    once per probe, not once per node)."""
    return ProbeAssignment(
        id=probe.id,
        spec_hash=hashed or spec_hash(spec),
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
    budgets: NamespaceBudgets,
    expired: frozenset[str] = frozenset(),
    kernels: Mapping[str, KernelInfo] | None = None,
) -> Rendered:
    """Desired probes per node, each node shared out fairly (see budgets.py). Every node
    with an agent gets an entry, empty when it runs nothing, so that probes deleted while
    the operator was away are removed too. Probes whose debug session `expired` are left
    out like suspended ones. `kernels`: what each node's agent reported its kernel can do
    (inventory.py): a probe a node cannot run is kept out of it, in `unsupported`."""
    per_node: dict[str, list[Candidate]] = {node: [] for node in agent_nodes}
    hashes: dict[str, str] = {}
    unsupported: dict[str, dict[str, Refused]] = {}
    for probe_id in sorted(selections):
        probe = probes[probe_id]
        if probe.deleting or probe.spec is None or probe.spec.suspend or probe_id in expired:
            continue
        spec = effective_spec(probe.spec, budgets(probe.ref.namespace))
        hashes[probe_id] = spec_hash(spec)
        selected = selections[probe_id]
        for node in selected.nodes:
            kernel = (kernels or {}).get(node)
            if kernel is not None and (why := node_refusal(spec, node, kernel)) is not None:
                unsupported.setdefault(node, {})[probe_id] = why
                continue
            a = assignment(probe, spec, selected, node, allow_raw, hashes[probe_id])
            per_node.setdefault(node, []).append(Candidate(a, probe.created))
    nodes: dict[str, Assignments] = {}
    refused: dict[str, Mapping[str, str]] = {}
    for node, candidates in sorted(per_node.items()):
        allocation = allocate(node, candidates, budgets)
        nodes[node] = allocation.admitted
        if allocation.refused:
            refused[node] = allocation.refused
    return Rendered(nodes=nodes, refused=refused, spec_hashes=hashes, unsupported=unsupported)


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
    """What the agent is sent: each pod once, in the state's pod table."""
    return pack_node_state(node, revision, probes)
