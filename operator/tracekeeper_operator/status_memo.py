"""Statuses folded again only when what they are folded from changed (pure).

A probe's status is a function of its record, its selection and spec hash, the reports of
the agents of its nodes, what budgets and kernels refused there, its session, and the
status it is folded over; a filter's of its record, the pods its selector may match and the
probes using it. Each pass compares those inputs with the ones of the last fold that needed
no write: when they are equal, folding again would give the stored status again, so the
fold is skipped. A fold that did need a write is never remembered (its write may fail and
must be tried again); nor is a status whose cost is due for a refresh (costs.cost_is_fresh).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from tracekeeper_api.status import TraceFilterStatus, TraceProbeStatus
from tracekeeper_operator.agent_views import AgentView
from tracekeeper_operator.cluster_plan import ClusterPlan
from tracekeeper_operator.cluster_view import ClusterView
from tracekeeper_operator.costs import cost_is_fresh, fresh_window
from tracekeeper_operator.records import FilterRecord, ProbeRecord
from tracekeeper_operator.selection import Selected, Selection, candidate_namespaces
from tracekeeper_operator.settings import OperatorSettings

Inputs = tuple[object, ...]
_S = TypeVar("_S", TraceProbeStatus, TraceFilterStatus)


class AgentVersions:
    """A number per node that moves whenever what status folding reads of its agent moves:
    endpoint, last error, the report (a new report object: every answer), pushes in flight."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[AgentView, int]] = {}
        self._next = 0
        self.moved: frozenset[str] = frozenset()
        """The nodes whose number moved (or that came or went) in the last update."""

    def update(self, views: Mapping[str, AgentView]) -> dict[str, int]:
        seen: dict[str, tuple[AgentView, int]] = {}
        moved = set(self._seen) - set(views)
        for node, view in views.items():
            old = self._seen.get(node)
            if old is None or not _same_view(old[0], view):
                self._next += 1
                old = (view, self._next)
                moved.add(node)
            seen[node] = old
        self._seen = seen
        self.moved = frozenset(moved)
        return {node: version for node, (_, version) in seen.items()}


def _same_view(a: AgentView, b: AgentView) -> bool:
    return (
        a.report is b.report
        and a.endpoint == b.endpoint
        and a.error == b.error
        and a.in_flight == b.in_flight
    )


def left_out(plan: ClusterPlan) -> dict[str, tuple[object, ...]]:
    """probe id -> the nodes that refused it (budgets) or cannot run it (kernels), and why."""
    out: dict[str, list[object]] = {}
    for node, refused in plan.rendered.refused.items():
        for pid, why in refused.items():
            out.setdefault(pid, []).append((node, why))
    for node, unsupported in plan.rendered.unsupported.items():
        for pid, refusal in unsupported.items():
            out.setdefault(pid, []).append((node, refusal))
    return {pid: tuple(whys) for pid, whys in out.items()}


def probe_inputs(
    probe: ProbeRecord,
    selection: Selection,
    plan: ClusterPlan,
    versions: Mapping[str, int],
    left: Mapping[str, tuple[object, ...]],
    previous: TraceProbeStatus | None,
) -> Inputs:
    """What `control_loop.probe_status` reads for this probe (settings fixed per memo);
    `left`: `left_out(plan)`."""
    pid = probe.id
    nodes: tuple[int | None, ...] = ()
    if isinstance(selection, Selected):
        nodes = tuple(map(versions.get, selection.targets))
    return (
        probe,
        selection,
        plan.rendered.spec_hashes.get(pid),
        nodes,
        left.get(pid),
        plan.sessions.get(pid),
        pid in plan.expired,
        previous,
    )


def filter_users(view: ClusterView) -> dict[str, tuple[str, ...]]:
    """filter key -> names of the probes naming it in filterRef."""
    users: dict[str, list[str]] = {}
    for p in view.probes.values():
        if (key := p.filter_key) is not None:
            users.setdefault(key, []).append(p.ref.name)
    return {key: tuple(names) for key, names in users.items()}


def filter_inputs(
    filt: FilterRecord,
    view: ClusterView,
    settings: OperatorSettings,
    users: Mapping[str, tuple[str, ...]],
    previous: TraceFilterStatus | None,
) -> Inputs:
    """What `control_loop.filter_status` reads for this filter."""
    spaces: tuple[str, ...] = ()
    if filt.spec is not None:
        spaces = tuple(candidate_namespaces(filt.ref.namespace, filt.spec, view, settings))
    return (
        filt,
        spaces,
        tuple(view.pods(ns) for ns in spaces),
        users.get(filt.ref.key, ()),
        previous,
    )


@dataclass(frozen=True)
class _Kept(Generic[_S]):
    inputs: Inputs
    status: _S | None


class StatusMemo(Generic[_S]):
    """Per object uid: the inputs of its last fold that left the stored status as it was."""

    def __init__(self) -> None:
        self._kept: dict[str, _Kept[_S]] = {}
        self._live: set[str] = set()
        self._fresh: tuple[datetime, datetime] | None = None
        """A window within which every kept cost is fresh (maybe narrower); None: none is
        kept with a cost."""

    def unchanged(self, uid: str, inputs: Inputs, *, now: datetime, cost_every: float) -> bool:
        """Whether folding again would give the stored status (`inputs` as last time)."""
        self._live.add(uid)
        kept = self._kept.get(uid)
        if kept is None or kept.inputs != inputs:
            return False
        cost = getattr(kept.status, "cost", None)
        return cost is None or cost_is_fresh(cost, now, cost_every)

    def keep(self, uid: str, inputs: Inputs, status: _S | None, *, cost_every: float) -> None:
        """The fold of `inputs` needed no write (`status`: what is stored)."""
        self._kept[uid] = _Kept(inputs, status)
        self._narrow(status, cost_every)

    def _narrow(self, status: _S | None, cost_every: float) -> None:
        cost = getattr(status, "cost", None)
        if cost is None:
            return
        window = fresh_window(cost, cost_every)
        if self._fresh is not None:
            window = (max(window[0], self._fresh[0]), min(window[1], self._fresh[1]))
        self._fresh = window

    def all_fresh(self, now: datetime) -> bool:
        """Whether every kept status's cost is still fresh at `now` (`unchanged` would find
        none due for a refresh): a pass may then leave the objects it does not look at."""
        return self._fresh is None or self._fresh[0] <= now < self._fresh[1]

    def forget(self, uid: str) -> None:
        self._kept.pop(uid, None)

    def end_pass(self, *, every_object: bool = True, cost_every: float = 0.0) -> None:
        """`every_object`: the pass looked at every live object, so the ones it did not are
        deleted and dropped (a pass that looked at some `forget`s the deleted ones)."""
        if every_object:
            for uid in set(self._kept) - self._live:
                del self._kept[uid]
            self._fresh = None
            for kept in self._kept.values():
                self._narrow(kept.status, cost_every)
        self._live = set()
