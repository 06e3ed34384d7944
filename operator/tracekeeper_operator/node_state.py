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
from tracekeeper_operator.budgets import (
    Allocation,
    Candidate,
    NamespaceBudgets,
    allocate,
    effective_spec,
)
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


@dataclass(frozen=True)
class ProbeRender:
    """One probe's part of the rendering: what it asks of each node before budgets."""

    spec_hash: str
    candidates: Mapping[str, Candidate]
    """node -> the probe's assignment there."""
    unsupported: Mapping[str, Refused]
    """node -> what the node's kernel cannot run of it (never pushed there)."""


def render_probe(
    probe: ProbeRecord,
    selected: Selected,
    *,
    allow_raw: bool,
    budgets: NamespaceBudgets,
    kernels: Mapping[str, KernelInfo] | None = None,
    before: ProbeRender | None = None,
) -> ProbeRender:
    """`before`: the probe's previous render; its assignments are reused (the same objects)
    where they come out equal, so that unchanged nodes are found unchanged by identity."""
    assert probe.spec is not None
    spec = effective_spec(probe.spec, budgets(probe.ref.namespace))
    hashed = spec_hash(spec)
    candidates: dict[str, Candidate] = {}
    unsupported: dict[str, Refused] = {}
    for node in selected.nodes:
        kernel = (kernels or {}).get(node)
        if kernel is not None and (why := node_refusal(spec, node, kernel)) is not None:
            unsupported[node] = why
            continue
        a = assignment(probe, spec, selected, node, allow_raw, hashed)
        old = before.candidates.get(node) if before is not None else None
        if old is not None and old.created == probe.created and old.assignment == a:
            candidates[node] = old
        else:
            candidates[node] = Candidate(a, probe.created)
    return ProbeRender(hashed, candidates, unsupported)


def renders_running(probe: ProbeRecord, expired: frozenset[str]) -> bool:
    """Whether the probe goes to nodes at all (suspended and expired ones do not)."""
    return not (probe.deleting or probe.spec is None or probe.spec.suspend or probe.id in expired)


def per_node_candidates(
    renders: Mapping[str, ProbeRender], agent_nodes: Iterable[str]
) -> dict[str, list[Candidate]]:
    """node -> its candidates in probe id order; every node with an agent is listed."""
    per_node: dict[str, list[Candidate]] = {node: [] for node in agent_nodes}
    for probe_id in sorted(renders):
        for node, candidate in renders[probe_id].candidates.items():
            per_node.setdefault(node, []).append(candidate)
    return per_node


def assemble(renders: Mapping[str, ProbeRender], allocations: Mapping[str, Allocation]) -> Rendered:
    unsupported: dict[str, dict[str, Refused]] = {}
    for probe_id in sorted(renders):
        for node, why in renders[probe_id].unsupported.items():
            unsupported.setdefault(node, {})[probe_id] = why
    return Rendered(
        nodes={node: a.admitted for node, a in sorted(allocations.items())},
        refused={node: a.refused for node, a in sorted(allocations.items()) if a.refused},
        spec_hashes={pid: r.spec_hash for pid, r in sorted(renders.items())},
        unsupported=unsupported,
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
    renders = {
        pid: render_probe(
            probes[pid], selected, allow_raw=allow_raw, budgets=budgets, kernels=kernels
        )
        for pid, selected in selections.items()
        if renders_running(probes[pid], expired)
    }
    per_node = per_node_candidates(renders, agent_nodes)
    allocations = {node: allocate(node, cs, budgets) for node, cs in per_node.items()}
    return assemble(renders, allocations)


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
