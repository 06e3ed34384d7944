"""Per-node agent outcomes folded into TraceProbe / TraceFilter status, and the Events that
status transitions deserve.

Pure: the same inputs give the same status, and a condition's lastTransitionTime is carried
over from the previous status unless the condition's status changed, so that a steady state
folds to exactly the status already stored and nothing is written.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from tracekeeper_api.protocol import ProbeCost
from tracekeeper_api.reasons import Reason, ReportedReason
from tracekeeper_api.status import (
    MAX_FAILURES,
    Condition,
    ConditionStatus,
    ConditionType,
    NodeCounts,
    NodeFailure,
    TargetCounts,
    TraceFilterStatus,
    TraceProbeStatus,
)
from tracekeeper_api.text import clip_message, first_of, truncate_message
from tracekeeper_operator.agent_views import AgentView
from tracekeeper_operator.inventory import Refused
from tracekeeper_operator.kube_events import EventSpec
from tracekeeper_operator.records import FilterRecord, ProbeRecord
from tracekeeper_operator.selection import Refusal, Selection

MAX_NODES_NAMED = 5
"""Nodes named in a condition message; the rest are counted."""
QUOTA_EXCEEDED: Final = "QuotaExceeded"

NodeState = Literal["Loaded", "Failed", "Pending"]


@dataclass(frozen=True)
class NodeOutcome:
    """How one targeted node is doing with one probe."""

    node: str
    state: NodeState
    reason: Reason | ReportedReason
    message: str = ""
    known: bool = True
    """False until this operator has heard from the node's agent at all (just started)."""
    cost: ProbeCost | None = None
    """What the agent reported the probe costs there (Loaded only)."""
    unsaved: str | None = None
    """Loaded only: why the node's agent could not save the state it applied (its
    `persisted.error`: a full or read-only state directory); None once it is saved."""


def _named(nodes: Sequence[str]) -> str:
    return first_of(nodes, MAX_NODES_NAMED)


def node_outcome(
    probe_id: str,
    spec_hash: str,
    node: str,
    view: AgentView | None,
    refused: str | None = None,
    unsupported: Refused | None = None,
) -> NodeOutcome:
    """What one node's agent says of the probe, from its latest report; `refused`: why the
    probe was left out of the node's state (over a budget); `unsupported`: what the node's
    reported kernel cannot do (never pushed there)."""
    if refused is not None:
        return NodeOutcome(node, "Failed", QUOTA_EXCEEDED, refused)
    if unsupported is not None:
        return NodeOutcome(node, "Failed", *unsupported)
    if view is None or view.endpoint is None:
        return NodeOutcome(
            node, "Failed", "AgentUnreachable", "no tracekeeper agent runs on this node"
        )
    if view.error is not None:
        # The last contact failed: whatever the last report said is not known to hold.
        return NodeOutcome(node, "Failed", "AgentUnreachable", view.error)
    if view.report is None:
        return NodeOutcome(node, "Pending", "NodesPending", "waiting for the agent", known=False)
    outcome = next((p for p in view.report.probes if p.id == probe_id), None)
    if outcome is None or outcome.spec_hash != spec_hash:
        return NodeOutcome(node, "Pending", "NodesPending", "waiting for the agent")
    if outcome.state == "Loaded":
        unsaved = view.report.persisted.error
        return NodeOutcome(
            node, "Loaded", "Loaded", outcome.message, cost=outcome.cost, unsaved=unsaved
        )
    if outcome.state == "Suspended":
        return NodeOutcome(node, "Pending", "NodesPending", "suspended on the agent")
    reported = ReportedReason(outcome.reason or outcome.state)
    return NodeOutcome(node, "Failed", reported, outcome.message)


def node_outcomes(
    probe_id: str,
    spec_hash: str,
    nodes: Iterable[str],
    views: Mapping[str, AgentView],
    refused: Mapping[str, Mapping[str, str]] | None = None,
    unsupported: Mapping[str, Mapping[str, Refused]] | None = None,
) -> list[NodeOutcome]:
    refused = refused or {}
    unsupported = unsupported or {}
    return [
        node_outcome(
            probe_id,
            spec_hash,
            node,
            views.get(node),
            refused.get(node, {}).get(probe_id),
            unsupported.get(node, {}).get(probe_id),
        )
        for node in sorted(nodes)
    ]


def transition_condition(
    type_: ConditionType,
    status: ConditionStatus,
    reason: Reason | ReportedReason,
    message: str,
    *,
    generation: int,
    previous: Condition | None,
    now: str,
) -> Condition:
    kept = previous is not None and previous.status == status and previous.last_transition_time
    return Condition(
        type=type_,
        status=status,
        reason=reason,
        message=clip_message(message),
        observed_generation=generation,
        last_transition_time=previous.last_transition_time if kept and previous else now,
    )


