"""A probe's cost on its status: the agents' per-node figures summed (pure).

The agents report a probe's cost with every answer, but status carries it at a bounded
rate: a stored cost younger than the refresh interval is kept as it is (unless the nodes
running the probe changed), so a probe's status is written for its figures at most once
per interval, however many nodes report.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from tracekeeper_api.status import ProbeCostStatus
from tracekeeper_operator.kube_events import rfc3339
from tracekeeper_operator.status_folding import NodeOutcome
from tracekeeper_operator.unloading import parse_rfc3339


def summed_cost(outcomes: Sequence[NodeOutcome], now: datetime) -> ProbeCostStatus | None:
    """The nodes' costs together: memory and rates summed, ns per call the mean over every
    run on every node (None: no node reported a cost)."""
    costs = [o.cost for o in outcomes if o.state == "Loaded" and o.cost is not None]
    if not costs:
        return None
    runs = sum(c.runs for c in costs)
    matched = [c.matched_per_second for c in costs if c.matched_per_second is not None]
    events = [c.events_per_second for c in costs if c.events_per_second is not None]
    return ProbeCostStatus(
        ns_per_call=round(sum(c.run_time_ns for c in costs) / runs, 1) if runs else None,
        kernel_memory_bytes=sum(c.kernel_memory_bytes for c in costs),
        matched_per_second=round(sum(matched), 3) if matched else None,
        events_per_second=round(sum(events), 3) if events else None,
        nodes=len(costs),
        updated_at=rfc3339(now),
    )


def refreshed_cost(
    outcomes: Sequence[NodeOutcome],
    previous: ProbeCostStatus | None,
    now: datetime,
    every: float,
) -> ProbeCostStatus | None:
    """The cost the status carries now: `previous` while it is younger than `every`
    seconds and covers as many nodes, else the nodes' figures summed anew (a node more or
    less changes the sum at once: it moves with the probe's placement, not with time)."""
    current = summed_cost(outcomes, now)
    if current is None or previous is None or current.nodes != previous.nodes:
        return current
    return previous if cost_is_fresh(previous, now, every) else current


NEVER = (datetime.max.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC))
"""An empty window of times."""


def fresh_window(cost: ProbeCostStatus, every: float) -> tuple[datetime, datetime]:
    """The times at which a stored cost is fresh: from its reading for `every` seconds
    (empty when its time does not parse)."""
    read_at = parse_rfc3339(cost.updated_at)
    if read_at is None:
        return NEVER
    return read_at, read_at + timedelta(seconds=every)


def cost_is_fresh(cost: ProbeCostStatus, now: datetime, every: float) -> bool:
    """Whether a stored cost is younger than `every` seconds (kept as it is until then)."""
    start, end = fresh_window(cost, every)
    return start <= now < end
