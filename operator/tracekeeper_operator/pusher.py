"""Runs the push planner against a real clock and an AgentClient: coalesced, retried,
re-sent when needed (the plan itself is `push_planner.PushPlanner`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from tracekeeper_operator.agent_client import AgentClient
from tracekeeper_operator.agent_errors import AgentError, StaleRevision
from tracekeeper_operator.agent_views import status_inputs
from tracekeeper_operator.metrics import OperatorMetrics
from tracekeeper_operator.node_state import Assignments
from tracekeeper_operator.push_planner import Action, PushAction, PushPlanner, ResyncAction

log = logging.getLogger(__name__)


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
