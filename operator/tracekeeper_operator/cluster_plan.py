"""One pass's plan of the whole cluster, computed from scratch: each probe's selection and
debug session, then every node's desired state (pure; `plan_memo.PlanMemo` computes the
same plan reusing what did not change since its previous pass)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tracekeeper_api.protocol import KernelInfo
from tracekeeper_api.status import DebugSession, TraceProbeStatus
from tracekeeper_operator.budgets import NamespaceBudgets
from tracekeeper_operator.cluster_view import ClusterView
from tracekeeper_operator.node_state import Rendered, render_nodes
from tracekeeper_operator.records import ProbeRecord
from tracekeeper_operator.selection import Selected, Selection, select
from tracekeeper_operator.sessions import (
    current_session,
    duration_refusal,
    has_expired,
    session_duration,
)
from tracekeeper_operator.settings import OperatorSettings


@dataclass(frozen=True)
class ClusterPlan:
    selections: Mapping[str, Selection]
    rendered: Rendered
    endpoints: Mapping[str, str | None]
    budget_problems: Mapping[str, str] = field(default_factory=dict)
    """namespace -> why its budget annotation is ignored."""
    sessions: Mapping[str, DebugSession] = field(default_factory=dict)
    """The debug sessions of the probes with a duration, as of this pass."""
    expired: frozenset[str] = frozenset()
    """Probes whose session has ended: left out of every node."""


def with_session(
    probe: ProbeRecord,
    selection: Selection,
    budgets: NamespaceBudgets,
    previous: Mapping[str, TraceProbeStatus | None] | None,
) -> tuple[Selection, DebugSession | None]:
    """The selection once the namespace's session rules apply, and the probe's session."""
    if not isinstance(selection, Selected) or probe.spec is None:
        return selection, None
    budget = budgets(probe.ref.namespace)
    selection = duration_refusal(probe.spec, budget) or selection
    before = previous.get(probe.id) if previous is not None else probe.status
    session = current_session(before, session_duration(probe.spec, budget))
    if session is None or not isinstance(selection, Selected):
        return selection, None
    return selection, session


def plan_cluster(
    view: ClusterView,
    settings: OperatorSettings,
    previous: Mapping[str, TraceProbeStatus | None] | None = None,
    now: datetime | None = None,
    kernels: Mapping[str, KernelInfo] | None = None,
) -> ClusterPlan:
    """`previous`: each probe's latest status (default: the stored one), for its session;
    `kernels`: what each node's agent reported its kernel can do."""
    now = now or datetime.now(UTC)
    budgets = NamespaceBudgets(settings, view.namespace_annotations)
    selections: dict[str, Selection] = {}
    sessions: dict[str, DebugSession] = {}
    for pid, probe in view.probes.items():
        selection, session = with_session(probe, select(probe, view, settings), budgets, previous)
        if session is not None:
            sessions[pid] = session
        selections[pid] = selection
    expired = frozenset(pid for pid, s in sessions.items() if has_expired(s, now))
    selected = {pid: s for pid, s in selections.items() if isinstance(s, Selected)}
    rendered = render_nodes(
        view.probes,
        selected,
        view.agents,
        allow_raw=settings.allow_raw_programs,
        budgets=budgets,
        expired=expired,
        kernels=kernels,
    )
    endpoints = {node: agent.endpoint for node, agent in view.agents.items()}
    return ClusterPlan(selections, rendered, endpoints, budgets.problems, sessions, expired)
