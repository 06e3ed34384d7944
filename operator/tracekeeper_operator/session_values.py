"""A debug session's last values, read from the agents that run the probe just before the
push that unloads it: afterwards the counts are gone from every node."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from tracekeeper_api.output import ProbeValues, merge_values
from tracekeeper_api.status import SessionValues
from tracekeeper_operator.agent_errors import AgentError
from tracekeeper_operator.agent_views import AgentView
from tracekeeper_operator.output_api.agent_reads import AgentReads
from tracekeeper_operator.output_api.placement import placements, running
from tracekeeper_operator.sessions import summarize


async def read_final_values(
    probe_id: str, views: Mapping[str, AgentView], reads: AgentReads | None, *, read_at: str
) -> SessionValues:
    """The probe's values merged over the nodes that run it; nodes that cannot be read are
    named in `unread` (never a silent zero)."""
    live = [p for p in placements(probe_id, views) if running(p) and p.endpoint is not None]

    async def one(endpoint: str) -> ProbeValues | None:
        if reads is None:
            return None
        try:
            return await reads.values(endpoint, probe_id)
        except AgentError:
            return None

    answers = await asyncio.gather(*(one(p.endpoint) for p in live if p.endpoint is not None))
    got = {p.node: a for p, a in zip(live, answers, strict=True) if a is not None}
    unread = [p.node for p, a in zip(live, answers, strict=True) if a is None]
    return summarize(merge_values(probe_id, got), read_at=read_at, unread=unread)
