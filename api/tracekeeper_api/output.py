"""A TraceProbe's output as the aggregated API serves it (output.tracekeeper.dev/v1alpha1).

One source of truth for three processes: the agent answers GET /v1/values with one probe's
`ProbeValues`, the operator merges them across nodes (`merge_values`) and adds the per-node
detail (`NodeDetail`), and `kubectl tracekeeper` reads both. Stream records that are not
events (`gap_record`, `resumed_record`) carry `type`; events never do (`tag_event`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from pydantic import Field

from tracekeeper_api.base import WireModel
from tracekeeper_api.protocol import EventDrops, KernelInfo, ProbeCost, ProbeOutcome

OUTPUT_GROUP = "output.tracekeeper.dev"
OUTPUT_VERSION = "v1alpha1"
OUTPUT_API_VERSION = f"{OUTPUT_GROUP}/{OUTPUT_VERSION}"
RESOURCE = "traceprobes"
LOG = "log"
"""The merged event stream. Named like pods/log on purpose: the kube-apiserver exempts only
the subresources log, exec, attach, proxy and portforward from its request timeout (60 s by
default), so any other name would cut every `tail` after a minute."""
VALUES = "values"
NODES = "nodes"
TRACEPOINTS = "tracepoints"
"""The tracepoints the kernels of the probe's nodes have (matching ?match=GLOB)."""
SUBRESOURCES = (LOG, VALUES, NODES, TRACEPOINTS)
MAX_TRACEPOINTS = 5000
"""Names in one node's answer; a wider glob says `truncated` (a kernel has ~2,000)."""
MAX_MATCH = 256

KEY_COLUMNS = ("pod", "container", "comm", "pid")
"""The aggregation keys a row can carry, in display order."""

OutputKind = Literal["count", "histogram", "events"]


class CountRow(WireModel):
    key: dict[str, str]
    """Aggregation key -> value (pod, container, comm, pid; only the probe's `by`)."""
    count: int


class HistogramRow(WireModel):
    key: dict[str, str]
    buckets: dict[int, int]
    """log2 slot -> count: slot s holds values in [2**s, 2**(s+1)) (slot 0 holds 0 and 1)."""


class EventTotals(WireModel):
    produced: int = 0
    """Matched and not sampled out."""
    drops: EventDrops = Field(default_factory=EventDrops)


class ProbeValues(WireModel):
    """One probe's current counts or histograms (or event totals) on one node or merged."""

    probe: str
    kind: OutputKind
    by: list[str] = Field(default_factory=list)
    unit: str = ""
    """What histogram values are (nsecs for syscall latency, else the field's name)."""
    counts: list[CountRow] = Field(default_factory=list)
    histograms: list[HistogramRow] = Field(default_factory=list)
    events: EventTotals | None = None
    nodes: list[str] = Field(default_factory=list)
    """The nodes summed into this (merged answers only)."""


def _key(row_key: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(row_key.items()))


