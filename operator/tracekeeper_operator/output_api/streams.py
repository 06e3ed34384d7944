"""One probe's events from every node that runs it, merged into one stream.

Like `kubectl logs -f` across pods: each node's agent stream is read by its own task and
its events, tagged with the node, go to one bounded queue in arrival order. A node whose
stream ends or fails is never silent: a `gap` record (with how many of its events this
stream carried and what the node reported dropped) goes into the stream, the node is
retried while it still runs the probe, and a `resumed` record marks its events flowing
again. Nodes that start running the probe during the stream are joined.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from tracekeeper_api.output import Record, gap_record, resumed_record, tag_event
from tracekeeper_api.protocol import EventDrops
from tracekeeper_operator.agent_errors import AgentError
from tracekeeper_operator.output_api.agent_reads import AgentReads
from tracekeeper_operator.output_api.placement import Placement, running

QUEUE_SIZE = 4096
"""Events waiting for the client; a full queue pauses the node readers (the agents then
count what their subscriber queues cannot hold as backlog drops)."""


def now_rfc3339() -> str:
    ns = time.time_ns()
    seconds, nanos = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


class MergedStream:
    def __init__(
        self,
        probe_id: str,
        placements: Callable[[], list[Placement]],
        reads: AgentReads,
        *,
        retry: float = 2.0,
        rescan: float = 2.0,
        clock: Callable[[], str] = now_rfc3339,
    ) -> None:
        self.probe_id = probe_id
        self.queue: asyncio.Queue[Record] = asyncio.Queue(QUEUE_SIZE)
        self._placements = placements
        self._reads = reads
        self._retry = retry
        self._rescan = rescan
        self._clock = clock
        self._nodes: dict[str, asyncio.Task[None]] = {}

    def _placement(self, node: str) -> Placement | None:
        return next((p for p in self._placements() if p.node == node), None)

    async def run(self) -> None:
        """Until cancelled: keep one reader per node that runs the probe."""
        try:
            while True:
                for p in self._placements():
                    task = self._nodes.get(p.node)
                    if (task is None or task.done()) and running(p) and p.endpoint:
                        self._nodes[p.node] = asyncio.create_task(
                            self._read_node(p.node), name=f"output {self.probe_id} {p.node}"
                        )
                await asyncio.sleep(self._rescan)
        finally:
            for task in self._nodes.values():
                task.cancel()
            for task in self._nodes.values():
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _read_node(self, node: str) -> None:
        received = 0
        gapped = False
        while True:
            place = self._placement(node)
            if place is None or not running(place) or not place.endpoint:
                if not gapped:
                    await self._gap(node, "the probe no longer runs on this node", received, place)
                return
            try:
                async for event in self._reads.events(place.endpoint, self.probe_id):
                    if gapped:
                        await self.queue.put(resumed_record(self.probe_id, node, self._clock()))
                        gapped = False
                    received += 1
                    await self.queue.put(tag_event(event, node))
                reason = "the agent ended the stream (probe reloaded or agent restarting)"
            except AgentError as exc:
                reason = str(exc)
            if not gapped:
                await self._gap(node, reason, received, self._placement(node))
                gapped = True
            await asyncio.sleep(self._retry)

    async def _gap(self, node: str, reason: str, received: int, place: Placement | None) -> None:
        drops = place.outcome.drops if place and place.outcome else EventDrops()
        await self.queue.put(
            gap_record(self.probe_id, node, self._clock(), reason, received, drops)
        )
