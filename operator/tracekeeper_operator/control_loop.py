"""The operator's one loop: cluster snapshot -> selections -> desired node states (handed to
the pusher) -> statuses folded from the agents' reports, written only when they changed.

Level-triggered: any watch event or agent report pokes the loop; a short quiet window
coalesces a burst into one pass, and each pass starts from the whole picture, so a missed
or duplicated event cannot leave anything behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TypeVar

from tracekeeper_api.protocol import KernelInfo
from tracekeeper_api.status import (
    DebugSession,
    SessionValues,
    TraceFilterStatus,
    TraceProbeStatus,
)
from tracekeeper_operator.agent_views import AgentView, holding_nodes
from tracekeeper_operator.budgets import NamespaceBudgets
from tracekeeper_operator.cluster_view import ClusterView
from tracekeeper_operator.costs import refreshed_cost
from tracekeeper_operator.inventory import Refused
from tracekeeper_operator.kube_api import KubeWrites
from tracekeeper_operator.kube_events import EventSpec, rfc3339
from tracekeeper_operator.metrics import OperatorMetrics, ProbeReadiness
from tracekeeper_operator.node_state import Rendered, render_nodes
from tracekeeper_operator.output_api.agent_reads import AgentReads
from tracekeeper_operator.pusher import Pusher
from tracekeeper_operator.records import FilterRecord, ObjectRef, ProbeRecord
from tracekeeper_operator.selection import (
    Refusal,
    Selected,
    Selection,
    matching_pods,
    pod_target,
    refuse_privileged,
    select,
)
from tracekeeper_operator.session_values import read_final_values
from tracekeeper_operator.sessions import (
    attach_session,
    current_session,
    duration_refusal,
    expired_message,
    has_expired,
    next_expiry,
    session_duration,
)
from tracekeeper_operator.settings import OperatorSettings
from tracekeeper_operator.status_folding import (
    filter_events,
    fold_filter_status,
    fold_probe_status,
    node_outcomes,
    probe_events,
    status_differs,
)

log = logging.getLogger(__name__)

WRITE_CONCURRENCY = 16
WRITE_RETRY_SECONDS = 2.0

_S = TypeVar("_S", TraceProbeStatus, TraceFilterStatus)


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
        selection = select(probe, view, settings)
        if isinstance(selection, Selected) and probe.spec is not None:
            budget = budgets(probe.ref.namespace)
            selection = duration_refusal(probe.spec, budget) or selection
            before = previous.get(pid) if previous is not None else probe.status
            session = current_session(before, session_duration(probe.spec, budget))
            if session is not None and isinstance(selection, Selected):
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


def probe_status(
    probe: ProbeRecord,
    selection: Selection,
    plan: ClusterPlan,
    views: Mapping[str, AgentView],
    *,
    previous: TraceProbeStatus | None,
    now: datetime,
    max_failures: int,
    cost_interval: float = OperatorSettings.cost_interval,
) -> TraceProbeStatus | None:
    """The probe's status now; None to keep the stored one for now: a restarted operator has
    not heard from some agent yet, and the stored status is better than a NodesPending flap
    (and its Events) on every operator restart."""
    session = plan.sessions.get(probe.id)
    expired = probe.id in plan.expired
    outcomes = []
    running = probe.spec is not None and not probe.spec.suspend and not expired
    if isinstance(selection, Selected) and running:
        outcomes = node_outcomes(
            probe.id,
            plan.rendered.spec_hashes[probe.id],
            selection.nodes,
            views,
            plan.rendered.refused,
            plan.rendered.unsupported,
        )
        if previous is not None and not all(o.known for o in outcomes):
            return None
    folded = fold_probe_status(
        probe,
        selection,
        outcomes,
        previous=previous,
        now=rfc3339(now),
        max_failures=max_failures,
        expired=expired_message(session) if expired and session is not None else None,
    )
    before = previous.cost if previous is not None else None
    cost = refreshed_cost(outcomes, before, now, cost_interval)
    folded = folded.model_copy(update={"cost": cost})
    return attach_session(folded, previous, session, expired=expired, now=now)


def filter_status(
    filt: FilterRecord,
    view: ClusterView,
    settings: OperatorSettings,
    *,
    previous: TraceFilterStatus | None,
    now: str,
) -> TraceFilterStatus:
    ns = filt.ref.namespace
    refusal: Refusal | None
    matched = 0
    if filt.spec is None:
        refusal = Refusal("InvalidSpec", filt.invalid)
    else:
        refusal = refuse_privileged(ns, None, filt.spec, settings, filter_name=filt.ref.name)
        if refusal is None:
            spec = filt.spec
            matched = sum(
                pod_target(p, spec) is not None for p in matching_pods(ns, spec, view, settings)
            )
    used_by = [
        p.ref.name
        for p in view.probes.values()
        if p.ref.namespace == ns and p.spec is not None and p.spec.filter_ref == filt.ref.name
    ]
    return fold_filter_status(
        filt, matched_pods=matched, used_by=used_by, refusal=refusal, previous=previous, now=now
    )


@dataclass
class _Written:
    """Statuses written but maybe not yet seen back through the watch, by object uid."""

    probes: dict[str, TraceProbeStatus] = field(default_factory=dict)
    filters: dict[str, TraceFilterStatus] = field(default_factory=dict)


class ControlLoop:
    def __init__(
        self,
        settings: OperatorSettings,
        pusher: Pusher,
        writes: KubeWrites,
        *,
        metrics: OperatorMetrics | None = None,
        now: Callable[[], datetime] | None = None,
        reads: AgentReads | None = None,
    ) -> None:
        """`reads`: the agents' values, read once when a debug session ends (None: the
        session's final values say which nodes were not read)."""
        self.settings = settings
        self.pusher = pusher
        self._writes = writes
        self._metrics = metrics or OperatorMetrics()
        self._now = now
        self._view: Callable[[], ClusterView] | None = None
        self._dirty = asyncio.Event()
        self._written = _Written()
        self._limit = asyncio.Semaphore(WRITE_CONCURRENCY)
        self.plan: ClusterPlan | None = None
        self._readiness: tuple[ProbeReadiness, ...] = ()
        self._budget_problems: Mapping[str, str] = {}
        self._reads = reads
        self._finals: dict[str, SessionValues] = {}
        """Final values read for an ended session, by probe uid, until its status holds them
        (the nodes no longer have them once the probe is unloaded)."""
        self._expiry: asyncio.TimerHandle | None = None
        self._cost_refresh: asyncio.TimerHandle | None = None
        self._kernels: Mapping[str, KernelInfo] = {}
        self._metrics.watch_probes(self.probe_readiness)
        self._metrics.watch_kernels(lambda: self._kernels)

    def attach(self, view: Callable[[], ClusterView]) -> None:
        """Called once kopf's indexes are complete: renders may start."""
        if self._view is None:
            log.info("indexes are complete: rendering desired states")
        self._view = view
        self.poke()

    @property
    def ready(self) -> bool:
        return self._view is not None

    def close(self) -> None:
        for timer in (self._expiry, self._cost_refresh):
            if timer is not None:
                timer.cancel()

    def poke(self) -> None:
        self._metrics.reconciles.inc()
        self._dirty.set()

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.settings.render_debounce)
            self._dirty.clear()
            if self._view is None:
                continue
            try:
                await self.reconcile_once()
            except Exception:
                log.exception("reconcile pass failed; retrying on the next change")
                await asyncio.sleep(1.0)
                self._dirty.set()

    async def reconcile_once(self) -> None:
        assert self._view is not None
        view = self._view()
        now = self._now() if self._now else datetime.now(UTC)
        previous = {
            pid: self._previous(self._written.probes, p.ref.uid, p.status)
            for pid, p in view.probes.items()
            if not p.deleting
        }
        kernels = {
            node: v.report.kernel
            for node, v in self.pusher.planner.views().items()
            if v.report is not None
        }
        self._kernels = kernels
        plan = plan_cluster(view, self.settings, previous, now, kernels)
        plan = await self._with_final_values(plan, view, now)
        self.plan = plan
        for ns, problem in plan.budget_problems.items():
            if self._budget_problems.get(ns) != problem:  # once per change, not every pass
                log.warning("namespace %s: %s; the default budget applies", ns, problem)
        self._budget_problems = plan.budget_problems
        self._metrics.renders.inc()
        self._metrics.desired_nodes.set(len(plan.rendered.nodes))
        self._metrics.desired_assignments.set(sum(len(a) for a in plan.rendered.nodes.values()))
        self.pusher.update(plan.rendered.nodes, plan.endpoints)
        await self._write_statuses(view, plan, previous, now)
        self._arm_expiry(plan, now)
        self._arm_cost_refresh()

    async def _with_final_values(
        self, plan: ClusterPlan, view: ClusterView, now: datetime
    ) -> ClusterPlan:
        """Sessions that ended in this pass get their last values, read from the agents
        before the push that unloads the probe."""
        ending = [pid for pid in plan.expired if plan.sessions[pid].final is None]
        if not ending:
            return plan
        probes = view.probes
        views = self.pusher.planner.views()
        sessions = dict(plan.sessions)
        for pid in ending:
            uid = probes[pid].ref.uid
            final = self._finals.get(uid)
            if final is None:
                final = await read_final_values(pid, views, self._reads, read_at=rfc3339(now))
                self._finals[uid] = final
            sessions[pid] = sessions[pid].model_copy(update={"final": final})
        return replace(plan, sessions=sessions)

    def _arm_expiry(self, plan: ClusterPlan, now: datetime) -> None:
        """A pass when the soonest running session ends (level-triggered like the rest: a
        restarted operator finds expiresAt in the status)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        running = [s for pid, s in plan.sessions.items() if pid not in plan.expired]
        delay = next_expiry(running, now)
        if delay is not None:
            # A little after: the pass must see the time as past.
            self._expiry = asyncio.get_running_loop().call_later(delay + 0.05, self.poke)

    def _arm_cost_refresh(self) -> None:
        """A pass every cost interval while some probe is loaded: the agents' reports bring
        new costs with every resync, but a resync that changed nothing else starts no pass."""
        interval = self.settings.cost_interval
        pending = self._cost_refresh is not None and not self._cost_refresh.cancelled()
        if interval <= 0 or pending or not any(r.ready for r in self._readiness):
            return

        def refresh() -> None:
            self._cost_refresh = None
            self.poke()

        self._cost_refresh = asyncio.get_running_loop().call_later(interval, refresh)

    def unsupported(self) -> Mapping[str, Mapping[str, Refused]]:
        """node -> probe id -> what the node's kernel cannot run, as of the last pass."""
        return self.plan.rendered.unsupported if self.plan is not None else {}

    def probe_readiness(self) -> tuple[ProbeReadiness, ...]:
        """Each TraceProbe's Ready condition as of the last pass (what it was folded to, or
        the stored status while that is kept); probes being deleted are left out. Replaced
        whole by each pass: safe to read from the metrics server's thread."""
        return self._readiness

    def holding_nodes(self, probe_id: str) -> list[str]:
        """Nodes that may still run a probe (its finalizer waits for none). Agents the
        indexes know but no pass has reached yet count as not heard from: a restarted
        operator's delete handler runs before its first render (issue 18's chaos)."""
        views = self.pusher.planner.views()
        if self._view is not None:
            for node, agent in self._view().agents.items():
                views.setdefault(node, AgentView(node, agent.endpoint, None, None))
        return holding_nodes(probe_id, views)

    # --- statuses ------------------------------------------------------------------------------

    async def _write_statuses(
        self,
        view: ClusterView,
        plan: ClusterPlan,
        previous_probes: Mapping[str, TraceProbeStatus | None],
        now_at: datetime,
    ) -> None:
        now = rfc3339(now_at)
        views = self.pusher.planner.views()
        jobs = []
        readiness = []
        for probe_id, probe in view.probes.items():
            if probe.deleting:
                continue
            previous = previous_probes.get(probe_id)
            folded = probe_status(
                probe,
                plan.selections[probe_id],
                plan,
                views,
                previous=previous,
                now=now_at,
                max_failures=self.settings.max_failures,
                cost_interval=self.settings.cost_interval,
            )
            if folded is not None and status_differs(previous, folded):
                events = probe_events(previous, folded)
                jobs.append(self._write(probe.ref, folded, self._written.probes, events))
            current = folded if folded is not None else previous
            if current is not None:
                ready = current.condition("Ready")
                readiness.append(
                    ProbeReadiness(
                        probe.ref.namespace,
                        probe.ref.name,
                        ready is not None and ready.status == "True",
                        ready.reason if ready is not None else "Unknown",
                    )
                )
        self._readiness = tuple(readiness)
        for filt in view.filters.values():
            if filt.deleting:
                continue
            previous_f = self._previous(self._written.filters, filt.ref.uid, filt.status)
            folded_f = filter_status(filt, view, self.settings, previous=previous_f, now=now)
            if status_differs(previous_f, folded_f):
                events_f = filter_events(previous_f, folded_f)
                jobs.append(self._write(filt.ref, folded_f, self._written.filters, events_f))
        live = {p.ref.uid for p in view.probes.values()} | {
            f.ref.uid for f in view.filters.values()
        }
        for uid in set(self._written.probes) - live:
            del self._written.probes[uid]
        ended = {view.probes[pid].ref.uid for pid in plan.expired}
        for uid in set(self._finals) - ended:
            del self._finals[uid]
        for uid in set(self._written.filters) - live:
            del self._written.filters[uid]
        if jobs:
            await asyncio.gather(*jobs)

    @staticmethod
    def _previous(cache: dict[str, _S], uid: str, stored: _S | None) -> _S | None:
        written = cache.get(uid)
        if written is not None and stored is not None and not status_differs(stored, written):
            del cache[uid]  # the watch caught up with our write
            return stored
        return written if written is not None else stored

    async def _write(
        self, ref: ObjectRef, status: _S, cache: dict[str, _S], events: list[EventSpec]
    ) -> None:
        async with self._limit:
            try:
                found = await self._writes.patch_status(ref, status.to_merge_patch())
            except Exception as exc:
                log.warning("writing the status of %s %s failed: %s", ref.kind, ref.key, exc)
                self._metrics.status_patches.labels(ref.kind, "error").inc()
                # Again later, not in a hot loop while the apiserver is unhappy.
                asyncio.get_running_loop().call_later(WRITE_RETRY_SECONDS, self.poke)
                return
            self._metrics.status_patches.labels(ref.kind, "ok").inc()
            if not found:
                return
            cache[ref.uid] = status
            for event in events:
                await self.post_event(ref, event)

    async def post_event(self, ref: ObjectRef, event: EventSpec) -> None:
        try:
            await self._writes.post_event(ref, event)
        except Exception as exc:
            log.warning("posting event %s on %s failed: %s", event.reason, ref.key, exc)
            return
        self._metrics.events.labels(event.reason).inc()
