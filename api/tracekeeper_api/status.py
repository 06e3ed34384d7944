"""Status of TraceProbe and TraceFilter, following the Kubernetes API conventions.

Counts and a bounded failure list, never one entry per node: 5,000 nodes must not
bloat the object. Full per-node detail is served by the agents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, JsonValue

from tracekeeper_api.base import WireModel

MAX_FAILURES = 10
MAX_MESSAGE = 1024

ConditionType = Literal["Ready", "Accepted", "Loaded", "Degraded", "Expired", "Persisted"]
ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(WireModel):
    """A condition, as in every Kubernetes status."""

    type: ConditionType
    """Ready (summary), Accepted (valid and allowed here), Loaded, Degraded, Expired (only
    with a duration: its debug session ended), Persisted (only while loaded somewhere:
    every node that runs it saved its state, which a restart of the node's agent resumes)."""
    status: ConditionStatus
    reason: str = Field(max_length=64)
    """CamelCase reason, e.g. Unsupported, CompileFailed, NotPermitted."""
    message: str = Field(default="", max_length=MAX_MESSAGE)
    """Human-readable detail, including the verifier or attach text."""
    observed_generation: int | None = None
    last_transition_time: str | None = None
    """RFC 3339 time of the last status change."""


class NodeCounts(WireModel):
    """Nodes this probe is pushed to, and how they are doing."""

    targeted: int = 0
    loaded: int = 0
    failed: int = 0


class TargetCounts(WireModel):
    """Pods and containers the probe's filter currently selects."""

    pods: int = 0
    containers: int = 0


class NodeFailure(WireModel):
    """One node's failure to load the probe (the first few are kept)."""

    node: str = Field(max_length=253)
    reason: str = Field(max_length=64)
    message: str = Field(default="", max_length=MAX_MESSAGE)


def find_condition(conditions: Sequence[Condition], type_: ConditionType) -> Condition | None:
    """The condition of `type_` (a status holds at most one of each type)."""
    return next((c for c in conditions if c.type == type_), None)


_CONDITIONS_SCHEMA: dict[str, JsonValue] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}


MAX_SESSION_ROWS = 10


class SessionRow(WireModel):
    key: dict[str, str] = Field(max_length=4)
    """The probe's `by` keys (pod, container, comm, pid) -> value."""
    count: int
    """Hits, or histogram values, of this key over every node."""


class SessionValues(WireModel):
    """What the probe had counted when its session ended, read from the agents just
    before it was unloaded: its output is gone from the nodes after that."""

    read_at: str
    total: int = 0
    """Every count (or histogram value) over every node; events probes: events produced."""
    top: list[SessionRow] = Field(default_factory=list, max_length=MAX_SESSION_ROWS)
    """The largest keys, largest first."""
    nodes: list[str] = Field(default_factory=list, max_length=MAX_FAILURES)
    """Nodes read (the first few)."""
    unread: list[str] = Field(default_factory=list, max_length=MAX_FAILURES)
    """Nodes whose agent could not be read: their share is missing from the totals."""


class DebugSession(WireModel):
    """A probe with a duration runs for that long from when it is first Ready."""

    duration: str
    """The length this session runs for: spec.duration, or the namespace's maxDuration."""
    started_at: str | None = None
    """When the probe was first Ready for this duration (None: not Ready yet)."""
    expires_at: str | None = None
    final: SessionValues | None = None
    """Set when the session ended."""


class ProbeCostStatus(WireModel):
    """What the probe costs, over the nodes that run it, from the kernel's own accounting
    (BPF run-time statistics and the memory of its programs and maps). A program shared by
    several probes is split equally among them. Refreshed at a bounded rate (once a minute
    by default), not with every change."""

    ns_per_call: float | None = None
    """Mean kernel run time of the probe's program per traced call, over every run since it
    was loaded (None: no run yet, or run-time statistics are off on those nodes)."""
    kernel_memory_bytes: int = 0
    """The probe's share of the kernel memory its programs and maps hold, summed."""
    matched_per_second: float | None = None
    """Calls that passed the probe's filter, per second, summed."""
    events_per_second: float | None = None
    """Events read from its ring buffers, per second, summed (events probes)."""
    nodes: int = 0
    """Nodes whose agent reported these figures."""
    updated_at: str
    """RFC 3339 time these figures were read."""


class TraceProbeStatus(WireModel):
    """Observed state of a TraceProbe, written by the operator."""

    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    conditions: list[Condition] = Field(
        default_factory=list, max_length=8, json_schema_extra=_CONDITIONS_SCHEMA
    )
    nodes: NodeCounts = Field(default_factory=NodeCounts)
    targets: TargetCounts = Field(default_factory=TargetCounts)
    failures: list[NodeFailure] = Field(default_factory=list, max_length=MAX_FAILURES)
    """The first failing nodes, with the agent's reason and message."""
    session: DebugSession | None = None
    """Only with a duration (the spec's or the namespace's maximum)."""
    cost: ProbeCostStatus | None = None
    """Only while it is loaded somewhere."""

    def condition(self, type_: ConditionType) -> Condition | None:
        return find_condition(self.conditions, type_)


class TraceFilterStatus(WireModel):
    """Observed state of a TraceFilter, written by the operator."""

    observed_generation: int | None = None
    conditions: list[Condition] = Field(
        default_factory=list, max_length=8, json_schema_extra=_CONDITIONS_SCHEMA
    )
    matched_pods: int = 0
    """Pods the filter currently selects, on every node."""
    used_by: list[str] = Field(default_factory=list, max_length=50)
    """TraceProbes in this namespace that reference the filter (the first 50)."""

    def condition(self, type_: ConditionType) -> Condition | None:
        return find_condition(self.conditions, type_)
