"""Debug sessions: a TraceProbe with a duration runs that long from when it is first Ready,
then is unloaded everywhere and reported Expired, the object and its last values kept.

Pure: the time is passed in. The session lives in the probe's status (status.session), so
an operator restart resumes it where it was: the clock is the stored expiresAt, not a
timer of this process. A session belongs to one duration: changing spec.duration (or the
namespace's maxDuration, for probes that have none) starts a new one at the next Ready,
and removing it ends the session without expiring the probe.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from tracekeeper_api.budgets import BUDGET_ANNOTATION, Budget
from tracekeeper_api.durations import parse_duration
from tracekeeper_api.output import ProbeValues
from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.reasons import OperatorReason
from tracekeeper_api.status import (
    MAX_FAILURES,
    MAX_SESSION_ROWS,
    ConditionStatus,
    DebugSession,
    SessionRow,
    SessionValues,
    TraceProbeStatus,
)
from tracekeeper_operator.kube_events import rfc3339
from tracekeeper_operator.selection import Refusal
from tracekeeper_operator.status_folding import transition_condition
from tracekeeper_operator.unloading import parse_rfc3339


def session_duration(spec: TraceProbeSpec, budget: Budget | None) -> str | None:
    """How long the probe's session runs: its duration, else its namespace's maximum
    (a namespace with maxDuration has no probe that runs forever); None: no session."""
    if spec.duration is not None:
        return spec.duration
    return budget.max_duration if budget is not None else None


def duration_refusal(spec: TraceProbeSpec, budget: Budget | None) -> Refusal | None:
    """NotPermitted when the probe asks for longer than its namespace's maxDuration."""
    if spec.duration is None or budget is None or budget.max_duration is None:
        return None
    if parse_duration(spec.duration) <= parse_duration(budget.max_duration):
        return None
    return Refusal(
        "NotPermitted",
        f"duration {spec.duration} is longer than this namespace allows (maxDuration "
        f"{budget.max_duration} in its {BUDGET_ANNOTATION} annotation): ask for less",
    )


def current_session(previous: TraceProbeStatus | None, duration: str | None) -> DebugSession | None:
    """The stored session while it is for this duration; a fresh (not started) one for a new
    duration; None without a duration."""
    if duration is None:
        return None
    stored = previous.session if previous is not None else None
    if stored is not None and stored.duration == duration:
        return stored
    return DebugSession(duration=duration)


def has_expired(session: DebugSession | None, now: datetime) -> bool:
    if session is None or session.expires_at is None:
        return False
    expires = parse_rfc3339(session.expires_at)
    return expires is not None and expires <= now


def started(session: DebugSession, now: datetime) -> DebugSession:
    """The session clock starts at the probe's first Ready of this duration."""
    if session.started_at is not None:
        return session
    ends = now + timedelta(seconds=parse_duration(session.duration))
    return session.model_copy(update={"started_at": rfc3339(now), "expires_at": rfc3339(ends)})


def next_expiry(sessions: Iterable[DebugSession], now: datetime) -> float | None:
    """Seconds until the soonest running session ends (None: none runs)."""
    soonest: float | None = None
    for session in sessions:
        expires = parse_rfc3339(session.expires_at or "")
        if expires is None or session.final is not None:
            continue
        left = max(0.0, (expires - now).total_seconds())
        soonest = left if soonest is None else min(soonest, left)
    return soonest


def expired_message(session: DebugSession) -> str:
    return (
        f"its {session.duration} debug session ended at {session.expires_at}: unloaded from "
        "every node (status.session.final holds its last values); change or remove "
        "spec.duration to run it again"
    )


def attach_session(
    status: TraceProbeStatus,
    previous: TraceProbeStatus | None,
    session: DebugSession | None,
    *,
    expired: bool,
    now: datetime,
) -> TraceProbeStatus:
    """The folded status with the session and its Expired condition (none without a
    duration). The clock starts at the first Ready; messages hold no time left, so that a
    running session folds to the same status on every pass and nothing is written."""
    if session is None:
        return status
    if not expired:
        ready = status.condition("Ready")
        if ready is not None and ready.status == "True":
            session = started(session, now)
    if expired:
        state: tuple[ConditionStatus, OperatorReason, str] = (
            "True", "Expired", expired_message(session)
        )  # fmt: skip
    elif session.started_at is not None:
        state = ("False", "SessionRunning",
                 f"runs {session.duration} from {session.started_at}: unloaded at "
                 f"{session.expires_at}")  # fmt: skip
    else:
        pending = f"its {session.duration} session starts when the probe is first Ready"
        state = ("False", "SessionPending", pending)
    before = previous.condition("Expired") if previous is not None else None
    generation = status.observed_generation or 0
    cond = transition_condition(
        "Expired", *state, generation=generation, previous=before, now=rfc3339(now)
    )
    return status.model_copy(update={"conditions": [*status.conditions, cond], "session": session})


def summarize(values: ProbeValues, *, read_at: str, unread: Sequence[str]) -> SessionValues:
    """A probe's merged values, small enough for its status: the total and the largest keys."""
    rows: list[tuple[dict[str, str], int]]
    if values.kind == "histogram":
        rows = [(h.key, sum(h.buckets.values())) for h in values.histograms]
        rows.sort(key=lambda r: -r[1])
    else:
        rows = [(c.key, c.count) for c in values.counts]  # already largest first
    total = sum(n for _, n in rows)
    if values.events is not None:
        total = values.events.produced
    return SessionValues(
        read_at=read_at,
        total=total,
        top=[SessionRow(key=k, count=n) for k, n in rows[:MAX_SESSION_ROWS]],
        nodes=values.nodes[:MAX_FAILURES],
        unread=list(unread)[:MAX_FAILURES],
    )
