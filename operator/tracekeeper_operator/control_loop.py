"""The operator's one loop: cluster snapshot -> selections -> desired node states (handed to
the pusher) -> statuses folded from the agents' reports, written only when they changed.

Level-triggered: any watch event or agent report pokes the loop; a short quiet window
coalesces a burst into one pass, and each pass starts from the whole picture, so a missed
or duplicated event cannot leave anything behind. The pass is incremental all the same:
plans and statuses are recomputed only where their inputs changed (plan_memo, status_memo:
equal to a computation from scratch), and status writes run in the background.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from tracekeeper_api.protocol import KernelInfo
from tracekeeper_api.status import (
    SessionValues,
    TraceFilterStatus,
    TraceProbeStatus,
)
from tracekeeper_operator.agent_views import AgentView, holding_nodes
from tracekeeper_operator.cluster_plan import ClusterPlan
from tracekeeper_operator.cluster_view import ClusterView, ViewChanges, changes_between
from tracekeeper_operator.costs import refreshed_cost
from tracekeeper_operator.inventory import Refused
from tracekeeper_operator.kube_api import KubeWrites
from tracekeeper_operator.kube_events import EventSpec, rfc3339
from tracekeeper_operator.metrics import OperatorMetrics, ProbeReadiness
from tracekeeper_operator.output_api.agent_reads import AgentReads
from tracekeeper_operator.plan_memo import PlanMemo
from tracekeeper_operator.pusher import Pusher
from tracekeeper_operator.records import FilterRecord, ObjectRef, ProbeRecord
from tracekeeper_operator.selection import (
    Refusal,
    Selected,
    Selection,
    matching_pods,
    refuse_privileged,
    targets_pod,
)
from tracekeeper_operator.session_values import read_final_values
from tracekeeper_operator.sessions import (
    attach_session,
    expired_message,
    next_expiry,
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
from tracekeeper_operator.status_memo import (
    AgentVersions,
    StatusMemo,
    filter_inputs,
    filter_users,
    left_out,
    probe_inputs,
)
from tracekeeper_operator.status_scope import StatusScope

log = logging.getLogger(__name__)

WRITE_CONCURRENCY = 16
WRITE_RETRY_SECONDS = 2.0

_S = TypeVar("_S", TraceProbeStatus, TraceFilterStatus)


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
    users: Mapping[str, Sequence[str]] | None = None,
) -> TraceFilterStatus:
    """`users`: `status_memo.filter_users(view)`, when the caller has it (else scanned)."""
    ns = filt.ref.namespace
    refusal: Refusal | None
    matched = 0
    if filt.spec is None:
        refusal = Refusal("InvalidSpec", filt.invalid)
    else:
        refusal = refuse_privileged(ns, None, filt.spec, settings, filter_name=filt.ref.name)
        if refusal is None:
            spec = filt.spec
            matched = sum(targets_pod(p, spec) for p in matching_pods(ns, spec, view, settings))
    used_by = list((users if users is not None else filter_users(view)).get(filt.ref.key, ()))
    return fold_filter_status(
        filt, matched_pods=matched, used_by=used_by, refusal=refusal, previous=previous, now=now
    )


@dataclass
class _Written:
    """Statuses written but maybe not yet seen back through the watch, by object uid."""

    probes: dict[str, TraceProbeStatus] = field(default_factory=dict)
    filters: dict[str, TraceFilterStatus] = field(default_factory=dict)


@dataclass
class _Job(Generic[_S]):
    """A status to write and the Events to post once it is written."""

    ref: ObjectRef
    status: _S
    cache: dict[str, _S]
    events: list[EventSpec]


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
        self._queued: dict[str, _Job[Any]] = {}
        """uid -> the latest status to write, not yet started."""
        self._writers: dict[str, asyncio.Task[None]] = {}
        """uid -> the task writing that object's statuses, while it has some to write."""
        self.plan: ClusterPlan | None = None
        self._planner = PlanMemo(settings)
        self._agent_versions = AgentVersions()
        self._probe_memo: StatusMemo[TraceProbeStatus] = StatusMemo()
        self._filter_memo: StatusMemo[TraceFilterStatus] = StatusMemo()
        self._readiness_of: dict[str, tuple[TraceProbeStatus, ProbeReadiness]] = {}
        self._readiness_by: dict[str, ProbeReadiness] = {}
        """probe id -> its readiness as of the last pass that folded it."""
        self._readiness_moved = False
        self._scope = StatusScope()
        self._seen: ClusterView | None = None
        """The view of the last pass that completed (None: the next pass looks at all)."""
        self._previous_of: dict[str, TraceProbeStatus | None] = {}
        """probe id -> the status the last pass folded over (see `_previous`)."""
        self._touched_probes: set[str] = set()
        self._touched_filters: set[str] = set()
        """Keys of the objects whose written-but-unseen status changed since the last pass."""
        self._users: tuple[Mapping[str, ProbeRecord], dict[str, tuple[str, ...]]] | None = None
        """filter_users of the probes of the last view (the same mapping: the same users)."""
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
        for writer in list(self._writers.values()):
            writer.cancel()

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
                await self.reconcile_once(wait_for_writes=False)
            except Exception:
                log.exception("reconcile pass failed; retrying on the next change")
                await asyncio.sleep(1.0)
                self._dirty.set()

    async def reconcile_once(self, *, wait_for_writes: bool = True) -> None:
        """One pass. The status writes it starts run in the background; `wait_for_writes`
        returns only once they are made (the loop itself does not wait: the next pass, with
        the agents' next answers, must not queue behind the apiserver)."""
        assert self._view is not None
        view = self._view()
        before, self._seen = self._seen, None  # set again once this pass is through
        changes = changes_between(before, view)
        now = self._now() if self._now else datetime.now(UTC)
        touched, self._touched_probes = self._touched_probes, set()
        touched_filters, self._touched_filters = self._touched_filters, set()
        previous, previous_changed = self._previous_statuses(view, changes, touched)
        kernels = {
            node: v.report.kernel
            for node, v in self.pusher.planner.views().items()
            if v.report is not None
        }
        self._kernels = kernels
        plan = self._planner.plan(view, previous, now, kernels)
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
        await self._write_statuses(
            view, before, changes, plan, previous, previous_changed, touched_filters, now
        )
        self._seen = view
        self._arm_expiry(plan, now)
        self._arm_cost_refresh()
        if wait_for_writes:
            await self.writes_done()

    def _previous_statuses(
        self, view: ClusterView, changes: ViewChanges, touched: set[str]
    ) -> tuple[dict[str, TraceProbeStatus | None], set[str]]:
        """Each live probe's status to fold over (`_previous`), and the probes for which it
        may differ from the last pass's: those whose record changed or whose written status
        did (`touched`)."""
        if changes.everything:
            previous = {
                pid: self._previous(self._written.probes, p.ref.uid, p.status)
                for pid, p in view.probes.items()
                if not p.deleting
            }
            changed = set(previous)
        else:
            previous = dict(self._previous_of)
            changed = set(changes.probes) | touched
            for pid in changed:
                p = view.probes.get(pid)
                if p is None or p.deleting:
                    previous.pop(pid, None)
                else:
                    previous[pid] = self._previous(self._written.probes, p.ref.uid, p.status)
        self._previous_of = previous
        return previous, changed

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
        before: ClusterView | None,
        changes: ViewChanges,
        plan: ClusterPlan,
        previous_probes: Mapping[str, TraceProbeStatus | None],
        previous_changed: set[str],
        touched_filters: set[str],
        now_at: datetime,
    ) -> None:
        """Fold the statuses whose inputs may have changed (`status_scope`; all of them when
        that cannot be told) and queue the writes of those that differ from the stored."""
        views = self.pusher.planner.views()
        versions = self._agent_versions.update(views)
        left = left_out(plan)
        looked = self._planner.looked_at
        if changes.everything or not self._probe_memo.all_fresh(now_at):
            looked = None  # some cost is due for a refresh: every probe is looked at
        dirty = self._scope.probes(looked, previous_changed, self._agent_versions.moved, left)
        if dirty is None:
            self._readiness_by = {}
        for probe_id in view.probes if dirty is None else sorted(dirty):
            probe = view.probes.get(probe_id)
            if probe is None or probe.deleting:
                self._scope.probe_folded(probe_id, None)
                self._readiness_moved |= self._readiness_by.pop(probe_id, None) is not None
                continue
            self._fold_probe(
                probe, plan, previous_probes.get(probe_id), versions, left, views, now_at
            )
        self._probe_memo.end_pass(
            every_object=dirty is None, cost_every=self.settings.cost_interval
        )
        if dirty is None or changes.probes or self._readiness_moved:
            by = self._readiness_by
            self._readiness = tuple(r for pid in view.probes if (r := by.get(pid)) is not None)
        self._readiness_moved = False
        filters = self._scope.filters(changes, before, view, touched_filters)
        self._fold_filters(view, filters, now_at)
        if dirty is None or filters is None:
            self._scope.prune(
                view.probes if dirty is None else None, view.filters if filters is None else None
            )
        self._drop_deleted(view, before, changes, plan)

    def _fold_probe(
        self,
        probe: ProbeRecord,
        plan: ClusterPlan,
        previous: TraceProbeStatus | None,
        versions: Mapping[str, int],
        left: Mapping[str, tuple[object, ...]],
        views: Mapping[str, AgentView],
        now_at: datetime,
    ) -> None:
        uid = probe.ref.uid
        selection = plan.selections[probe.id]
        self._scope.probe_folded(probe.id, selection)
        inputs = probe_inputs(probe, selection, plan, versions, left, previous)
        current = previous
        every = self.settings.cost_interval
        if not self._probe_memo.unchanged(uid, inputs, now=now_at, cost_every=every):
            folded = probe_status(
                probe,
                selection,
                plan,
                views,
                previous=previous,
                now=now_at,
                max_failures=self.settings.max_failures,
                cost_interval=every,
            )
            if folded is not None and status_differs(previous, folded):
                self._probe_memo.forget(uid)
                events = probe_events(previous, folded)
                self._enqueue(_Job(probe.ref, folded, self._written.probes, events))
                current = folded
            else:
                self._probe_memo.keep(uid, inputs, previous, cost_every=every)
        ready = self._ready(probe, current) if current is not None else None
        if self._readiness_by.get(probe.id) is not ready:
            self._readiness_moved = True
            if ready is None:
                del self._readiness_by[probe.id]
            else:
                self._readiness_by[probe.id] = ready

    def _fold_filters(self, view: ClusterView, keys: set[str] | None, now_at: datetime) -> None:
        """Fold the filters `keys` (None: every filter)."""
        now = rfc3339(now_at)
        if self._users is None or self._users[0] is not view.probes:
            self._users = (view.probes, filter_users(view))
        users = self._users[1]
        for key in view.filters if keys is None else sorted(keys):
            filt = view.filters.get(key)
            if filt is None or filt.deleting:
                self._scope.filter_folded(key, None)
                continue
            uid = filt.ref.uid
            previous_f = self._previous(self._written.filters, uid, filt.status)
            inputs = filter_inputs(filt, view, self.settings, users, previous_f)
            spaces = inputs[1]
            assert isinstance(spaces, tuple)
            self._scope.filter_folded(key, spaces)
            if self._filter_memo.unchanged(uid, inputs, now=now_at, cost_every=0.0):
                continue
            folded_f = filter_status(
                filt, view, self.settings, previous=previous_f, now=now, users=users
            )
            if status_differs(previous_f, folded_f):
                self._filter_memo.forget(uid)
                events_f = filter_events(previous_f, folded_f)
                self._enqueue(_Job(filt.ref, folded_f, self._written.filters, events_f))
            else:
                self._filter_memo.keep(uid, inputs, previous_f, cost_every=0.0)
        self._filter_memo.end_pass(every_object=keys is None)

    def _drop_deleted(
        self, view: ClusterView, before: ClusterView | None, changes: ViewChanges, plan: ClusterPlan
    ) -> None:
        """Forget what was kept of deleted objects (only those that changed can be, unless
        every part of the view may have)."""
        if changes.everything or before is None:
            live = {p.ref.uid for p in view.probes.values()} | {
                f.ref.uid for f in view.filters.values()
            }
            dead = (set(self._written.probes) | set(self._readiness_of)) - live
            dead |= set(self._written.filters) - live
        else:
            dead = set()
            for keys, old_of, new_of in (
                (changes.probes, before.probes, view.probes),
                (changes.filters, before.filters, view.filters),
            ):
                for key in keys:
                    old, new = old_of.get(key), new_of.get(key)
                    if old is not None and (new is None or new.ref.uid != old.ref.uid):
                        dead.add(old.ref.uid)
        for uid in dead:
            self._written.probes.pop(uid, None)
            self._written.filters.pop(uid, None)
            self._readiness_of.pop(uid, None)
            self._probe_memo.forget(uid)
            self._filter_memo.forget(uid)
        ended = {view.probes[pid].ref.uid for pid in plan.expired}
        for uid in set(self._finals) - ended:
            del self._finals[uid]

    def _ready(self, probe: ProbeRecord, status: TraceProbeStatus) -> ProbeReadiness:
        """The probe's readiness for the metrics, made again only when its status changed."""
        kept = self._readiness_of.get(probe.ref.uid)
        if kept is not None and kept[0] is status:
            return kept[1]
        ready = status.condition("Ready")
        made = ProbeReadiness(
            probe.ref.namespace,
            probe.ref.name,
            ready is not None and ready.status == "True",
            ready.reason if ready is not None else "Unknown",
        )
        self._readiness_of[probe.ref.uid] = (status, made)
        return made

    @staticmethod
    def _previous(cache: dict[str, _S], uid: str, stored: _S | None) -> _S | None:
        written = cache.get(uid)
        if written is not None and stored is not None and not status_differs(stored, written):
            del cache[uid]  # the watch caught up with our write
            return stored
        return written if written is not None else stored

    def _enqueue(self, job: _Job[Any]) -> None:
        """Write `job.status` in the background, after any write of the object already on its
        way (one writer per object, so writes land in the order they were folded). The pass
        does not wait: the next one folds over this status (cached as written) at once, and
        a status folded before it was sent replaces it, its Events kept."""
        uid = job.ref.uid
        job.cache[uid] = job.status
        self._touched(job).add(job.ref.key)
        waiting = self._queued.get(uid)
        if waiting is not None:
            job.events = [*waiting.events, *job.events]
        self._queued[uid] = job
        if uid not in self._writers:
            self._writers[uid] = asyncio.create_task(self._drain(uid))

    async def _drain(self, uid: str) -> None:
        try:
            while (job := self._queued.pop(uid, None)) is not None:
                await self._write(job)
        finally:
            del self._writers[uid]

    async def writes_done(self) -> None:
        """Until every status write started so far has been made (tests, benchmarks)."""
        while self._writers:
            await asyncio.gather(*list(self._writers.values()))

    async def _write(self, job: _Job[Any]) -> None:
        ref, status = job.ref, job.status
        async with self._limit:
            try:
                found = await self._writes.patch_status(ref, status.to_merge_patch())
            except Exception as exc:
                log.warning("writing the status of %s %s failed: %s", ref.kind, ref.key, exc)
                self._metrics.status_patches.labels(ref.kind, "error").inc()
                self._unwritten(job)
                # Again later, not in a hot loop while the apiserver is unhappy.
                asyncio.get_running_loop().call_later(WRITE_RETRY_SECONDS, self.poke)
                return
            self._metrics.status_patches.labels(ref.kind, "ok").inc()
            if not found:
                self._unwritten(job)
                return
            for event in job.events:
                await self.post_event(ref, event)

    def _unwritten(self, job: _Job[Any]) -> None:
        """A write that did not happen: a newer status on its way takes its Events along;
        else the next pass folds over the stored status again (and its Events with it)."""
        newer = self._queued.get(job.ref.uid)
        if newer is not None:
            newer.events = [*job.events, *newer.events]
        elif job.cache.get(job.ref.uid) is job.status:
            del job.cache[job.ref.uid]
            self._touched(job).add(job.ref.key)

    def _touched(self, job: _Job[Any]) -> set[str]:
        return self._touched_probes if job.cache is self._written.probes else self._touched_filters

    async def post_event(self, ref: ObjectRef, event: EventSpec) -> None:
        try:
            await self._writes.post_event(ref, event)
        except Exception as exc:
            log.warning("posting event %s on %s failed: %s", event.reason, ref.key, exc)
            return
        self._metrics.events.labels(event.reason).inc()