def merge_values(probe: str, per_node: Mapping[str, ProbeValues]) -> ProbeValues:
    """The sum over nodes: counts and buckets of equal keys add up (a pod only ever runs on
    one node, but `by: [comm]` keys repeat across nodes), largest first, ties by key. The
    kind, `by` and unit are the probe's, the same on every node that runs its spec."""
    nodes = sorted(per_node)
    if not nodes:
        return ProbeValues(probe=probe, kind="count")
    first = per_node[nodes[0]]
    counts: dict[tuple[tuple[str, str], ...], int] = {}
    hists: dict[tuple[tuple[str, str], ...], dict[int, int]] = {}
    produced = rate_limited = ring_full = backlog = 0
    for node in nodes:
        values = per_node[node]
        for row in values.counts:
            counts[_key(row.key)] = counts.get(_key(row.key), 0) + row.count
        for hrow in values.histograms:
            buckets = hists.setdefault(_key(hrow.key), {})
            for slot, n in hrow.buckets.items():
                buckets[slot] = buckets.get(slot, 0) + n
        if values.events is not None:
            produced += values.events.produced
            rate_limited += values.events.drops.rate_limited
            ring_full += values.events.drops.ring_full
            backlog += values.events.drops.backlog
    events = None
    if any(per_node[n].events is not None for n in nodes):
        events = EventTotals(
            produced=produced,
            drops=EventDrops(rate_limited=rate_limited, ring_full=ring_full, backlog=backlog),
        )
    return ProbeValues(
        probe=probe,
        kind=first.kind,
        by=first.by,
        unit=first.unit,
        counts=[
            CountRow(key=dict(k), count=n)
            for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        ],
        histograms=[
            HistogramRow(key=dict(k), buckets=dict(sorted(b.items())))
            for k, b in sorted(hists.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
        ],
        events=events,
        nodes=nodes,
    )


class NodeValues(WireModel):
    """GET .../values?perNode=true: the merged values and each node's."""

    merged: ProbeValues
    nodes: dict[str, ProbeValues]
    unavailable: dict[str, str] = Field(default_factory=dict)
    """node -> why its values are missing from the sum (agent unreachable, ...)."""


class NodeDetail(WireModel):
    """One node's part of a probe, as its agent last reported it."""

    node: str
    state: str
    """The agent's outcome state (Loaded, Failed, ...), or Pending / Unreachable."""
    reason: str = ""
    message: str = ""
    """The failure text (verifier or compiler output, the missing symbol...)."""
    program_ids: list[int] = Field(default_factory=list)
    filter_entries: int = 0
    pods: int = 0
    containers: int = 0
    drops: EventDrops = Field(default_factory=EventDrops)
    kernel: KernelInfo | None = None
    """What the node's kernel can do, as its agent last reported it."""
    cost: ProbeCost | None = None
    """What the probe costs there, as of the agent's last report."""


class Tracepoints(WireModel):
    """One node's tracepoints (GET /v1/tracepoints on its agent), asked for on request: a
    kernel's list is too long to send with every report."""

    match: str = Field(default="*", max_length=MAX_MATCH)
    """The glob the names were chosen by (fnmatch, e.g. `syscalls:sys_enter_*`)."""
    total: int = 0
    """Tracepoints matching, even beyond the names listed."""
    names: list[str] = Field(default_factory=list, max_length=MAX_TRACEPOINTS)
    """category:name, sorted; the first MAX_TRACEPOINTS."""
    truncated: bool = False


def select_tracepoints(names: Iterable[str], match: str) -> Tracepoints:
    """The names matching the glob, sorted, at most MAX_TRACEPOINTS of them."""
    if len(match) > MAX_MATCH:
        raise ValueError(f"match is longer than {MAX_MATCH} characters")
    chosen = sorted(n for n in set(names) if fnmatch.fnmatchcase(n, match))
    return Tracepoints(
        match=match,
        total=len(chosen),
        names=chosen[:MAX_TRACEPOINTS],
        truncated=len(chosen) > MAX_TRACEPOINTS,
    )


class ProbeTracepoints(WireModel):
    """GET .../tracepoints: each of the probe's nodes' tracepoints matching `match`."""

    probe: str
    match: str = "*"
    nodes: dict[str, Tracepoints] = Field(default_factory=dict)
    unavailable: dict[str, str] = Field(default_factory=dict)
    """Nodes whose agent could not answer, and why."""


class ProbeNodes(WireModel):
    """GET .../nodes."""

    probe: str
    nodes: list[NodeDetail] = Field(default_factory=list)


def node_detail(
    node: str,
    outcome: ProbeOutcome | None,
    error: str | None,
    kernel: KernelInfo | None = None,
    refused: tuple[str, str] | None = None,
) -> NodeDetail:
    """A node's detail from its agent's outcome; Unreachable (with why) or Pending without;
    `refused`: what the operator kept off the node, (reason, message)."""
    if refused is not None:
        reason, message = refused
        return NodeDetail(node=node, state="Failed", reason=reason, message=message,
                          kernel=kernel)  # fmt: skip
    if outcome is None:
        if error:
            return NodeDetail(
                node=node, state="Unreachable", reason="AgentUnreachable", message=error,
                kernel=kernel,
            )  # fmt: skip
        return NodeDetail(node=node, state="Pending", reason="NodesPending", kernel=kernel)
    return NodeDetail(
        node=node,
        state=outcome.state,
        reason=outcome.reason,
        message=outcome.message,
        program_ids=outcome.program_ids,
        filter_entries=outcome.filter_entries,
        pods=outcome.pods,
        containers=outcome.containers,
        drops=outcome.drops,
        kernel=kernel,
        cost=outcome.cost,
    )


# --- the merged event stream ---------------------------------------------------------------

Record = dict[str, Any]
GAP = "gap"
RESUMED = "resumed"


def tag_event(event: Mapping[str, Any], node: str) -> Record:
    """An agent's event plus the node it came from. A captured field called `type` (or
    `node`) becomes field_type (field_node), as the agent already does for its own keys:
    `type` marks the stream's other records."""
    out: Record = {}
    for key, value in event.items():
        out[f"field_{key}" if key in ("type", "node") else key] = value
    out["node"] = node
    return out


def gap_record(
    probe: str, node: str, time: str, reason: str, received: int, drops: EventDrops
) -> Record:
    """A node's stream ended or failed: from now on its events are missing until a
    `resumed` record. `received` is how many events of that node this stream carried;
    `drops` what the node's agent last reported lost (rate limit, full ring, backlog)."""
    return {
        "type": GAP,
        "time": time,
        "probe": probe,
        "node": node,
        "reason": reason,
        "received": received,
        "drops": drops.to_wire(),
    }


def resumed_record(probe: str, node: str, time: str) -> Record:
    return {"type": RESUMED, "time": time, "probe": probe, "node": node}


def is_event(record: Mapping[str, Any]) -> bool:
    return "type" not in record


def sum_counts(values: Sequence[ProbeValues]) -> int:
    """Every count of these values together (for checks and summaries)."""
    return sum(row.count for v in values for row in v.counts)
