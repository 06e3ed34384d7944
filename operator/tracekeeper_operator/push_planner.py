"""Getting each node's desired state to its agent: coalesced, retried, re-sent when needed.

`PushPlanner` is the pure part (times are passed in): per node it keeps the desired probes,
what was sent and acknowledged, and the agent's last report, and says which pushes and
resyncs are due. A churn storm only moves a node's "changed at" time: the node is pushed
once it has been quiet for `debounce` (or after `max_delay` at the latest), with its latest
full state. `Pusher` runs the planner against a real clock and an AgentClient.

An agent is sent the full state again when it restarted (another bootId), or when its report
does not match what it was sent (revision, probe ids or spec hashes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tracekeeper_api.protocol import NodeReport, NodeState
from tracekeeper_operator.agent_client import AgentClient, AgentError, StaleRevision
from tracekeeper_operator.metrics import OperatorMetrics
from tracekeeper_operator.node_state import Assignments, RevisionClock, node_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushAction:
    node: str
    endpoint: str
    state: NodeState


@dataclass(frozen=True)
class ResyncAction:
    node: str
    endpoint: str


Action = PushAction | ResyncAction


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


@dataclass
class _Channel:
    endpoint: str | None
    desired: Assignments = ()
    dirty_since: float | None = None
    """First change not covered by a push sent since; None when nothing is to send."""
    changed_at: float = 0.0
    in_flight: Action | None = None
    acked: NodeState | None = None
    report: NodeReport | None = None
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    next_resync: float = 0.0

    def mark_dirty(self, now: float) -> None:
        if self.dirty_since is None:
            self.dirty_since = now
        self.changed_at = now


def report_matches(state: NodeState, report: NodeReport) -> bool:
    """Whether the agent holds exactly `state` (same revision, ids and spec hashes)."""
    if report.revision != state.revision or report.node != state.node:
        return False
    sent = {(p.id, p.spec_hash) for p in state.probes}
    held = {(p.id, p.spec_hash) for p in report.probes}
    return sent == held


class PushPlanner:
    def __init__(
        self,
        *,
        revisions: RevisionClock | None = None,
        debounce: float = 0.2,
        max_delay: float = 1.0,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        resync_interval: float = 30.0,
    ) -> None:
        self.revisions = revisions or RevisionClock()
        self.debounce = debounce
        self.max_delay = max_delay
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.resync_interval = resync_interval
        self._channels: dict[str, _Channel] = {}

    # --- input -------------------------------------------------------------------------------

    def set_desired(
        self,
        desired: Mapping[str, Assignments],
        endpoints: Mapping[str, str | None],
        now: float,
    ) -> list[str]:
        """Take the latest rendering; returns the nodes whose state or agent changed."""
        changed: list[str] = []
        for node in sorted(set(desired) | set(endpoints)):
            endpoint = endpoints.get(node)
            probes = desired.get(node, ())
            ch = self._channels.get(node)
            if ch is None:
                ch = self._channels[node] = _Channel(endpoint=endpoint, desired=probes)
                ch.mark_dirty(now)
                changed.append(node)
                continue
            if ch.endpoint != endpoint:  # another agent pod: it knows nothing of us
                ch.endpoint, ch.acked, ch.report, ch.error = endpoint, None, None, None
                ch.failures, ch.retry_at = 0, 0.0
                ch.mark_dirty(now)
                changed.append(node)
            if ch.desired != probes:
                ch.desired = probes
                ch.mark_dirty(now)
                changed.append(node)
        for gone in set(self._channels) - set(desired) - set(endpoints):
            del self._channels[gone]
        return sorted(set(changed))

    # --- scheduling ---------------------------------------------------------------------------

    def _push_time(self, ch: _Channel) -> float:
        assert ch.dirty_since is not None
        quiet = min(ch.changed_at + self.debounce, ch.dirty_since + self.max_delay)
        return max(quiet, ch.retry_at)

    def _resync_time(self, ch: _Channel) -> float:
        return max(ch.next_resync, ch.retry_at)

    def due(self, now: float) -> list[Action]:
        """Actions to start now; each is in flight until its outcome is reported back."""
        actions: list[Action] = []
        for node, ch in sorted(self._channels.items()):
            if ch.endpoint is None or ch.in_flight is not None:
                continue
            action: Action | None = None
            if ch.dirty_since is not None:
                if now >= self._push_time(ch):
                    state = node_state(node, self.revisions.next(), ch.desired)
                    action = PushAction(node, ch.endpoint, state)
                    ch.dirty_since = None  # this push carries every change so far
            elif now >= self._resync_time(ch):
                action = ResyncAction(node, ch.endpoint)
            if action is not None:
                ch.in_flight = action
                actions.append(action)
        return actions

    def next_wakeup(self) -> float | None:
        """When the next action becomes due (None: nothing scheduled)."""
        times = [
            self._push_time(ch) if ch.dirty_since is not None else self._resync_time(ch)
            for ch in self._channels.values()
            if ch.endpoint is not None and ch.in_flight is None
        ]
        return min(times, default=None)

    def _backoff(self, failures: int) -> float:
        return float(min(self.backoff_base * 2 ** (failures - 1), self.backoff_max))

    # --- outcomes -----------------------------------------------------------------------------

    def _finish(self, node: str, action: Action) -> _Channel | None:
        ch = self._channels.get(node)
        if ch is None or ch.in_flight is not action:
            return None  # the node went away, or its agent changed meanwhile
        ch.in_flight = None
        return ch

    def pushed(self, action: PushAction, report: NodeReport, now: float) -> None:
        ch = self._finish(action.node, action)
        if ch is None:
            return
        ch.report, ch.error = report, None
        ch.next_resync = now + self.resync_interval
        if report_matches(action.state, report):
            ch.acked, ch.failures, ch.retry_at = action.state, 0, 0.0
            return
        # An answer for other content than we sent: send again, but not in a hot loop.
        log.warning(
            "agent of %s answered revision %s for revision %s: pushing again",
            action.node,
            report.revision,
            action.state.revision,
        )
        ch.acked = None
        ch.failures += 1
        ch.retry_at = now + self._backoff(ch.failures)
        ch.mark_dirty(now)

    def push_failed(self, action: PushAction, error: AgentError, now: float) -> None:
        ch = self._finish(action.node, action)
        if ch is None:
            return
        ch.failures += 1
        ch.retry_at = now + self._backoff(ch.failures)
        if ch.dirty_since is None:  # nothing newer arrived: this state is still to deliver
            ch.dirty_since = now
        if isinstance(error, StaleRevision):
            # Our clock is behind the agent's applied revision (another operator instance,
            # or a wall clock that went back): jump past it; the agent itself is fine.
            self.revisions.move_past(error.applied_revision)
            ch.error = None
            return
        ch.error = str(error)

    def resynced(self, action: ResyncAction, report: NodeReport, now: float) -> None:
        ch = self._finish(action.node, action)
        if ch is None:
            return
        restarted = ch.report is not None and ch.report.boot_id != report.boot_id
        ch.report, ch.error, ch.failures, ch.retry_at = report, None, 0, 0.0
        ch.next_resync = now + self.resync_interval
        if restarted or ch.acked is None or not report_matches(ch.acked, report):
            if restarted:
                log.info(
                    "agent of %s restarted (bootId %s): sending its full state",
                    action.node,
                    report.boot_id,
                )
            ch.acked = None
            ch.mark_dirty(now)
            ch.changed_at = now - self.debounce  # not a churn: push at once

    def resync_failed(self, action: ResyncAction, error: AgentError, now: float) -> None:
        ch = self._finish(action.node, action)
        if ch is None:
            return
        ch.error = str(error)
        ch.failures += 1
        ch.retry_at = now + self._backoff(ch.failures)
        ch.next_resync = now

    # --- reading ------------------------------------------------------------------------------

    def views(self) -> dict[str, AgentView]:
        return {
            node: AgentView(
                node=node,
                endpoint=ch.endpoint,
                report=ch.report,
                error=ch.error,
                in_flight=frozenset(p.id for p in ch.in_flight.state.probes)
                if isinstance(ch.in_flight, PushAction)
                else frozenset(),
                desired=frozenset(p.id for p in ch.desired),
            )
            for node, ch in self._channels.items()
        }

    def desired(self, node: str) -> Assignments:
        ch = self._channels.get(node)
        return ch.desired if ch else ()

    def settled(self) -> bool:
        """Nothing to push and nothing in flight (tests and benchmarks wait on this)."""
        return all(
            ch.endpoint is None or (ch.dirty_since is None and ch.in_flight is None)
            for ch in self._channels.values()
        )


def status_inputs(view: AgentView) -> tuple[object, ...]:
    """What status folding and unloading read of a view (not the agents' live counters)."""
    probes: tuple[tuple[str, ...], ...] = ()
    if view.report is not None:
        probes = tuple(
            (p.id, p.spec_hash, p.state, p.reason, p.message) for p in view.report.probes
        )
    return (view.endpoint, view.error, view.report is None, probes, view.in_flight)


def holding_nodes(probe_id: str, views: Mapping[str, AgentView]) -> list[str]:
    """Nodes whose agent may still run `probe_id`: its last report lists the probe, or it
    answered at least once and the probe is still desired there or on its way in a push.
    An agent that never answered this operator holds nothing: it is not known to run the
    probe, and if it does (a predecessor's push) it drops it with the next state it gets."""
    holding = []
    for node, view in sorted(views.items()):
        if view.endpoint is None or view.report is None:
            continue
        if (
            probe_id in view.desired
            or probe_id in view.in_flight
            or any(p.id == probe_id for p in view.report.probes)
        ):
            holding.append(node)
    return holding


class Pusher:
    """Runs the planner: starts due pushes and resyncs, and reports their outcomes."""

    def __init__(
        self,
        planner: PushPlanner,
        client: AgentClient,
        *,
        metrics: OperatorMetrics | None = None,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        concurrency: int = 64,
    ) -> None:
        self.planner = planner
        self._client = client
        self._metrics = metrics
        self.on_change = on_change
        """Called after every agent answer (or failure): statuses may have changed."""
        self._clock = clock
        self._limit = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def update(
        self, desired: Mapping[str, Assignments], endpoints: Mapping[str, str | None]
    ) -> None:
        if self.planner.set_desired(desired, endpoints, self._clock()):
            self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                self._wake.clear()
                for action in self.planner.due(self._clock()):
                    task = asyncio.create_task(self._run_action(action))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                wake_at = self.planner.next_wakeup()
                timeout = None if wake_at is None else max(0.0, wake_at - self._clock())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
        finally:
            for task in list(self._tasks):
                task.cancel()

    async def _run_action(self, action: Action) -> None:
        async with self._limit:
            before = self.planner.views().get(action.node)
            started = time.perf_counter()
            if isinstance(action, PushAction):
                await self._push(action, started)
            else:
                await self._resync(action)
        self._wake.set()
        after = self.planner.views().get(action.node)
        # A resync that found the agent as it was (the common case, every node every
        # interval) must not cost a render pass.
        if before is None or after is None or status_inputs(before) != status_inputs(after):
            self.on_change()

    async def _push(self, action: PushAction, started: float) -> None:
        outcome = "ok"
        try:
            report = await self._client.put_state(action.endpoint, action.state)
        except StaleRevision as exc:
            outcome = "stale"
            log.info("push to %s: %s", action.node, exc)
            self.planner.push_failed(action, exc, self._clock())
        except AgentError as exc:
            outcome = "error"
            log.warning("push to %s failed: %s", action.node, exc)
            self.planner.push_failed(action, exc, self._clock())
        else:
            self.planner.pushed(action, report, self._clock())
        if self._metrics is not None:
            self._metrics.observe_push(
                outcome, time.perf_counter() - started, len(action.state.model_dump_json())
            )

    async def _resync(self, action: ResyncAction) -> None:
        try:
            report = await self._client.get_state(action.endpoint)
        except AgentError as exc:
            log.warning("reading the state of %s failed: %s", action.node, exc)
            self.planner.resync_failed(action, exc, self._clock())
            if self._metrics is not None:
                self._metrics.resyncs.labels("error").inc()
            return
        self.planner.resynced(action, report, self._clock())
        if self._metrics is not None:
            self._metrics.resyncs.labels("ok").inc()
