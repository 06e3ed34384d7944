"""Per-namespace budgets: how much of one node a tenant namespace may take.

The operator's settings hold the defaults (`Budget`); the platform team overrides them for
one namespace with the annotation `tracekeeper.dev/budget` on the Namespace object, a JSON
object with any of Budget's fields (`BudgetOverride`). Tenants with `edit` or `admin` in
their namespace cannot change Namespace objects, so they cannot raise their own budget.
Privileged namespaces have no budget: only the node-wide limits bound them.
"""

from __future__ import annotations

from pydantic import Field, ValidationError

from tracekeeper_api.base import WireModel
from tracekeeper_api.durations import ProbeDuration
from tracekeeper_api.probes import MAX_EVENTS_PER_SECOND
from tracekeeper_api.protocol import MAX_PROBES_PER_NODE, MAX_STATE_BYTES

BUDGET_ANNOTATION = "tracekeeper.dev/budget"

PROGRAMS_PER_ATTACH_POINT = 64
"""The kernel's limit on BPF programs attached to one tracepoint (or kprobe, uprobe) on one
node, whoever attached them (BPF_TRACE_MAX_PROGS)."""
MAX_FILTER_ENTRIES = 1_000_000


class Budget(WireModel):
    """What one tenant namespace may use on one node."""

    probes_per_node: int = Field(default=32, ge=0, le=MAX_PROBES_PER_NODE)
    """TraceProbes loaded on one node."""
    programs_per_attach_point: int = Field(default=16, ge=0, le=PROGRAMS_PER_ATTACH_POINT)
    """BPF programs on one attach point (tracepoint, syscall, kprobe, uprobe symbol) of one
    node: one per probe shape (output kind, keys, fields) per 64 probes of it, since probes
    of one shape share a program; the kernel takes 64 per attach point from every namespace
    together."""
    events_per_second: int = Field(default=10_000, ge=0, le=MAX_EVENTS_PER_SECOND)
    """The sum of the rate limits of the namespace's events probes on one node."""
    default_rate_limit: int = Field(default=1_000, ge=1, le=MAX_EVENTS_PER_SECOND)
    """The rate limit (events per second per node) of an events probe without rateLimit."""
    filter_entries: int = Field(default=4096, ge=0, le=MAX_FILTER_ENTRIES)
    """In-kernel filter map entries on one node: a whole pod is one, a listed container one,
    summed over the namespace's probes."""
    state_bytes: int = Field(default=512 * 1024, ge=0, le=MAX_STATE_BYTES)
    """Bytes of the node's desired state (the probes, and the pods they target) taken by the
    namespace."""
    max_duration: ProbeDuration | None = None
    """The longest debug session (spec.duration) a probe of the namespace may ask for; a
    probe without duration runs this long. None: probes may run until deleted."""


class BudgetOverride(WireModel):
    """Budget fields to change for one namespace; the others keep the operator's defaults."""

    probes_per_node: int | None = Field(default=None, ge=0, le=MAX_PROBES_PER_NODE)
    programs_per_attach_point: int | None = Field(default=None, ge=0, le=PROGRAMS_PER_ATTACH_POINT)
    events_per_second: int | None = Field(default=None, ge=0, le=MAX_EVENTS_PER_SECOND)
    default_rate_limit: int | None = Field(default=None, ge=1, le=MAX_EVENTS_PER_SECOND)
    filter_entries: int | None = Field(default=None, ge=0, le=MAX_FILTER_ENTRIES)
    state_bytes: int | None = Field(default=None, ge=0, le=MAX_STATE_BYTES)
    max_duration: ProbeDuration | None = None

    def over(self, base: Budget) -> Budget:
        changes = self.model_dump(exclude_none=True)
        return base.model_copy(update=changes) if changes else base


def parse_override(text: str) -> BudgetOverride:
    """The annotation's (or flag's) JSON; ValueError naming the bad field otherwise."""
    try:
        return BudgetOverride.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise ValueError(problems) from None
