"""The cluster plan kept from pass to pass: each probe's selection and rendering, and each
node's allocation, recomputed only when what it is computed from changed (pure).

Level-triggered still: every pass looks at every probe and every node of the whole view,
but compares the inputs of each piece with the ones it was last computed from (by identity
first, then by value) instead of computing it again. A pod event in one namespace changes
that namespace's pods, so only the probes reading them are selected again, and only the
nodes whose candidates changed are allocated again. Nothing is trusted from the events
themselves: the inputs are read from the view, so a missed or duplicated event changes
nothing, and the plan always equals `cluster_plan.plan_cluster` of the same view (the
unit tests check it over random event sequences).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from tracekeeper_api.protocol import KernelInfo
from tracekeeper_api.status import DebugSession, TraceProbeStatus
from tracekeeper_operator.budgets import Allocation, Candidate, NamespaceBudgets, allocate
from tracekeeper_operator.cluster_plan import ClusterPlan, with_session
from tracekeeper_operator.cluster_view import ClusterView, changes_between
from tracekeeper_operator.node_state import (
    ProbeRender,
    assemble,
    render_probe,
    renders_running,
)
from tracekeeper_operator.records import ProbeRecord
from tracekeeper_operator.reverse_index import ReverseIndex
from tracekeeper_operator.selection import (
    Refusal,
    Selected,
    Selection,
    candidate_namespaces,
    resolve_filter,
    select,
)
from tracekeeper_operator.sessions import has_expired
from tracekeeper_operator.settings import OperatorSettings

Inputs = tuple[object, ...]


def selection_inputs(
    probe: ProbeRecord, view: ClusterView, settings: OperatorSettings, agent_nodes: Inputs
) -> Inputs:
    """Everything `selection.select` reads for this probe: its spec, its filter, the pods
    of the namespaces the filter may select, the node labels when it has a nodeSelector,
    the agents' nodes when it targets hosts (and the settings, fixed per memo)."""
    spec = probe.spec
    if spec is None:
        return (None, probe.invalid)
    key = probe.filter_key
    ref = view.filters.get(key) if key is not None else None
    filt = resolve_filter(probe, view)
    spaces: tuple[str, ...] = ()
    hosts = False
    if not isinstance(filt, Refusal):
        spaces = tuple(candidate_namespaces(probe.ref.namespace, filt, view, settings))
        hosts = bool(filt.pids or filt.cgroup_paths or filt.host_wide)
    return (
        spec,
        None if ref is None else (ref.spec, ref.invalid, ref.deleting),
        spaces,
        tuple(view.pods(ns) for ns in spaces),
        view.node_labels if spec.node_selector else None,
        agent_nodes if hosts else None,
    )


def _sources(probe: ProbeRecord, view: ClusterView, spaces: tuple[str, ...]) -> Inputs:
    """The objects the probe's selection inputs are read from (a view keeps unchanged parts
    as the same objects, see cluster_view.ViewBuilder): all the same ones as last pass
    means the same inputs, without making and comparing them."""
    key = probe.filter_key
    ref = view.filters.get(key) if key is not None else None
    return (
        probe,
        ref,
        view.namespace_labels,
        view.node_labels,
        view.agents,
        *(view.pods(ns) for ns in spaces),
    )


def _same(a: Inputs, b: Inputs) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


def spaces_of(inputs: Inputs) -> tuple[str, ...]:
    """The namespaces whose pods the selection inputs hold."""
    spaces = inputs[2] if len(inputs) > 2 else ()
    assert isinstance(spaces, tuple)
    return spaces


@dataclass
class _Probe:
    inputs: Inputs
    selection: Selection
    spaces: tuple[str, ...] = ()
    sources: Inputs = ()
    render_inputs: Inputs | None = None
    render: ProbeRender | None = None
    render_sources: Inputs = ()
    """(record, selection, budgets) of the last render check..."""
    render_pass: int = 0
    """... made in this pass (the kernels that moved are known since the previous one)."""
    session_sources: Inputs = ()
    """(record, selection, budgets, previous status) `session` was made from."""
    session: tuple[Selection, DebugSession | None] | None = None