def persisted_condition(
    loaded: Sequence[NodeOutcome],
    cond: Callable[[ConditionType, ConditionStatus, Reason | ReportedReason, str], Condition],
) -> Condition | None:
    """Persisted, over the nodes that run the probe (None where none does): False while
    some node's agent could not save the state it applied. Tracing goes on there, so
    Ready and Degraded are left alone; what is at stake is a restart of that agent, which
    would resume the older state on its disk until the operator's next push."""
    if not loaded:
        return None
    unsaved = [o for o in loaded if o.unsaved is not None]
    if not unsaved:
        return cond("Persisted", "True", "StateSaved", "")
    total = len(loaded)
    detail = first_of(
        [f"{o.node}: {o.unsaved}" for o in unsaved], MAX_NODES_NAMED, sep="; ", more_sep="; "
    )
    return cond(
        "Persisted",
        "False",
        "StateNotSaved",
        f"the agent's state directory does not hold the state it runs on {len(unsaved)} of "
        f"{total} node{'s' if total != 1 else ''} running the probe (an agent restart there "
        f"resumes an older state until the operator pushes again): {detail}",
    )


def _dominant(failures: Sequence[NodeOutcome]) -> Reason | ReportedReason:
    counts = Counter(f.reason for f in failures)
    best = max(counts.values())
    return next(f.reason for f in failures if counts[f.reason] == best)


def quotatransition_condition(
    outcomes: Sequence[NodeOutcome],
    cond: Callable[[ConditionType, ConditionStatus, Reason | ReportedReason, str], Condition],
) -> Condition | None:
    """Accepted=False, QuotaExceeded, when some node left the probe out for a budget."""
    over = [o for o in outcomes if o.reason == QUOTA_EXCEEDED]
    if not over:
        return None
    detail = first_of([o.message for o in over], MAX_NODES_NAMED, sep="; ", more_sep="; ")
    total = len(outcomes)
    where = f"left out of {len(over)} of {total} node{'s' if total != 1 else ''}"
    return cond("Accepted", "False", QUOTA_EXCEEDED, f"{where}: {detail}")


def fold_probe_status(
    probe: ProbeRecord,
    selection: Selection,
    outcomes: Sequence[NodeOutcome],
    *,
    previous: TraceProbeStatus | None,
    now: str,
    max_failures: int = MAX_FAILURES,
    expired: str | None = None,
) -> TraceProbeStatus:
    """`expired`: the message of a probe whose debug session ended (see sessions.py)."""
    gen = probe.generation

    def cond(
        type_: ConditionType, status: ConditionStatus, reason: Reason | ReportedReason, msg: str
    ) -> Condition:
        before = previous.condition(type_) if previous is not None else None
        return transition_condition(
            type_, status, reason, msg, generation=gen, previous=before, now=now
        )

    no_failures = cond("Degraded", "False", "NoFailures", "")
    if isinstance(selection, Refusal):
        why, msg = selection.reason, selection.message
        return TraceProbeStatus(
            observed_generation=gen,
            conditions=[
                cond("Ready", "False", why, msg),
                cond("Accepted", "False", why, msg),
                cond("Loaded", "False", why, "not loaded on any node"),
                no_failures,
            ],
        )
    accepted = quotatransition_condition(outcomes, cond) or cond("Accepted", "True", "Accepted", "")
    targets = TargetCounts(pods=selection.pods, containers=selection.containers)
    note = f" ({selection.note})" if selection.note else ""

    def loaded_nowhere(reason: Reason, msg: str) -> TraceProbeStatus:
        """Accepted, on purpose not loaded anywhere: nothing failed."""
        return TraceProbeStatus(
            observed_generation=gen,
            conditions=[
                cond("Ready", "False", reason, msg),
                accepted,
                cond("Loaded", "False", reason, msg),
                no_failures,
            ],
            targets=targets,
        )

    if expired is not None:
        return loaded_nowhere("Expired", expired)
    if probe.spec is not None and probe.spec.suspend:
        return loaded_nowhere("Suspended", "suspended: unloaded from every node")
    if not outcomes:
        msg = f"the filter selects no running pod in namespace {probe.ref.namespace}{note}"
        if selection.note and not selection.pods:
            msg = selection.note
        return loaded_nowhere("NoMatchingPods", msg)

    total = len(outcomes)
    loaded = [o for o in outcomes if o.state == "Loaded"]
    failed = [o for o in outcomes if o.state == "Failed"]
    pending = [o.node for o in outcomes if o.state == "Pending"]
    counts = NodeCounts(targeted=total, loaded=len(loaded), failed=len(failed))
    summary = f"loaded on {len(loaded)} of {total} node{'s' if total != 1 else ''}"
    failures = [
        NodeFailure(node=f.node, reason=f.reason[:64], message=truncate_message(f.message))
        for f in failed[:max_failures]
    ]
    if failed:
        reason = _dominant(failed)
        detail = first_of(
            [f"{f.node}: {f.reason}: {f.message}" for f in failed],
            MAX_NODES_NAMED,
            sep="; ",
            more_sep="; ",
        )
        degraded = cond("Degraded", "True", reason, f"failed on {len(failed)} of {total}: {detail}")
        short = f"{summary}; {reason} on {len(failed)}: {detail}"
    else:
        degraded = no_failures
        reason = "NodesPending"
        short = f"{summary}; waiting for {_named(pending)}"
    if len(loaded) == total:
        ready_msg = f"{summary} ({targets.pods} pods, {targets.containers} containers){note}"
        ready = cond("Ready", "True", "Loaded", ready_msg)
        loaded_cond = cond("Loaded", "True", "Loaded", ready_msg)
    else:
        ready = cond("Ready", "False", reason, short + note)
        loaded_cond = cond("Loaded", "False", reason, short + note)
    persisted = persisted_condition(loaded, cond)
    return TraceProbeStatus(
        observed_generation=gen,
        conditions=[ready, accepted, loaded_cond, degraded, *([persisted] if persisted else [])],
        nodes=counts,
        targets=targets,
        failures=failures,
    )


