"""GET /v1/values?probe=NS/NAME: one probe's current counts or histograms as JSON.

What the aggregated output API (in the operator) sums across nodes for `kubectl tracekeeper
top`. The probe is selected here, on the agent, by its id: an answer never holds another
probe's rows. Rows are summed per shown key exactly as the standalone console does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from tracekeeper_agent.active import ActiveProbe
from tracekeeper_agent.outputs.console import aggregate_counts, aggregate_histograms, unit_of
from tracekeeper_agent.reconcile.reconciler import Reconciler
from tracekeeper_api.output import CountRow, EventTotals, HistogramRow, ProbeValues
from tracekeeper_api.output_text import columns
from tracekeeper_api.protocol import EventDrops


def probe_values(probe: ActiveProbe, reconciler: Reconciler) -> ProbeValues:
    """Reads the probe's maps (call off the loop, under the programs lock)."""
    by, ns, attributor = probe.plan.by, probe.namespace, reconciler.attributor
    cols = columns(by)
    kind = probe.plan.output_kind
    if kind == "count":
        rows = aggregate_counts(probe.read_counts(), by, ns, attributor)
        counts = [CountRow(key=dict(zip(cols, k, strict=True)), count=n) for k, n in rows]
        return ProbeValues(probe=probe.id, kind="count", by=cols, counts=counts)
    if kind == "histogram":
        hists = aggregate_histograms(probe.read_histograms(), by, ns, attributor)
        return ProbeValues(
            probe=probe.id,
            kind="histogram",
            by=cols,
            unit=unit_of(probe),
            histograms=[
                HistogramRow(key=dict(zip(cols, k, strict=True)), buckets=b) for k, b in hists
            ],
        )
    c = probe.read_counters()
    drops = EventDrops(
        rate_limited=c.rate_limited, ring_full=c.ring_full, backlog=probe.counts.backlog
    )
    return ProbeValues(
        probe=probe.id,
        kind="events",
        events=EventTotals(produced=c.matched - c.sampled_out, drops=drops),
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def values_handler(reconciler: Reconciler) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        probe_id = request.query.get("probe", "")

        def read() -> ProbeValues | None:
            # Looked up under the lock: a program is never read while (or after) it closes.
            with reconciler.board.lock:
                probe = reconciler.board.find(probe_id)
                return probe_values(probe, reconciler) if probe is not None else None

        values = await asyncio.to_thread(read)
        if values is None:
            return web.json_response(
                {"error": f"no probe {probe_id} loaded on this node"}, status=404
            )
        return web.Response(
            body=json.dumps(values.to_wire(), separators=(",", ":")).encode(),
            content_type="application/json",
        )

    return handle
