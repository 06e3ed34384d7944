"""Which pushes and resyncs are due for each node: the pure part of getting desired state
to the agents (times are passed in; `pusher.Pusher` runs it against a clock and a client).

Per node the planner keeps the desired probes, what was sent and acknowledged, and the
agent's last report. A change to a node that has been quiet (nothing sent for
`debounce`, nothing in flight) is pushed at once: a pod bound to it must reach its agent
before kubelet makes the pod's cgroup, so that the kernel claims it at mkdir. A churn storm
after that only moves the node's "changed at" time: the rest is pushed once the node has
been quiet for `debounce` (or after `max_delay` at the latest), with its latest full state.

An agent is sent the full state again when it restarted (another bootId), or when its report
does not match what it was sent (revision, probe ids or spec hashes).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from tracekeeper_api.protocol import NodeReport, NodeState
from tracekeeper_operator.agent_errors import AgentError, StaleRevision
from tracekeeper_operator.agent_views import AgentView
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


@dataclass
class _Channel:
    endpoint: str | None
    desired: Assignments = ()
    dirty_since: float | None = None
    """First change not covered by a push sent since; None when nothing is to send."""
    changed_at: float = 0.0
    leading: bool = False
    """The pending change found the node quiet: it goes at once, not after the debounce."""
    last_sent: float = float("-inf")
    in_flight: Action | None = None
    acked: NodeState | None = None
    report: NodeReport | None = None
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    next_resync: float = 0.0

    _view: tuple[tuple[object, ...], AgentView] | None = field(
        default=None, repr=False, compare=False
    )
    """The last view made of the channel, and what it was made from."""

    def view(self, node: str) -> AgentView:
        """The channel as status folding sees it; the same object while nothing it shows
        changed (its frozensets are a set of every desired probe: made once per change)."""
        made_of = (self.endpoint, self.report, self.error, self.in_flight, self.desired)
        if self._view is not None:
            was = self._view[0]
            if (
                made_of[0] is was[0]
                and made_of[1] is was[1]
                and made_of[2] is was[2]
                and made_of[3] is was[3]
                and made_of[4] is was[4]
            ):
                return self._view[1]
        view = AgentView(
            node=node,
            endpoint=self.endpoint,
            report=self.report,
            error=self.error,
            in_flight=frozenset(p.id for p in self.in_flight.state.probes)
            if isinstance(self.in_flight, PushAction)
            else frozenset(),
            desired=frozenset(p.id for p in self.desired),
        )
        self._view = (made_of, view)
        return view

    def mark_dirty(self, now: float, quiet_for: float) -> None:
        if self.dirty_since is None:
            self.dirty_since = now
            self.leading = self.in_flight is None and now - self.last_sent >= quiet_for
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
                ch.mark_dirty(now, self.debounce)
                changed.append(node)
                continue
            if ch.endpoint != endpoint:  # another agent pod: it knows nothing of us
                ch.endpoint, ch.acked, ch.report, ch.error = endpoint, None, None, None
                ch.failures, ch.retry_at = 0, 0.0
                ch.mark_dirty(now, self.debounce)
                changed.append(node)
            if ch.desired != probes:
                ch.desired = probes
                ch.mark_dirty(now, self.debounce)
                changed.append(node)
        for gone in set(self._channels) - set(desired) - set(endpoints):
            del self._channels[gone]
        return sorted(set(changed))

    # --- scheduling ---------------------------------------------------------------------------

    def _push_time(self, ch: _Channel) -> float:
        assert ch.dirty_since is not None
        if ch.leading:
            return max(ch.dirty_since, ch.retry_at)
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
                    ch.leading, ch.last_sent = False, now
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
        ch.mark_dirty(now, self.debounce)

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
            ch.mark_dirty(now, self.debounce)
            ch.leading = True  # not a churn: push at once

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
        return {node: ch.view(node) for node, ch in self._channels.items()}

    def settled(self) -> bool:
        """Nothing to push and nothing in flight (tests and benchmarks wait on this)."""
        return all(
            ch.endpoint is None or (ch.dirty_since is None and ch.in_flight is None)
            for ch in self._channels.values()
        )