def probe_events(previous: TraceProbeStatus | None, new: TraceProbeStatus) -> list[EventSpec]:
    """Events for what changed between two statuses (none for a status folded again)."""

    def get(status: TraceProbeStatus | None, type_: ConditionType) -> Condition | None:
        return status.condition(type_) if status is not None else None

    events: list[EventSpec] = []
    acc, acc0 = get(new, "Accepted"), get(previous, "Accepted")
    if (
        acc is not None
        and acc.status == "False"
        and acc.reason in ("NotPermitted", QUOTA_EXCEEDED)
        and (
            acc0 is None
            or (acc0.status, acc0.reason) != ("False", acc.reason)
            # A quota message carries counts that move with every probe the namespace adds:
            # one Event when the probe goes over, not one per count.
            or (acc.reason != QUOTA_EXCEEDED and acc0.message != acc.message)
        )
    ):
        events.append(EventSpec("Warning", acc.reason, acc.message))
    exp, exp0 = get(new, "Expired"), get(previous, "Expired")
    if exp is not None and exp.status == "True" and (exp0 is None or exp0.status != "True"):
        events.append(EventSpec("Normal", "Expired", exp.message))
    ld, ld0 = get(new, "Loaded"), get(previous, "Loaded")
    was_loaded = ld0 is not None and ld0.status == "True"
    if ld is not None and ld.status == "True" and not was_loaded:
        events.append(EventSpec("Normal", "ProbeLoaded", ld.message))
    before = {(f.node, f.reason) for f in previous.failures} if previous else set()
    for f in new.failures:
        # A node that left the probe out for a budget is told by the QuotaExceeded event.
        if (f.node, f.reason) not in before and f.reason != QUOTA_EXCEEDED:
            events.append(
                EventSpec(
                    "Warning", "ProbeLoadFailed", clip_message(f"{f.node}: {f.reason}: {f.message}")
                )
            )
    if was_loaded and ld is not None and ld.status == "False" and ld.reason == "Suspended":
        events.append(EventSpec("Normal", "ProbeUnloaded", ld.message))
    # On the transitions only: while a disk stays full the message moves with every push
    # (the agent names the revision it could not save).
    ps, ps0 = get(new, "Persisted"), get(previous, "Persisted")
    if ps is not None and ps.status == "False" and (ps0 is None or ps0.status != "False"):
        events.append(EventSpec("Warning", "StateNotSaved", ps.message))
    if ps is not None and ps.status == "True" and ps0 is not None and ps0.status == "False":
        events.append(EventSpec("Normal", "StateSaved", "saved again on every node running it"))
    return events


def filter_events(previous: TraceFilterStatus | None, new: TraceFilterStatus) -> list[EventSpec]:
    """A filter refused for privileged fields says so once, like a probe."""

    def accepted(status: TraceFilterStatus | None) -> Condition | None:
        if status is None:
            return None
        return status.condition("Accepted")

    now, before = accepted(new), accepted(previous)
    if now is None or (now.status, now.reason) != ("False", "NotPermitted"):
        return []
    if before is not None and (before.status, before.reason, before.message) == (
        now.status,
        now.reason,
        now.message,
    ):
        return []
    return [EventSpec("Warning", "NotPermitted", now.message)]


def status_differs(
    stored: TraceProbeStatus | TraceFilterStatus | None,
    folded: TraceProbeStatus | TraceFilterStatus,
) -> bool:
    """Whether `folded` must be written (compared as on the wire, defaults included)."""
    return stored is None or stored.to_wire() != folded.to_wire()


def fold_filter_status(
    filt: FilterRecord,
    *,
    matched_pods: int,
    used_by: Sequence[str],
    refusal: Refusal | None,
    previous: TraceFilterStatus | None,
    now: str,
) -> TraceFilterStatus:
    before = previous.condition("Accepted") if previous else None
    if refusal is not None:
        accepted = transition_condition(
            "Accepted",
            "False",
            refusal.reason,
            refusal.message,
            generation=filt.generation,
            previous=before,
            now=now,
        )
    else:
        accepted = transition_condition(
            "Accepted", "True", "Accepted", "", generation=filt.generation, previous=before, now=now
        )
    return TraceFilterStatus(
        observed_generation=filt.generation,
        conditions=[accepted],
        matched_pods=matched_pods,
        used_by=sorted(used_by)[:50],
    )
