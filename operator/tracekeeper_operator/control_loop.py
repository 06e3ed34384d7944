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
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from tracekeeper_api.status import TraceFilterStatus, TraceProbeStatus
from tracekeeper_operator.agent_views import AgentView, holding_nodes
from tracekeeper_operator.budgets import NamespaceBudgets
from tracekeeper_operator.cluster_view import ClusterView
from tracekeeper_operator.kube_api import KubeWrites
from tracekeeper_operator.kube_events import EventSpec, rfc3339
from tracekeeper_operator.metrics import OperatorMetrics, ProbeReadiness
from tracekeeper_operator.node_state import Rendered, render_nodes
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


def plan_cluster(view: ClusterView, settings: OperatorSettings) -> ClusterPlan:
    selections = {pid: select(p, view, settings) for pid, p in view.probes.items()}
    selected = {pid: s for pid, s in selections.items() if isinstance(s, Selected)}
    budgets = NamespaceBudgets(settings, view.namespace_annotations)
    rendered = render_nodes(
        view.probes, selected, view.agents, allow_raw=settings.allow_raw_programs, budgets=budgets
    )
    endpoints = {node: agent.endpoint for node, agent in view.agents.items()}
    return ClusterPlan(selections, rendered, endpoints, budgets.problems)


def probe_status(
    probe: ProbeRecord,
    selection: Selection,
    plan: ClusterPlan,
    views: Mapping[str, AgentView],
    *,
    previous: TraceProbeStatus | None,
    now: str,
    max_failures: int,
) -> TraceProbeStatus | None:
    """The probe's status now; None to keep the stored one for now: a restarted operator has
    not heard from some agent yet, and the stored status is better than a NodesPending flap
    (and its Events) on every operator restart."""
    outcomes = []
    if isinstance(selection, Selected) and probe.spec is not None and not probe.spec.suspend:
        outcomes = node_outcomes(
            probe.id,
            plan.rendered.spec_hashes[probe.id],
            selection.nodes,
            views,
            plan.rendered.refused,
        )
        if previous is not None and not all(o.known for o in outcomes):
            return None
    return fold_probe_status(
        probe, selection, outcomes, previous=previous, now=now, max_failures=max_failures
    )


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
    ) -> None:
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
        self._metrics.watch_probes(self.probe_readiness)

    def attach(self, view: Callable[[], ClusterView]) -> None:
        """Called once kopf's indexes are complete: renders may start."""
        if self._view is None:
            log.info("indexes are complete: rendering desired states")
        self._view = view
        self.poke()

    @property
    def ready(self) -> bool:
        return self._view is not None

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
        plan = plan_cluster(view, self.settings)
        self.plan = plan
        for ns, problem in plan.budget_problems.items():
            if self._budget_problems.get(ns) != problem:  # once per change, not every pass
                log.warning("namespace %s: %s; the default budget applies", ns, problem)
        self._budget_problems = plan.budget_problems
        self._metrics.renders.inc()
        self._metrics.desired_nodes.set(len(plan.rendered.nodes))
        self._metrics.desired_assignments.set(sum(len(a) for a in plan.rendered.nodes.values()))
        self.pusher.update(plan.rendered.nodes, plan.endpoints)
        await self._write_statuses(view, plan)

    def probe_readiness(self) -> tuple[ProbeReadiness, ...]:
        """Each TraceProbe's Ready condition as of the last pass (what it was folded to, or
        the stored status while that is kept); probes being deleted are left out. Replaced
        whole by each pass: safe to read from the metrics server's thread."""
        return self._readiness

    def holding_nodes(self, probe_id: str) -> list[str]:
        """Nodes that may still run a probe (its finalizer waits for none)."""
        return holding_nodes(probe_id, self.pusher.planner.views())

    # --- statuses ------------------------------------------------------------------------------

    def _stamp(self) -> str:
        return rfc3339(self._now() if self._now else None)

    async def _write_statuses(self, view: ClusterView, plan: ClusterPlan) -> None:
        now = self._stamp()
        views = self.pusher.planner.views()
        jobs = []
        readiness = []
        for probe_id, probe in view.probes.items():
            if probe.deleting:
                continue
            previous = self._previous(self._written.probes, probe.ref.uid, probe.status)
            folded = probe_status(
                probe,
                plan.selections[probe_id],
                plan,
                views,
                previous=previous,
                now=now,
                max_failures=self.settings.max_failures,
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
                found = await self._writes.patch_status(ref, status.to_wire())
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