@dataclass(frozen=True)
class _Pass:
    """What the last pass computed for every probe, to start the next one from."""

    budgets: NamespaceBudgets
    selections: Mapping[str, Selection]
    sessions: Mapping[str, DebugSession]
    renders: Mapping[str, ProbeRender]


@dataclass(frozen=True)
class _Node:
    budgets: NamespaceBudgets
    candidates: tuple[Candidate, ...]
    allocation: Allocation


@dataclass(frozen=True)
class PlanCounts:
    """What the last pass computed again (the rest was reused)."""

    selected: int = 0
    rendered: int = 0
    allocated: int = 0


class PlanMemo:
    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self._probes: dict[str, _Probe] = {}
        self._nodes: dict[str, _Node] = {}
        self._annotations: Mapping[str, Mapping[str, str]] | None = None
        self._budgets: NamespaceBudgets | None = None
        self.counts = PlanCounts()
        self._kernels: dict[str, KernelInfo] = {}
        self._renders: dict[str, ProbeRender] = {}
        self._by_node: dict[str, dict[str, Candidate]] = {}
        self._node_lists: dict[str, tuple[Candidate, ...]] = {}
        self._agent_nodes: tuple[str, ...] = ()
        self._pass = 0
        """Passes made: a render checked in the previous pass is valid as of it."""
        self._kernels_moved_at = 0
        """The last pass in which some node's kernel facts moved."""
        self._view: ClusterView | None = None
        self._last: _Pass | None = None
        self._readers = ReverseIndex()
        """probe id -> the namespaces whose pods its selection read (its `spaces`)."""
        self._users = ReverseIndex()
        """probe id -> the TraceFilter its filterRef names (namespace/name)."""
        self.looked_at: frozenset[str] | None = None
        """The probes the last pass looked at (their inputs may have changed); None: all."""

    def _namespace_budgets(self, view: ClusterView) -> NamespaceBudgets:
        notes = view.namespace_annotations
        if self._budgets is None or not (notes is self._annotations or notes == self._annotations):
            self._budgets = NamespaceBudgets(self.settings, notes)
            self._annotations = notes
        return self._budgets

    def _node_candidates(
        self,
        renders: Mapping[str, ProbeRender],
        agent_nodes: tuple[str, ...],
        pids: Iterable[str] | None = None,
    ) -> dict[str, tuple[Candidate, ...]]:
        """`node_state.per_node_candidates(renders, agent_nodes)`, remade only for the nodes
        of the probes whose render changed since last pass (an index node -> probe ->
        candidate is kept); `pids`: the only probes whose render may have changed."""
        last = self._renders
        by_node = self._by_node
        touched: set[str] = set()
        for pid in set(renders) | set(last) if pids is None else pids:
            old, new = last.get(pid), renders.get(pid)
            if old is new:
                continue
            if old is not None:
                for node in old.candidates:
                    del by_node[node][pid]
                    touched.add(node)
            if new is not None:
                for node, candidate in new.candidates.items():
                    by_node.setdefault(node, {})[pid] = candidate
                    touched.add(node)
        self._renders = dict(renders)
        if not touched and agent_nodes == self._agent_nodes:
            return self._node_lists  # no probe moved on or off any node
        self._agent_nodes = agent_nodes
        for node in [n for n in touched if not by_node.get(n, True)]:
            del by_node[node]
        lists: dict[str, tuple[Candidate, ...]] = {}
        for node in sorted(set(agent_nodes) | set(by_node)):
            kept = self._node_lists.get(node)
            if kept is None or node in touched:
                kept = tuple(c for _, c in sorted(by_node.get(node, {}).items()))
            lists[node] = kept
        self._node_lists = lists
        return lists

    def _kernels_of(
        self, kernels: Mapping[str, KernelInfo]
    ) -> tuple[dict[str, KernelInfo], set[str]]:
        """The kernels, each node's kept as last pass's object while it reports the same facts
        (every agent answer brings a new one), and the nodes whose facts moved."""
        last = self._kernels
        kept: dict[str, KernelInfo] = {}
        moved: set[str] = set(last) - set(kernels)
        for node, kernel in kernels.items():
            old = last.get(node)
            if old is not None and (old is kernel or old == kernel):
                kernel = old
            else:
                moved.add(node)
            kept[node] = kernel
        self._kernels = kept
        return kept, moved

    def _looked_at(
        self, view: ClusterView, budgets: NamespaceBudgets, moved: set[str]
    ) -> set[str] | None:
        """The probes whose inputs may have changed since the last pass, from what changed in
        the view; None: any may have (a part every probe reads changed, the budgets or a
        kernel moved, or there is no last pass)."""
        last = self._last
        changes = changes_between(self._view, view)
        if changes.everything or last is None or last.budgets is not budgets or moved:
            return None
        dirty = set(changes.probes)
        for key in changes.filters:
            dirty.update(self._users.readers(key))
        for ns in changes.pod_namespaces:
            dirty.update(self._readers.readers(ns))
        dirty.update(last.sessions)  # a session reads the stored status and the clock
        return dirty

    def _select(
        self,
        pid: str,
        probe: ProbeRecord,
        view: ClusterView,
        agent_nodes: Inputs,
        budgets: NamespaceBudgets,
        before: TraceProbeStatus | None,
        previous: Mapping[str, TraceProbeStatus | None] | None,
    ) -> tuple[_Probe, bool]:
        """The probe's memo entry with its selection and session as of this view (reused
        where their inputs are unchanged), and whether it was selected again."""
        kept = self._probes.get(pid)
        again = False
        if kept is None or not _same(kept.sources, _sources(probe, view, kept.spaces)):
            inputs = selection_inputs(probe, view, self.settings, agent_nodes)
            if kept is None or kept.inputs != inputs:
                selection = select(probe, view, self.settings)
                again = True
                if kept is not None and kept.selection == selection:
                    kept.inputs = inputs  # the same selection: its render and session hold
                else:
                    render = kept.render if kept is not None else None
                    kept = _Probe(inputs, selection, render=render)
            kept.spaces = spaces_of(inputs)
            kept.sources = _sources(probe, view, kept.spaces)
            key = probe.filter_key
            self._readers.set(pid, kept.spaces)
            self._users.set(pid, (key,) if key is not None else ())
        session_sources = (probe, kept.selection, budgets, before)
        if not _same(kept.session_sources, session_sources):
            kept.session_sources = session_sources
            kept.session = with_session(probe, kept.selection, budgets, previous)
        return kept, again

    def _render(
        self,
        pid: str,
        probe: ProbeRecord,
        selection: Selected,
        budgets: NamespaceBudgets,
        kernels: Mapping[str, KernelInfo],
        moved: set[str],
    ) -> tuple[ProbeRender, bool]:
        """The probe's render (reused where its inputs are unchanged), and whether it was
        rendered again."""
        entry = self._probes[pid]
        sources = (probe, selection, budgets)
        if (
            entry.render is not None
            and _same(entry.render_sources, sources)
            and (
                entry.render_pass >= self._kernels_moved_at
                or (entry.render_pass == self._pass - 1 and moved.isdisjoint(selection.targets))
            )
        ):
            entry.render_pass = self._pass
            return entry.render, False
        render_inputs = (
            selection,
            probe.spec,
            probe.created,
            budgets(probe.ref.namespace),
            tuple(kernels.get(node) for node in selection.targets),
        )
        entry.render_sources, entry.render_pass = sources, self._pass
        again = entry.render is None or entry.render_inputs != render_inputs
        if entry.render is None or again:
            entry.render = render_probe(
                probe,
                selection,
                allow_raw=self.settings.allow_raw_programs,
                budgets=budgets,
                kernels=kernels,
                before=entry.render,
            )
            entry.render_inputs = render_inputs
        return entry.render, again

    def plan(
        self,
        view: ClusterView,
        previous: Mapping[str, TraceProbeStatus | None] | None = None,
        now: datetime | None = None,
        kernels: Mapping[str, KernelInfo] | None = None,
    ) -> ClusterPlan:
        """`plan_cluster(view, self.settings, previous, now, kernels)`, reusing the pieces
        whose inputs are unchanged since the previous call. A pass looks only at the probes
        that what changed in the view may concern (`_looked_at`), and at every probe when
        that cannot be told."""
        now = now or datetime.now(UTC)
        self._pass += 1
        budgets = self._namespace_budgets(view)
        kernels, moved = self._kernels_of(kernels or {})
        if moved:
            self._kernels_moved_at = self._pass
        agent_nodes = tuple(view.agents)
        dirty = self._looked_at(view, budgets, moved)
        last = self._last
        if dirty is None or last is None:
            pids: Iterable[str] = view.probes
            selections: dict[str, Selection] = {}
            sessions: dict[str, DebugSession] = {}
            renders: dict[str, ProbeRender] = {}
            gone = set(self._probes) - set(view.probes)
        else:
            pids = sorted(dirty)
            selections, sessions = dict(last.selections), dict(last.sessions)
            renders = dict(last.renders)
            gone = {pid for pid in dirty if pid not in view.probes}
        for pid in gone:
            self._probes.pop(pid, None)
            self._readers.set(pid, ())
            self._users.set(pid, ())
            selections.pop(pid, None)
            sessions.pop(pid, None)
            renders.pop(pid, None)
        selected_again = rendered_again = 0
        looked: list[str] = []
        for pid in pids:
            probe = view.probes.get(pid)
            if probe is None:
                continue
            looked.append(pid)
            before = previous.get(pid) if previous is not None else probe.status
            kept, again = self._select(pid, probe, view, agent_nodes, budgets, before, previous)
            selected_again += again
            self._probes[pid] = kept
            assert kept.session is not None
            selections[pid], session = kept.session
            if session is not None:
                sessions[pid] = session
            else:
                sessions.pop(pid, None)
        expired = frozenset(pid for pid, s in sessions.items() if has_expired(s, now))
        for pid in looked:
            probe, selection = view.probes[pid], selections[pid]
            if not isinstance(selection, Selected) or not renders_running(probe, expired):
                renders.pop(pid, None)
                continue
            renders[pid], again = self._render(pid, probe, selection, budgets, kernels, moved)
            rendered_again += again
        nodes: dict[str, _Node] = {}
        allocations: dict[str, Allocation] = {}
        changed = None if dirty is None else [*looked, *gone]
        for node, candidates in self._node_candidates(renders, agent_nodes, changed).items():
            old = self._nodes.get(node)
            if (
                old is None
                or old.budgets is not budgets
                or (old.candidates is not candidates and old.candidates != candidates)
            ):
                old = _Node(budgets, candidates, allocate(node, candidates, budgets))
            nodes[node] = old
            allocations[node] = old.allocation
        allocated_again = sum(1 for node, n in nodes.items() if self._nodes.get(node) is not n)
        self._nodes = nodes
        self.counts = PlanCounts(selected_again, rendered_again, allocated_again)
        self.looked_at = None if dirty is None else frozenset(looked)
        self._view = view
        self._last = _Pass(budgets, selections, sessions, renders)
        endpoints = {node: agent.endpoint for node, agent in view.agents.items()}
        rendered = assemble(renders, allocations)
        return ClusterPlan(selections, rendered, endpoints, budgets.problems, sessions, expired)
